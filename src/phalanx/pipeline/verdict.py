"""What the coordinator decides each iteration, and the seam it plugs into.

Every stage reports the alerts it raised in an iteration with its gradient norm; stage 0 hands
them to a :class:`Coordinator` (if one is installed) and sends the resulting :class:`Verdict`
back with the global norm, so every stage knows it before its optimizer step. The engine only
carries the numbers; what an alert means and what to decide is the defense's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from phalanx.wire import FrameError


@dataclass(frozen=True)
class Verdict:
    """The coordinator's decision for one iteration."""

    frozen: frozenset[int] = frozenset()  # stages (and their replicas) that skip this update
    quarantined: frozenset[int] = frozenset()  # stages bypassed from the next iteration on
    discard: bool = False  # drop the iteration: nobody steps, the schedule does not advance
    blamed: frozenset[int] = frozenset()  # the stages named as culprits this iteration

    def encode(self, n: int) -> torch.Tensor:
        """As float64 [frozen mask (n), quarantined mask (n), blamed mask (n), discard]."""
        t = torch.zeros(3 * n + 1, dtype=torch.float64)
        for k, group in enumerate((self.frozen, self.quarantined, self.blamed)):
            for s in group:
                t[k * n + s] = 1.0
        t[3 * n] = float(self.discard)
        return t

    @classmethod
    def decode(cls, t: torch.Tensor, n: int) -> Verdict:
        """Parse :meth:`encode`'s layout; anything but 0/1 masks of the right size is refused."""
        if t.shape != (3 * n + 1,) or not bool(((t == 0) | (t == 1)).all()):
            raise FrameError(f"a verdict must be {3 * n + 1} zeros and ones, got {tuple(t.shape)}")
        masks = [frozenset(int(i) for i in torch.nonzero(t[k * n:(k + 1) * n]).reshape(-1))
                 for k in range(3)]
        return cls(frozen=masks[0], quarantined=masks[1], blamed=masks[2],
                   discard=bool(t[3 * n]))


class Coordinator(Protocol):
    """The trusted central server's decision procedure (runs where stage 0 runs)."""

    def decide(self, step: int, alerts: torch.Tensor) -> Verdict:
        """The verdict of iteration ``step`` given ``alerts[verifier, suspect]`` counts."""
        ...
