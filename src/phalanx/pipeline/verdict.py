"""What stage 0 decides each iteration, and the seam an overseer plugs into.

Every stage sends stage 0 its squared gradient norm, the frames it refused this iteration and a
report of fixed size that an installed overseer defines (the defense's alerts, say). Stage 0
hands them to the :class:`Coordinator` (if one is installed) and sends the resulting
:class:`Verdict` back with the global norm, so every stage knows it before its optimizer step.
The engine acts on two fields only: which stages keep their weights and whether the iteration is
discarded; the payload belongs to the overseer (its hooks decode it on every stage).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from phalanx.wire import FrameError


@dataclass(frozen=True)
class Verdict:
    """Stage 0's decision for one iteration."""

    frozen: frozenset[int] = frozenset()  # stages that keep their weights this update
    discard: bool = False  # drop the iteration: nobody steps, the schedule does not advance
    payload: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    # the global squared norm to clip by, where the coordinator vouches for one (else stage 0
    # sums what the stages that step reported); travels in the norm frame, not in encode()
    norm_sq: float | None = None

    def encode(self, n: int) -> torch.Tensor:
        """As float64 [frozen mask (n), discard, payload]."""
        head = torch.zeros(n + 1, dtype=torch.float64)
        for s in self.frozen:
            head[s] = 1.0
        head[n] = float(self.discard)
        return torch.cat([head, self.payload.to(torch.float64).reshape(-1)])

    @classmethod
    def decode(cls, t: torch.Tensor, n: int) -> Verdict:
        """Parse :meth:`encode`'s layout; anything but 0/1 in the mask and flag is refused."""
        head = t[:n + 1]
        if t.dim() != 1 or t.numel() < n + 1 or not bool(((head == 0) | (head == 1)).all()):
            raise FrameError(f"a verdict must start with {n + 1} zeros and ones, got "
                             f"{tuple(t.shape)}")
        frozen = frozenset(int(i) for i in torch.nonzero(head[:n]).reshape(-1))
        return cls(frozen=frozen, discard=bool(head[n]), payload=t[n + 1:].clone())

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Verdict) and self.frozen == other.frozen
                and self.discard == other.discard and torch.equal(self.payload, other.payload)
                and self.norm_sq == other.norm_sq)

    __hash__ = None  # type: ignore[assignment]


@dataclass
class Oversight:
    """What stage 0 gathered in one iteration, for the coordinator to judge.

    Everything but row 0 (stage 0's own) was sent by the other stages: ``norms[p]`` is NaN
    where stage p's squared norm was not a finite non-negative number (or its frame was
    malformed), and such a stage is in ``invalid``."""

    step: int
    train: bool
    norms: list[float]
    invalid: frozenset[int]
    reports: torch.Tensor  # (n, report size): each stage's overseer report
    refused: torch.Tensor  # (n, n): [reporter, sender] frames refused by the transport
    tag: int = 0  # the attempt number, as frames' flags carry it


class Coordinator(Protocol):
    """The trusted central server's decision procedure (runs where stage 0 runs)."""

    def decide(self, seen: Oversight) -> Verdict:
        """The verdict of one iteration given what stage 0 gathered."""
        ...
