"""The scale shared by the experiments made of short runs in the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class ShortRuns:
    """SmolLM2 in 6 stages, a few iterations of small batches, one process."""

    model: str = "smollm2"
    stages: int = 6
    steps: int = 3
    batch_size: int = 2
    micro_batches: int = 2
    seq_len: int = 64
    seed: int = 0
    extra: list[str] = field(default_factory=list)  # config overrides for every run
