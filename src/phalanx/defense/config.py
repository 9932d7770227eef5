"""The ``[defense]`` section: verification, recovery, quarantine."""

from __future__ import annotations

from dataclasses import dataclass

from phalanx.errors import ConfigError

VERIFY = ("none", "duplicate")
RECOVERY = ("skip", "repair", "restart", "none")  # the strategies of phalanx.defense.recovery


@dataclass(kw_only=True)
class DefenseConfig:
    """Verification of the middle stages and what the coordinator does about an alert."""

    verify: str = "none"  # none | duplicate (duplicated block + jumping connection)
    recovery: str = "skip"  # what to do with an attempt that named culprits: redo it with them
    # bypassed (skip layer) | redo it with their replicas' messages (repair) | redo it as it was
    # (restart) | keep it (none: alert only)
    rtol: float = 0.0  # tolerance of the comparison; rtol = atol = 0 (the default) compares
    atol: float = 0.0  # bitwise, which holds where every stage runs the same hardware/software
    max_retries: int = 3  # redone attempts before an iteration (or evaluation) is dropped
    quarantine_after: int = 0  # quarantine a stage blamed this often in 2x as many steps; 0 never

    def validate(self, num_stages: int) -> None:
        if self.verify not in VERIFY:
            raise ConfigError(f"defense.verify={self.verify!r} is unknown; use none or duplicate")
        if self.recovery not in RECOVERY:
            raise ConfigError(f"defense.recovery={self.recovery!r} is unknown; use "
                              f"{', '.join(RECOVERY)}")
        if self.rtol < 0 or self.atol < 0:
            raise ConfigError("defense.rtol and defense.atol must be >= 0")
        if self.max_retries < 0 or self.quarantine_after < 0:
            raise ConfigError("defense.max_retries and defense.quarantine_after must be >= 0")
        if self.verify == "none" and (self.recovery == "restart" or self.quarantine_after):
            raise ConfigError(
                "defense.recovery=restart and defense.quarantine_after need alerts to act on: "
                "set defense.verify=duplicate"
            )
        if self.verify == "duplicate" and num_stages < 3:
            raise ConfigError(
                f"defense.verify=duplicate needs at least 3 stages (pipeline.stages={num_stages}): "
                "a middle stage to check, a next stage to check it, and a stage before it"
            )
