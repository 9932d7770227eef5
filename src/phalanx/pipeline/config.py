"""How the pipeline is cut, scheduled and run."""

from __future__ import annotations

from dataclasses import dataclass, field

from phalanx.errors import ConfigError
from phalanx.models.stages import PRECISIONS
from phalanx.pipeline.schedule import SCHEDULES

RUNTIMES = ("local", "distributed", "secure")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(kw_only=True)
class PipelineConfig:
    """Stages, schedule and runtime."""

    stages: int = 4
    boundaries: list[int] = field(default_factory=list)  # first layer of stages 1..N-1
    schedule: str = "1f1b"  # gpipe | 1f1b
    micro_batches: int = 4
    runtime: str = "local"  # local (all stages in one process) | distributed (one per process,
    # torch.distributed: trusted networks) | secure (one per process, TLS links: any network)
    device: str = "auto"  # auto (the GPUs if any, else CPU) | cpu | cuda (spread) | cuda:N
    backend: str = "auto"  # auto (nccl when each stage has a GPU of its own, else gloo) | gloo
    # | nccl
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights and optimizer state stay fp32)
    timeout_s: float = 300.0  # longest wait for a frame from a peer
    threads: int = 0  # torch threads per stage process; 0 = cores / stages
    frozen_front: int = 0  # derived (split): front stages that train nothing get no gradient

    def validate(self) -> None:
        if self.stages < 1:
            raise ConfigError(f"pipeline.stages={self.stages} must be at least 1")
        if self.micro_batches < 1:
            raise ConfigError(f"pipeline.micro_batches={self.micro_batches} must be at least 1")
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"pipeline.schedule={self.schedule!r} is unknown; use one of {', '.join(SCHEDULES)}"
            )
        if self.runtime not in RUNTIMES:
            raise ConfigError(
                f"pipeline.runtime={self.runtime!r} is unknown; use one of {', '.join(RUNTIMES)}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(
                f"pipeline.backend={self.backend!r} is unknown; use one of {', '.join(BACKENDS)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"pipeline.precision={self.precision!r} is unknown; use one of "
                              f"{', '.join(PRECISIONS)}")
        if self.timeout_s <= 0:
            raise ConfigError(f"pipeline.timeout_s={self.timeout_s} must be positive")
