"""The ``[defense]`` section: verification, recovery, quarantine."""

from __future__ import annotations

import math
from dataclasses import dataclass

from phalanx.defense.tolerance import (
    CHECKS,
    MAX_RTOL,
    MODES,
    Tolerance,
    Tolerances,
    load_calibration,
)
from phalanx.errors import ConfigError

VERIFY = ("none", "duplicate")
SECOND = ("none", "replica")
MAX_RETRIES = 30
"""A step has at most 4 passes (its training and up to three evaluations), each with up to
1 + max_retries attempts: fewer than the 128 attempt numbers frames carry, so a signed frame
of one attempt is never mistaken for another's (:mod:`phalanx.defense.receipts`)."""
RECOVERY = ("skip", "repair", "restart", "none")  # the strategies of phalanx.defense.recovery


@dataclass(kw_only=True)
class DefenseConfig:
    """Verification of the middle stages and what the coordinator does about an alert."""

    verify: str = "none"  # none | duplicate (duplicated block + jumping connection)
    recovery: str = "skip"  # what to do with an attempt that named culprits: redo it with them
    # bypassed (skip layer) | redo it with their replicas' messages (repair) | redo it as it was
    # (restart) | keep it (none: alert only)
    tolerance: str = "bitwise"  # bitwise | rms | calibrated | measure (phalanx.defense.tolerance)
    rtol: float = 0.0  # tolerance=rms: max|a - b| <= atol + rtol * rms(a)
    atol: float = 0.0
    calibration: str = ""  # tolerance=calibrated: the file phalanx calibrate wrote
    second: str = "none"  # replica: stage s + 2 holds a second replica of s, which catches a
    # colluding adjacent pair (phalanx.defense.second)
    max_retries: int = 3  # redone attempts before an iteration (or evaluation) is dropped
    quarantine_after: int = 0  # quarantine a stage blamed this often in 2x as many steps; 0 never

    def tolerances(self, num_stages: int) -> Tolerances:
        """The tolerance of every check of every stage (see :mod:`phalanx.defense.tolerance`)."""
        if self.tolerance == "measure":
            return Tolerances(Tolerance(measure=True))
        if self.tolerance == "calibrated":
            table = load_calibration(self.calibration, num_stages)
            return Tolerances(table={c: tuple(Tolerance(rtol=r) for r in table[c])
                                     for c in CHECKS})
        return Tolerances(Tolerance(self.rtol, self.atol))

    def validate(self, num_stages: int) -> None:
        if self.verify not in VERIFY:
            raise ConfigError(f"defense.verify={self.verify!r} is unknown; use none or duplicate")
        if self.recovery not in RECOVERY:
            raise ConfigError(f"defense.recovery={self.recovery!r} is unknown; use "
                              f"{', '.join(RECOVERY)}")
        if self.tolerance not in MODES:
            raise ConfigError(f"defense.tolerance={self.tolerance!r} is unknown; use "
                              f"{', '.join(MODES)}")
        if not (self.rtol >= 0 and self.atol >= 0) or math.inf in (self.rtol, self.atol):
            raise ConfigError("defense.rtol and defense.atol must be finite and >= 0")
        if self.rtol >= MAX_RTOL:
            raise ConfigError(f"defense.rtol={self.rtol} is {MAX_RTOL:g} x the message's RMS or "
                              "more: such a tolerance checks nothing")
        if (self.rtol or self.atol) and self.tolerance != "rms":
            raise ConfigError(f"defense.rtol and defense.atol apply to defense.tolerance=rms "
                              f"(it is {self.tolerance!r})")
        if self.tolerance == "calibrated" and not self.calibration:
            raise ConfigError("defense.tolerance=calibrated needs defense.calibration=<file>: "
                              "write one from honest runs with phalanx calibrate")
        if self.calibration and self.tolerance != "calibrated":
            raise ConfigError("defense.calibration is read with defense.tolerance=calibrated "
                              f"(it is {self.tolerance!r})")
        if self.calibration:
            load_calibration(self.calibration, num_stages)
        if self.max_retries < 0 or self.quarantine_after < 0:
            raise ConfigError("defense.max_retries and defense.quarantine_after must be >= 0")
        if self.max_retries > MAX_RETRIES:
            raise ConfigError(f"defense.max_retries={self.max_retries} is more than "
                              f"{MAX_RETRIES}: a step's attempts must stay fewer than the "
                              "attempt numbers frames tell apart")
        if self.verify == "none" and (self.recovery == "restart" or self.quarantine_after):
            raise ConfigError(
                "defense.recovery=restart and defense.quarantine_after need alerts to act on: "
                "set defense.verify=duplicate"
            )
        if self.second not in SECOND:
            raise ConfigError(f"defense.second={self.second!r} is unknown; use none or replica")
        if self.second == "replica" and self.verify != "duplicate":
            raise ConfigError("defense.second=replica is a second replica of the duplicated "
                              "block: set defense.verify=duplicate")
        if self.second == "replica" and num_stages < 4:
            raise ConfigError(
                f"defense.second=replica needs at least 4 stages (pipeline.stages={num_stages}): "
                "with fewer, every middle stage's verifier is the trusted last stage, and no "
                "stage two further on can hold a second replica")
        if self.verify == "duplicate" and num_stages < 3:
            raise ConfigError(
                f"defense.verify=duplicate needs at least 3 stages (pipeline.stages={num_stages}): "
                "a middle stage to check, a next stage to check it, and a stage before it"
            )
