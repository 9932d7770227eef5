"""Runtimes: drive the stage workers through iterations. Local = all stages in this process."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch

from phalanx.comm import Channel, LocalFabric
from phalanx.comm.channel import Sealer
from phalanx.comm.device import on_device
from phalanx.models.stages import StageModule, set_precision
from phalanx.pipeline.config import PipelineConfig
from phalanx.pipeline.devices import stage_devices
from phalanx.pipeline.optim import OptimConfig, StageOptimizer
from phalanx.pipeline.schedule import Action, eval_actions, replica_sync, train_actions
from phalanx.pipeline.stats import IterationResult
from phalanx.pipeline.worker import StageWorker
from phalanx.wire import DEFAULT_LIMITS, Limits

Wrap = Callable[[StageModule, dict[int, Channel]], dict[int, Channel]]
"""A hook that wraps a stage's links (attacks, fault injection, verification) before use."""

Attach = Callable[[StageWorker], None]
"""A hook that plugs into a worker's oversight seams (alerts, coordinator, verdicts)."""


def no_wrap(stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
    return channels


def no_attach(worker: StageWorker) -> None:
    return None


def split_micro(batch: torch.Tensor, micro: int) -> list[torch.Tensor]:
    """Cut a batch (B, T) into ``micro`` equal micro-batches."""
    if batch.shape[0] % micro:
        raise ValueError(f"batch of {batch.shape[0]} does not split into {micro} micro-batches")
    return list(batch.chunk(micro))


class Runtime(ABC):
    """Runs iterations of the pipeline; results are reported where stage 0 lives."""

    def __init__(self, cfg: PipelineConfig, num_stages: int, tied: bool) -> None:
        self.cfg = cfg
        self.num_stages = num_stages
        self.tied = tied
        self._replica_stale = False  # stage 0 stepped the tied weights; the last stage's copy lags

    @property
    @abstractmethod
    def workers(self) -> list[StageWorker]:
        """The workers of the stages in this process."""

    @property
    def is_driver(self) -> bool:
        """True in the process that holds stage 0 (and so the data and the results)."""
        return any(w.me == 0 for w in self.workers)

    def plan(self, stage: int, step: bool = True) -> list[Action]:
        """Actions of one training iteration of ``stage``."""
        return train_actions(self.cfg.schedule, stage, self.num_stages, self.cfg.micro_batches,
                             self.tied, step=step, frozen_front=self.cfg.frozen_front)

    def _sync_first(self, stage: int) -> list[Action]:
        """The replica update a plan starts with, if the last step left the replica behind."""
        return replica_sync(stage, self.num_stages, self.tied) if self._replica_stale else []

    def sync_replicas(self, step: int) -> None:
        """Bring replicas of tied weights up to date now (before a checkpoint or an inspection;
        iterations do it themselves, overlapped with the pipeline fill)."""
        if not self._replica_stale:
            return
        plans = {w.me: self._sync_first(w.me) for w in self.workers}
        self._replica_stale = False
        self._iterate(step, 0, [] if self.is_driver else None, True, plans)

    def train_step(self, step: int, batch: torch.Tensor | None, *, optimize: bool = True
                   ) -> IterationResult | None:
        """One iteration on ``batch`` (needed on the driver only); ``optimize=False`` stops
        before the optimizer step, leaving the reduced gradients on the parameters."""
        M = self.cfg.micro_batches
        inputs = split_micro(batch, M) if batch is not None else None
        plans = {w.me: self._sync_first(w.me) + self.plan(w.me, step=optimize)
                 for w in self.workers}
        self._replica_stale = optimize and self.tied and self.num_stages > 1
        return self._iterate(step, M, inputs, True, plans)

    def evaluate(self, batches: list[torch.Tensor] | None, step: int = 0) -> float | None:
        """Mean validation loss over ``batches`` (forward only); ``None`` off the driver."""
        inputs = None
        if batches is not None:
            inputs = [mb for b in batches for mb in split_micro(b, self.cfg.micro_batches)]
        count = self.agree(len(inputs) if inputs is not None else 0)
        plans = {w.me: self._sync_first(w.me) + eval_actions(w.me, count) for w in self.workers}
        self._replica_stale = False
        result = self._iterate(step, count, inputs, False, plans)
        return result.loss if result is not None else None

    @abstractmethod
    def _iterate(self, step: int, micro: int, inputs: list[torch.Tensor] | None, train: bool,
                 plans: dict[int, list[Action]]) -> IterationResult | None:
        """Run one iteration with the given per-stage plans."""

    def agree(self, value: int) -> int:
        """The driver's ``value``, known to every process."""
        return value

    def gather(self, values: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        """Per-stage tensors of every process, collected at the driver (``None`` elsewhere)."""
        return values

    def barrier(self) -> None:
        """Wait until every process reaches this point."""

    def close(self) -> None:
        """Release links and processes."""


def simulate(workers: list[StageWorker], plans: dict[int, list[Action]]) -> None:
    """Run every worker's plan in one thread, each action as soon as its frames have arrived.

    Deterministic: workers are visited in stage order; a pass without progress is a schedule
    deadlock and raises.
    """
    pos = {w.me: 0 for w in workers}
    while True:
        progress = False
        done = True
        for w in workers:
            plan = plans[w.me]
            while pos[w.me] < len(plan) and w.ready(plan[pos[w.me]]):
                w.execute(plan[pos[w.me]])
                pos[w.me] += 1
                progress = True
            done &= pos[w.me] == len(plan)
        if done:
            return
        if not progress:
            stuck = {w.me: plans[w.me][pos[w.me]] for w in workers if pos[w.me] < len(plans[w.me])}
            refused = {w.me: w.rejected for w in workers if w.rejected}
            raise RuntimeError(f"pipeline schedule deadlock; waiting actions: {stuck}"
                               + (f"; frames refused, by receiver and sender: {refused}"
                                  if refused else ""))


class LocalRuntime(Runtime):
    """All stages in this process, stepped by :func:`simulate`: the research simulator."""

    def __init__(self, stages: list[StageModule], cfg: PipelineConfig, optim: OptimConfig,
                 total_steps: int, wrap: Wrap = no_wrap, attach: Attach = no_attach,
                 limits: Limits = DEFAULT_LIMITS,
                 sealer: Callable[[int, int], Sealer] | None = None) -> None:
        super().__init__(cfg, len(stages), tied=any(s.tied for s in stages))
        fabric = LocalFabric(len(stages), limits, sealer)
        for s, device in zip(stages, stage_devices(cfg.device, len(stages)), strict=True):
            s.to(device)
            set_precision(s, cfg.precision)
        self._workers = [
            StageWorker(s, wrap(s, on_device(fabric.channels(s.index), _device_of(s))),
                        StageOptimizer(s, optim, total_steps, exclude=s.replicas()),
                        timeout=None, dtype=_dtype_of(s), frozen_front=cfg.frozen_front)
            for s in stages
        ]
        for w in self._workers:
            attach(w)

    @property
    def workers(self) -> list[StageWorker]:
        return self._workers

    def _iterate(self, step, micro, inputs, train, plans):  # noqa: ANN001, ANN202
        for w in self._workers:
            w.begin(step, micro, inputs if w.me == 0 else None, train)
        simulate(self._workers, plans)
        return self._workers[0].result


def _dtype_of(stage: StageModule) -> torch.dtype:
    return next(stage.parameters()).dtype


def _device_of(stage: StageModule) -> torch.device:
    return next(stage.parameters()).device
