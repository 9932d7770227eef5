"""An iteration as the coordinator has it done: attempts until one is kept."""

from __future__ import annotations

import torch

from phalanx.pipeline import IterationResult
from phalanx.pipeline.runtime import Runtime
from phalanx.threats import AttackPlan


def attempts(runtime: Runtime, attack: AttackPlan, step: int, batch: torch.Tensor | None,
             max_retries: int, optimize: bool = True
             ) -> list[tuple[IterationResult | None, frozenset[int]]]:
    """Iteration ``step``, redone while the coordinator discards it (at most ``max_retries``
    times, then the iteration is dropped: nobody stepped); every attempt's result (``None``
    off the driver) and the stages that attacked in it. A redone attempt draws the attack
    afresh."""
    out: list[tuple[IterationResult | None, frozenset[int]]] = []
    attack.attempt = 0
    while True:
        if not optimize:  # no step cleared what the discarded attempt left on the parameters
            for w in runtime.workers:
                w.stage.zero_grad(set_to_none=True)
        res = runtime.train_step(step, batch, optimize=optimize)
        out.append((res, attack.malicious(step)))
        if not runtime.workers[0].verdict.discard or attack.attempt >= max_retries:
            return out
        attack.attempt += 1
