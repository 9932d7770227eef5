"""A runtime for one stage per process: the stage's worker, its links to every other stage,
and the between-iteration agreements (values, gathers, barriers) as control frames."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from phalanx.comm import Channel
from phalanx.comm.device import on_device
from phalanx.models.stages import StageModule, set_precision
from phalanx.pipeline.config import PipelineConfig
from phalanx.pipeline.optim import OptimConfig, StageOptimizer
from phalanx.pipeline.runtime import Attach, Runtime, Wrap, no_attach, no_wrap
from phalanx.pipeline.worker import StageWorker


def stage_threads(cfg: PipelineConfig) -> None:
    """Torch threads of a stage process: ``pipeline.threads``, or this host's cores shared
    among the stages (a single-host run puts them all here)."""
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.stages))


class ProcessRuntime(Runtime):
    """This process's stage, talking to its peers through ``links`` (one per other stage):
    torch.distributed links on a trusted cluster, TLS links elsewhere."""

    def __init__(self, stage: StageModule, cfg: PipelineConfig, optim: OptimConfig,
                 total_steps: int, device: torch.device, links: dict[int, Channel], *,
                 tied: bool, wrap: Wrap = no_wrap, attach: Attach = no_attach,
                 on_close: Callable[[], None] | None = None) -> None:
        # ``tied`` is the model's, not this stage's: every rank must take the same collective
        # decisions (a middle stage holds no tied weight but still joins the replica sync).
        super().__init__(cfg, stage.num_stages, tied=tied)
        self.rank = stage.index
        stage.to(device)
        set_precision(stage, cfg.precision)
        channels = wrap(stage, on_device(links, device))
        opt = StageOptimizer(stage, optim, total_steps, exclude=stage.replicas())
        self._worker = StageWorker(stage, channels, opt,
                                   timeout=cfg.timeout_s, dtype=next(stage.parameters()).dtype,
                                   frozen_front=cfg.frozen_front)
        attach(self._worker)
        self._tag = 0
        self._on_close = on_close  # what else the transport releases after the links

    @property
    def workers(self) -> list[StageWorker]:
        return [self._worker]

    def _iterate(self, step, micro, inputs, train, plans):  # noqa: ANN001, ANN202
        w = self._worker
        w.begin(step, micro, inputs, train)
        w.run(plans[w.me])
        return w.result if self.rank == 0 else None

    def _next_tag(self) -> int:
        self._tag += 1
        return self._tag

    def agree(self, value: int) -> int:
        tag, w = self._next_tag(), self._worker
        if self.rank == 0:
            for p in range(1, self.num_stages):
                w.send_control(p, tag, torch.tensor([value], dtype=torch.int64))
            return value
        return int(w.take_control(0, tag).reshape(-1)[0])

    def gather(self, values: dict[int, torch.Tensor]) -> dict[int, torch.Tensor] | None:
        tag, w = self._next_tag(), self._worker
        if self.rank != 0:
            w.send_control(0, tag, values[self.rank])
            return None
        out = {0: values[0]}
        for p in range(1, self.num_stages):
            out[p] = w.take_control(p, tag)
        return out

    def barrier(self) -> None:
        tag, w = self._next_tag(), self._worker
        token = torch.zeros(1, dtype=torch.uint8)
        if self.rank == 0:
            for p in range(1, self.num_stages):
                w.take_control(p, tag)
            for p in range(1, self.num_stages):
                w.send_control(p, tag, token)
        else:
            w.send_control(0, tag, token)
            w.take_control(0, tag)
        for ch in w.channels.values():
            ch.flush()

    def close(self) -> None:
        for ch in self._worker.channels.values():
            ch.close()  # flushes, says goodbye, waits (bounded) for the peer's goodbye
        if self._on_close is not None:
            self._on_close()

