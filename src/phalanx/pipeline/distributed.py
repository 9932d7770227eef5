"""The distributed runtime: one stage per process over torch.distributed, started by torchrun."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from phalanx.comm.dist import dist_channels
from phalanx.errors import PhalanxError
from phalanx.models.stages import StageModule
from phalanx.pipeline.config import PipelineConfig
from phalanx.pipeline.devices import choose_backend, stage_devices, wire_device
from phalanx.pipeline.optim import OptimConfig
from phalanx.pipeline.process import ProcessRuntime, stage_threads
from phalanx.pipeline.runtime import Attach, Wrap, no_attach, no_wrap
from phalanx.wire import DEFAULT_LIMITS, Limits

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
    stage_threads(cfg)
    return rank, world, device


class DistributedRuntime(ProcessRuntime):
    """This process's stage over torch.distributed point-to-point links (trusted networks)."""

    def __init__(self, stage: StageModule, cfg: PipelineConfig, optim: OptimConfig,
                 total_steps: int, device: torch.device, *, tied: bool, wrap: Wrap = no_wrap,
                 attach: Attach = no_attach, owns_group: bool = True,
                 limits: Limits = DEFAULT_LIMITS) -> None:
        # ``tied`` is the model's, not this stage's: every rank must take the same collective
        # decisions (a middle stage holds no tied weight but still joins the replica sync).
        links = dist_channels(dist.get_rank(), dist.get_world_size(), limits,
                              device=wire_device(dist.get_backend(), device))
        super().__init__(stage, cfg, optim, total_steps, device, links, tied=tied, wrap=wrap,
                         attach=attach, on_close=_destroy_group if owns_group else None)


def _destroy_group() -> None:
    """The group's end, when this run created it (a session keeps it for its next run)."""
    if dist.is_initialized():
        dist.destroy_process_group()
