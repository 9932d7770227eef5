"""Screening: cheap statistics on every message a stage receives, against running averages.

A message (activations or gradients, (..., C)) is summarised by its norm and its mean vector
over all but the last dimension. After a warm-up, a message is suspicious when it holds NaN/Inf,
when its norm is more than ``z_max`` running standard deviations from the running mean norm, or
when its mean vector points away from the running mean direction (cosine below ``cos_min``:
a sign flip gives -1). Only clean messages update the running statistics, so an attacker cannot
drag them. No replica and no second computation are needed (in the spirit of SENTINEL); the
duplicated block is the exact check, screening the cheap one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class ScreenConfig:
    """Thresholds of the screen."""

    warmup: int = 8  # messages seen before anything but NaN/Inf can be flagged
    z_max: float = 6.0  # norm outlier threshold, in running standard deviations
    cos_min: float = 0.0  # lowest cosine between a message's mean and the running mean
    decay: float = 0.9  # EMA decay of the running statistics


class EMA:
    """Exponential moving mean and variance of a scalar (West's weighted update)."""

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.mean = 0.0
        self.var = 0.0
        self.count = 0

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean = x
        else:
            a = 1.0 - self.decay
            diff = x - self.mean
            self.mean += a * diff
            self.var = (1.0 - a) * (self.var + a * diff * diff)
        self.count += 1

    def z(self, x: float) -> float:
        """How many running standard deviations ``x`` lies from the running mean."""
        std = math.sqrt(self.var)
        return abs(x - self.mean) / max(std, 1e-12 * max(abs(self.mean), 1.0))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two vectors (0 when either is zero)."""
    na, nb = float(a.norm()), float(b.norm())
    return float(a.double() @ b.double()) / (na * nb) if na > 0 and nb > 0 else 0.0


class Screen:
    """Running statistics of one stream of messages (one link, one kind)."""

    def __init__(self, cfg: ScreenConfig | None = None) -> None:
        self.cfg = cfg or ScreenConfig()
        self.norm = EMA(self.cfg.decay)
        self.direction: torch.Tensor | None = None
        self.seen = 0

    def check(self, x: torch.Tensor) -> list[str]:
        """Reasons ``x`` is suspicious (empty when it looks honest); clean messages are learnt."""
        if not bool(torch.isfinite(x).all()):
            return ["non-finite values"]
        flat = x.detach().double().reshape(-1, x.shape[-1]) if x.dim() else x.double().reshape(1, 1)
        norm = float(flat.norm())
        mean = flat.mean(0)
        reasons = []
        if self.seen >= self.cfg.warmup:
            z = self.norm.z(norm)
            if z > self.cfg.z_max:
                reasons.append(f"norm {norm:.4g} is {z:.1f} running std from its mean "
                               f"{self.norm.mean:.4g}")
            c = cosine(mean, self.direction)
            if c < self.cfg.cos_min:
                reasons.append(f"mean direction has cosine {c:.2f} to the running mean "
                               f"(< {self.cfg.cos_min})")
        if not reasons:
            self.norm.update(norm)
            d = self.cfg.decay
            self.direction = mean if self.direction is None else d * self.direction + (1 - d) * mean
            self.seen += 1
        return reasons
