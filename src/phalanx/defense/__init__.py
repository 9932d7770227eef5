"""Defenses: verification of what stages send, the coordinator, recovery."""

from phalanx.defense.screen import EMA, Screen, ScreenConfig, cosine

__all__ = ["EMA", "Screen", "ScreenConfig", "cosine"]
