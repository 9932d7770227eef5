"""The optimizer step gated by the attempt's verdict (as torchft's ``OptimizerWrapper`` gates
``step`` on ``should_commit()``): the engine's one place where a verdict touches weights.

- a discarded attempt commits nothing and keeps the schedule where it is (it will be redone);
- the parameters the verdict freezes keep their weights and AdamW moments;
- a non-finite global norm (NaN/Inf anywhere in the pipeline's gradients) skips the update on
  every stage (all see the same norm) but advances the schedule;
- otherwise the gradients are clipped by the global norm and the step is taken.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from phalanx.pipeline.optim import StageOptimizer, clip_coefficient
from phalanx.pipeline.verdict import Verdict

Frozen = Callable[[Verdict], list[nn.Parameter]]


class VerdictGate:
    """Steps ``optimizer`` as a verdict allows; ``frozen(verdict)`` names what keeps its
    weights (by default the whole stage when the verdict freezes its index)."""

    def __init__(self, optimizer: StageOptimizer, stage: nn.Module, index: int) -> None:
        self.optimizer = optimizer
        self.frozen: Frozen = lambda v: list(stage.parameters()) if index in v.frozen else []

    def step(self, verdict: Verdict, global_norm: float) -> None:
        opt = self.optimizer
        opt.step(clip_coefficient(global_norm, opt.cfg.clip),
                 skip=verdict.discard or not math.isfinite(global_norm),
                 frozen=self.frozen(verdict), advance=not verdict.discard)
        opt.zero_grad()
