"""Where each stage computes, and which torch.distributed backend can carry its tensors.

``pipeline.device`` is ``auto`` (the GPUs when there are any, else the CPU), ``cpu``, ``cuda``
(stage i on GPU i mod the GPU count: several stages may share one GPU) or ``cuda:N`` (every
stage on GPU N). NCCL only carries tensors between ranks that each have a GPU of their own; in
every other case the links are gloo and tensors travel through host memory. Everything here is
decided from the config and the host, so every rank reaches the same answer.
"""

from __future__ import annotations

import torch

from phalanx.errors import ConfigError


def gpu_count() -> int:
    """CUDA GPUs visible to this process (0 on a CPU build of torch)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def stage_devices(spec: str, num_stages: int, gpus: int | None = None) -> list[torch.device]:
    """The device of every stage under ``pipeline.device=spec`` on a host with ``gpus`` GPUs;
    raises :class:`ConfigError` naming the fix when the host cannot do what ``spec`` asks."""
    gpus = gpu_count() if gpus is None else gpus
    s = spec.strip().lower()
    if s == "auto":
        s = "cuda" if gpus else "cpu"
    if s == "cpu":
        return [torch.device("cpu")] * num_stages
    if s == "cuda" or s.startswith("cuda:"):
        if gpus == 0:
            raise ConfigError(f"pipeline.device={spec} but this host has no CUDA GPU (or torch "
                              "was built for CPU only): use pipeline.device=cpu or auto")
        if s == "cuda":
            return [torch.device("cuda", i % gpus) for i in range(num_stages)]
        index = s.split(":", 1)[1]
        if not index.isdigit():
            raise ConfigError(f"pipeline.device={spec} is not a device: use auto, cpu, cuda or "
                              "cuda:N")
        if int(index) >= gpus:
            raise ConfigError(f"pipeline.device={spec} but this host has {gpus} GPU(s), "
                              f"cuda:0 to cuda:{gpus - 1}: pick one of them, or cuda to spread "
                              "the stages over all")
        return [torch.device("cuda", int(index))] * num_stages
    raise ConfigError(f"pipeline.device={spec!r} is unknown: use auto, cpu, cuda or cuda:N")


def own_gpus(devices: list[torch.device]) -> bool:
    """Whether every stage has a GPU to itself (what NCCL point-to-point needs)."""
    return all(d.type == "cuda" for d in devices) and len(set(devices)) == len(devices)


def choose_backend(backend: str, devices: list[torch.device]) -> str:
    """``gloo`` or ``nccl`` for ``pipeline.backend=backend`` with these stage devices."""
    if backend == "auto":
        return "nccl" if own_gpus(devices) and torch.distributed.is_nccl_available() else "gloo"
    if backend == "nccl" and not own_gpus(devices):
        where = ", ".join(str(d) for d in devices)
        raise ConfigError(f"pipeline.backend=nccl needs one GPU per stage, but the stages run on "
                          f"{where}: use pipeline.backend=gloo (or auto), which stages tensors "
                          "through host memory")
    return backend


def wire_device(backend: str, device: torch.device) -> torch.device:
    """Where a link's buffers live: the GPU for NCCL, host memory for gloo."""
    return device if backend == "nccl" else torch.device("cpu")
