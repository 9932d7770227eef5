"""From a config to a running pipeline: load the model, cut it, start the runtime."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phalanx.comm import Channel
from phalanx.models import LoadedModel, StageModule, load_model, partition
from phalanx.pipeline import LocalRuntime, Runtime
from phalanx.threats import AttackPlan
from phalanx.threats.channel import poison
from phalanx.train.config import Config


@dataclass
class Pipeline:
    """A started runtime and the model it was cut from."""

    runtime: Runtime
    loaded: LoadedModel
    attack: AttackPlan


def wrapper(attack: AttackPlan):  # noqa: ANN201
    """The channel wrapping of a run: poisoning on the malicious stages' pipeline links."""

    def wrap(stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        return poison(channels, attack, stage) if attack.cfg.active else channels

    return wrap


def build_pipeline(cfg: Config, total_steps: int) -> Pipeline:
    """Load and cut the model, then start the runtime ``cfg.pipeline.runtime`` names."""
    cfg.validate()
    torch.manual_seed(cfg.train.seed)
    p = cfg.pipeline
    attack = AttackPlan(cfg.attack, p.stages)
    wrap = wrapper(attack)
    if p.runtime == "distributed":
        from phalanx.pipeline.distributed import DistributedRuntime, init_distributed

        rank, _, device = init_distributed(p)
        loaded = load_model(cfg.model)
        (stage,) = partition(loaded.model, loaded.family, p.stages, p.boundaries or None, only=rank)
        runtime: Runtime = DistributedRuntime(stage, p, cfg.optim, total_steps, device, wrap)
    else:
        loaded = load_model(cfg.model)
        stages = partition(loaded.model, loaded.family, p.stages, p.boundaries or None)
        runtime = LocalRuntime(stages, p, cfg.optim, total_steps, wrap)
    return Pipeline(runtime=runtime, loaded=loaded, attack=attack)
