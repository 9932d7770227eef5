"""What the trainer asks of whatever oversees a run (the defense), and the run nobody watches.

The trainer records what an overseer says of each attempt, sums its per-stage tallies at the
end, and keeps its state in checkpoints; it knows nothing else of it."""

from __future__ import annotations

from typing import Protocol

import torch

from phalanx.pipeline import IterationResult


class Overseer(Protocol):
    """The trainer's view of a defense."""

    def describe(self, res: IterationResult) -> dict:
        """What it saw and decided in one attempt, for the metrics."""
        ...

    def tally(self, stage: int) -> torch.Tensor | None:
        """Stage ``stage``'s running tally (a float64 vector), for :meth:`totals`."""
        ...

    def totals(self, tallies: list[torch.Tensor]) -> dict | None:
        """The run's totals from every stage's tally, for the summary."""
        ...

    def state(self) -> dict:
        """What a checkpoint must keep of it (JSON)."""
        ...

    def restore(self, manifest: dict) -> None:
        """Take back what :meth:`state` kept, from a checkpoint's manifest."""
        ...


class Unwatched:
    """No overseer: nothing to describe, tally or keep."""

    def describe(self, res: IterationResult) -> dict:
        return {}

    def tally(self, stage: int) -> torch.Tensor | None:
        return None

    def totals(self, tallies: list[torch.Tensor]) -> dict | None:
        return None

    def state(self) -> dict:
        return {}

    def restore(self, manifest: dict) -> None:
        return None
