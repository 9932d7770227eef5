"""The distributed runtime: one stage per process over torch.distributed, started by torchrun."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from phalanx.comm.device import on_device
from phalanx.comm.dist import dist_channels
from phalanx.errors import PhalanxError
from phalanx.models.stages import StageModule, set_precision
from phalanx.pipeline.config import PipelineConfig
from phalanx.pipeline.devices import choose_backend, stage_devices, wire_device
from phalanx.pipeline.optim import OptimConfig, StageOptimizer
from phalanx.pipeline.runtime import Attach, Runtime, Wrap, no_attach, no_wrap
from phalanx.pipeline.worker import StageWorker

GROUP_TIMEOUT = timedelta(days=7)


def under_launcher() -> bool:
    """True when this process was started by torchrun (or ``phalanx launch``)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(cfg: PipelineConfig) -> tuple[int, int, torch.device]:
    """Join the process group the launcher set up; returns (rank, world size, this stage's
    device). The backend follows from the devices: NCCL only when every stage has a GPU of its
    own, gloo (through host memory) otherwise."""
    if not dist.is_initialized():
        if not under_launcher():
            raise PhalanxError(
                "pipeline.runtime=distributed needs the processes started by `phalanx train`, "
                "`phalanx launch` or torchrun"
            )
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    if world != cfg.stages:
        raise PhalanxError(
            f"{world} processes were launched for pipeline.stages={cfg.stages}: "
            "launch one per stage"
        )
    devices = stage_devices(cfg.device, cfg.stages)
    if not dist.is_initialized():
        # gloo (and NCCL's watchdog) end a process whose receive waits longer than the group's
        # timeout; a link can be idle for a whole run (stage 1 never hears from stage 5), so
        # the group gets a long timeout and every wait phalanx makes is bounded by
        # pipeline.timeout_s instead.
        dist.init_process_group(choose_backend(cfg.backend, devices), timeout=GROUP_TIMEOUT)
    rank = dist.get_rank()
    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cfg.threads or max(1, cores // world))
    return rank, world, device


class DistributedRuntime(Runtime):
    """This process's stage, talking to its peers through :class:`DistChannel` links."""

    def __init__(self, stage: StageModule, cfg: PipelineConfig, optim: OptimConfig,
                 total_steps: int, device: torch.device, *, tied: bool, wrap: Wrap = no_wrap,
                 attach: Attach = no_attach, owns_group: bool = True) -> None:
        # ``tied`` is the model's, not this stage's: every rank must take the same collective
        # decisions (a middle stage holds no tied weight but still joins the replica sync).
        super().__init__(cfg, stage.num_stages, tied=tied)
        self.rank = dist.get_rank()
        stage.to(device)
        set_precision(stage, cfg.precision)
        links = dist_channels(self.rank, dist.get_world_size(),
                              device=wire_device(dist.get_backend(), device))
        channels = wrap(stage, on_device(links, device))
        opt = StageOptimizer(stage, optim, total_steps, exclude=stage.replicas())
        self._worker = StageWorker(stage, channels, opt,
                                   timeout=cfg.timeout_s, dtype=next(stage.parameters()).dtype)
        attach(self._worker)
        self._tag = 0
        self.owns_group = owns_group  # False: the group outlives this run (a session of runs)

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
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

