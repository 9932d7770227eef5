"""What a stage did in an iteration, and stage 0's view of the whole iteration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from phalanx.pipeline.verdict import Verdict
from phalanx.wire import FrameError

REPORT_FIELDS = ("loss_sum", "loss_count", "compute_s", "wait_s", "tokens")


@dataclass
class StageStats:
    """What a stage did in one iteration."""

    loss_sum: float = 0.0
    loss_count: int = 0
    compute_s: float = 0.0  # forward and backward (the optimizer step is not counted)
    wait_s: float = 0.0
    tokens: int = 0

    def as_tensor(self) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in REPORT_FIELDS], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StageStats:
        if t.shape != (len(REPORT_FIELDS),) or not t.dtype.is_floating_point:
            raise FrameError(
                f"a report has shape {tuple(t.shape)} {t.dtype}, expected "
                f"({len(REPORT_FIELDS)},) float64"
            )
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise FrameError("a report holds a negative or non-finite value")
        v = t.tolist()
        return cls(loss_sum=v[0], loss_count=int(v[1]), compute_s=v[2], wait_s=v[3],
                   tokens=int(v[4]))


@dataclass
class IterationResult:
    """Stage 0's view of a finished iteration: every stage's statistics and the global norm."""

    stats: list[StageStats] = field(default_factory=list)
    grad_norm: float = float("nan")
    reports: torch.Tensor | None = None  # (n, report size): what each stage's overseer said
    verdict: Verdict = field(default_factory=Verdict)
    # [reporter, sender] frames refused in the iteration (malformed, replayed, out of order,
    # too far ahead): what each stage reports against its peers, unverified (the reporter is
    # as untrusted as the sender; signed evidence is the coordinator's to check)
    refused: torch.Tensor | None = None

    @property
    def skipped(self) -> bool:
        """Whether the optimizer step was skipped: the gradients were not finite, or the
        coordinator discarded the iteration."""
        return self.verdict.discard or not math.isfinite(self.grad_norm)

    @property
    def loss(self) -> float:
        """The last stage's loss: only it computes one (and it is the data owner's; what a
        middle stage reports as a loss is not believed)."""
        last = self.stats[-1] if self.stats else StageStats()
        return last.loss_sum / last.loss_count if last.loss_count else float("nan")
