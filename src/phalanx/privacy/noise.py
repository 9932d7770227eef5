"""Defenses at the cut: noise on what stage 0 sends, plain or DP-Forward-calibrated.

- :func:`add_noise`: Gaussian noise of ``sigma`` times each token's hidden-state RMS (a
  utility-first heuristic with no privacy guarantee).
- :class:`DPForward`: clip each token's hidden state to L2 norm ``clip``, then add Gaussian
  noise of std ``noise_multiplier * clip`` per coordinate (the Gaussian mechanism of
  DP-Forward, CCS'23, in its per-row form); :meth:`DPForward.epsilon` accounts for it with a
  maintained library (:mod:`phalanx.privacy.accounting`).
- :class:`NoisyCut`: wraps stage 0 (any module) so that its output goes through a mechanism,
  for an experiment that trains or attacks through the defense.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.errors import ConfigError
from phalanx.privacy.cut import validate_sigma


def token_rms(hidden: torch.Tensor) -> torch.Tensor:
    """RMS of each token's hidden state (..., 1) over its channels."""
    return hidden.detach().float().pow(2).mean(-1, keepdim=True).sqrt()


def gaussian(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal float32 noise of ``like``'s shape on its device (drawn from
    ``generator`` on the generator's device, then moved)."""
    if generator is None:
        return torch.randn(like.shape, dtype=torch.float32, device=like.device)
    noise = torch.randn(like.shape, generator=generator, dtype=torch.float32,
                        device=generator.device)
    return noise.to(like.device)


def add_noise(hidden: torch.Tensor, sigma: float,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """``hidden`` (..., C) plus Gaussian noise of std ``sigma`` times each token's RMS."""
    sigma = validate_sigma(sigma)
    if sigma == 0:
        return hidden
    noise = gaussian(hidden, generator)
    return hidden + (noise * token_rms(hidden) * sigma).to(hidden.dtype)


def clip_tokens(hidden: torch.Tensor, clip: float) -> torch.Tensor:
    """Each token's hidden state (..., C) scaled down to L2 norm at most ``clip``."""
    norms = hidden.float().norm(dim=-1, keepdim=True)
    return hidden * (clip / norms.clamp_min(1e-12)).clamp(max=1.0).to(hidden.dtype)


@dataclass(kw_only=True)
class DPForward:
    """Per-token clipping to ``clip`` plus Gaussian noise of std ``noise_multiplier * clip``."""

    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        self.clip = validate_sigma(self.clip, "clip")
        self.noise_multiplier = validate_sigma(self.noise_multiplier, "noise_multiplier")
        if self.clip == 0:
            raise ConfigError("privacy clip=0 must be positive (the largest token norm sent)")

    @property
    def sigma(self) -> float:
        """Std of the noise added to each coordinate."""
        return self.noise_multiplier * self.clip

    def __call__(self, hidden: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        clipped = clip_tokens(hidden, self.clip)
        noise = gaussian(hidden, generator)
        return clipped + (noise * self.sigma).to(hidden.dtype)

    def sensitivity(self, unit: str = "sequence", seq_len: int = 1) -> float:
        """L2 sensitivity of one release under replace-one adjacency: ``2 * clip`` when one
        token changes one row only (``unit="token"``: true at cut 0 alone, since later layers
        mix tokens), ``2 * clip * sqrt(seq_len)`` when a whole sequence changes."""
        if unit == "token":
            return 2 * self.clip
        if unit == "sequence":
            if seq_len < 1:
                raise ConfigError(f"privacy seq_len={seq_len} must be at least 1")
            return 2 * self.clip * seq_len ** 0.5
        raise ConfigError(f"privacy unit={unit!r} is unknown; use token or sequence")

    def epsilon(self, *, steps: int, delta: float, unit: str = "sequence", seq_len: int = 1,
                sample_rate: float = 1.0) -> float:
        """Epsilon after each protected unit is released ``steps`` times (e.g. epochs), at
        ``delta``; ``sample_rate`` < 1 claims Poisson-subsampling amplification, valid only
        if batches are sampled so and the observer cannot tell which examples are in one."""
        from phalanx.privacy.accounting import gaussian_epsilon

        if self.noise_multiplier == 0:
            return float("inf")
        z = self.sigma / self.sensitivity(unit, seq_len)
        return gaussian_epsilon(z, steps=steps, delta=delta, sample_rate=sample_rate)


Mechanism = Callable[[torch.Tensor], torch.Tensor]


class NoisyCut(nn.Module):
    """``inner`` (stage 0) followed by ``mechanism`` on its output: what stage 1 then gets.

    Gradients flow through the mechanism (identity for the noise, the clip's own derivative),
    so the data owner can train through it.
    """

    def __init__(self, inner: nn.Module, mechanism: Mechanism) -> None:
        super().__init__()
        self.inner = inner
        self.mechanism = mechanism

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mechanism(self.inner(x))


def gaussian_cut(sigma: float, seed: int | None = None) -> Mechanism:
    """:func:`add_noise` at ``sigma`` as a mechanism for :class:`NoisyCut` (seeded if given)."""
    sigma = validate_sigma(sigma)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return lambda h: add_noise(h, sigma, generator=gen)
