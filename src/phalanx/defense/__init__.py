"""Defenses: verification of what stages send, the coordinator, recovery."""

from phalanx.defense.config import DefenseConfig
from phalanx.defense.coordinator import Coordinator
from phalanx.defense.screen import EMA, Screen, ScreenConfig, cosine
from phalanx.defense.tolerance import Tolerance
from phalanx.defense.wiring import Duplicate

__all__ = ["EMA", "Coordinator", "DefenseConfig", "Duplicate", "Screen", "ScreenConfig",
           "Tolerance", "cosine"]
