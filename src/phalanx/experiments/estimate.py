"""How long a grid will take here, measured rather than guessed: two iterations of its first
cell on this host, scaled by the tokens of every run and what each defense costs per token."""

from __future__ import annotations

import time

import torch

from phalanx.experiments.robustness import Spec, overrides
from phalanx.experiments.scoring import Cell

# Time per token of a defended run relative to an undefended one (measured on SmolLM2 in 6
# stages, results/robustness: the duplicated block 1.35x; restart redoes a share of the
# iterations on top).
COST = {"none": 1.0, "skip": 1.4, "repair": 1.4, "restart": 2.2}
EVAL_SHARE = 0.1  # evaluations, start-up and the session's model loads, on top of training


def probe_step_s(spec: Spec, steps: int = 2) -> float:
    """Seconds per training iteration of the spec's clean run on this host (the second of two
    iterations: the first pays for allocation and kernel selection)."""
    from pathlib import Path
    from tempfile import TemporaryDirectory

    from phalanx.config import load_config
    from phalanx.train import Config
    from phalanx.train.setup import build_pipeline

    with TemporaryDirectory() as tmp:
        cfg = load_config(Config, None, overrides(spec, Cell("clean", 0.0, "none"), Path(tmp)))
    cfg.pipeline.runtime = "local"  # the probe runs here, all stages in this process
    pipe = build_pipeline(cfg, steps)
    batch = torch.randint(0, pipe.loaded.tokenizer.vocab_size, (spec.batch_size, spec.seq_len))
    times = []
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            pipe.runtime.train_step(step, batch)
            times.append(time.perf_counter() - t0)
    finally:
        pipe.runtime.close()
    return min(times[1:] or times)


def grid_seconds(spec: Spec, cells: list[Cell], step_s: float) -> float:
    """Estimated wall time of ``cells`` given one clean iteration's ``step_s``."""
    per_run = [spec.steps * step_s * COST[c.defense] for c in cells]
    return sum(per_run) * (1.0 + EVAL_SHARE)
