"""From a config to a running pipeline: load the model, cut it, start the runtime."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phalanx.models import LoadedModel, load_model, partition
from phalanx.pipeline import LocalRuntime, Runtime
from phalanx.train.config import Config


@dataclass
class Pipeline:
    """A started runtime and the model it was cut from."""

    runtime: Runtime
    loaded: LoadedModel


def build_pipeline(cfg: Config, total_steps: int) -> Pipeline:
    """Load and cut the model, then start the runtime ``cfg.pipeline.runtime`` names."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    p = cfg.pipeline
    if p.runtime == "distributed":
        from phalanx.pipeline.distributed import DistributedRuntime, init_distributed

        rank, _, device = init_distributed(p)
        loaded = load_model(cfg.model)
        (stage,) = partition(loaded.model, loaded.family, p.stages, p.boundaries or None, only=rank)
        runtime: Runtime = DistributedRuntime(stage, p, cfg.optim, total_steps, device)
    else:
        loaded = load_model(cfg.model)
        stages = partition(loaded.model, loaded.family, p.stages, p.boundaries or None)
        runtime = LocalRuntime(stages, p, cfg.optim, total_steps)
    return Pipeline(runtime=runtime, loaded=loaded)
