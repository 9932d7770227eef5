"""Threats: poisoning attacks on what a stage sends, as wrappers around its outgoing channels."""

from phalanx.threats.attacks import BACKWARD_ATTACKS, FORWARD_ATTACKS, perturb
from phalanx.threats.channel import PoisonChannel
from phalanx.threats.config import AttackConfig
from phalanx.threats.plan import AttackPlan

__all__ = [
    "BACKWARD_ATTACKS",
    "FORWARD_ATTACKS",
    "AttackConfig",
    "AttackPlan",
    "PoisonChannel",
    "perturb",
]
