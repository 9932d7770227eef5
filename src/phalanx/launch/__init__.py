"""Launching stage processes on one machine, and the stages' side of it."""

from phalanx.launch.status import StageStatus, join_launcher
from phalanx.launch.supervisor import Launch, spawn

__all__ = ["Launch", "StageStatus", "join_launcher", "spawn"]
