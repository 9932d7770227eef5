"""Who attacks, how, and how often."""

from __future__ import annotations

from dataclasses import dataclass, field

from phalanx.errors import ConfigError
from phalanx.threats.attacks import BACKWARD_ATTACKS, FORWARD_ATTACKS


@dataclass(kw_only=True)
class AttackConfig:
    """A poisoning attack on the middle stages (the first and last belong to the data owner)."""

    forward: str = "none"  # none | sign_flip | gaussian | gaussian_stats | uniform | scale | zero
    # | forged (a consistent pair: a'_out = stage(a'_in) for an arbitrary a'_in)
    backward: str = "none"  # none | gaussian | sign_flip | scale
    rate: float = 0.0  # probability that an iteration is attacked
    stages: list[int] = field(default_factory=list)  # malicious stages; empty = one random middle
    # stage per attacked iteration (the paper's setting)
    strength: float = 1.0  # σ of additive noise, or the factor of ``scale``
    seed: int = 0  # the attack's own randomness (which iterations, which stage, the noise)
    adaptive: str = "none"  # an attacker that uses every field it sends (threats.adaptive):
    # flag_forge | equivocate | false_evidence | empty_evidence | nan_evidence | false_alert |
    # frame_predecessor | frame_successor | nan_norm | negative_norm | huge_norm |
    # forged_report | eval_poison | drift | float16 | short | collude (attack.stages: two
    # adjacent stages)

    @property
    def active(self) -> bool:
        return self.rate > 0 and (self.forward != "none" or self.backward != "none"
                                  or self.adaptive != "none")

    @property
    def naive(self) -> bool:
        """Whether a poisoning of the paper's family (forward / backward) is set."""
        return self.active and (self.forward != "none" or self.backward != "none")

    def validate(self, num_stages: int) -> None:
        """Refuse contradictory settings with a message that names the fix."""
        forward = sorted([*FORWARD_ATTACKS, "forged"])
        if self.forward != "none" and self.forward not in forward:
            raise ConfigError(f"attack.forward={self.forward!r} is unknown; use none or one of "
                              f"{', '.join(forward)}")
        if self.backward != "none" and self.backward not in BACKWARD_ATTACKS:
            raise ConfigError(f"attack.backward={self.backward!r} is unknown; use none or one of "
                              f"{', '.join(sorted(BACKWARD_ATTACKS))}")
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError(f"attack.rate={self.rate} must be in [0, 1]")
        from phalanx.threats.adaptive import TACTICS

        if self.adaptive != "none" and self.adaptive not in TACTICS:
            raise ConfigError(f"attack.adaptive={self.adaptive!r} is unknown; use none or one "
                              f"of {', '.join(sorted(TACTICS))}")
        if self.adaptive != "none" and (self.forward != "none" or self.backward != "none"):
            raise ConfigError("attack.adaptive replaces attack.forward and attack.backward: "
                              "set those to none")
        if self.adaptive == "collude" and (len(self.stages) != 2
                                           or abs(self.stages[0] - self.stages[1]) != 1):
            raise ConfigError("attack.adaptive=collude needs attack.stages set to two adjacent "
                              f"middle stages, got {self.stages}")
        if not self.active:
            return
        if num_stages < 3:
            raise ConfigError(
                f"an attack needs a middle stage, and pipeline.stages={num_stages} has none: the "
                "first and last stages belong to the trusted data owner; use at least 3 stages"
            )
        bad = [s for s in self.stages if not 0 < s < num_stages - 1]
        if bad:
            raise ConfigError(
                f"attack.stages={self.stages}: stage(s) {bad} are not middle stages; the first (0) "
                f"and last ({num_stages - 1}) stages belong to the trusted data owner"
            )
        if "scale" in (self.forward, self.backward) and self.strength == 1.0:
            raise ConfigError("attack.strength=1.0 makes the scale attack change nothing; set "
                              "attack.strength to the factor (for example 10 or -1)")
