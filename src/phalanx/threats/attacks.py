"""The poisoning maths: pure functions from an honest tensor to a corrupted one.

Forward attacks corrupt the activations a stage sends downstream; backward attacks corrupt the
gradient it sends upstream (paper 1: sign flip a' = -a, noise N(0, σ) added, noise
N(mean(x), std(x)), uniform replacement ``rand_like``, scaling, zeroing; backward: N(0, 1)
replacement, sign flip, scaling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Perturbation = Callable[[torch.Tensor, torch.Generator, float], torch.Tensor]


def sign_flip(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' = -a."""
    return -x


def gaussian_add(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' = a + N(0, σ²), σ = ``strength``."""
    return x + strength * torch.randn(x.shape, generator=g, dtype=x.dtype)


def gaussian_stats(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' ~ N(mean(a), std(a)²): noise that matches the first two moments of the message."""
    mean, std = x.mean(), x.std()
    return mean + std * torch.randn(x.shape, generator=g, dtype=x.dtype)


def uniform(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' ~ U[0, 1) (the public code's ``torch.rand_like``)."""
    return torch.rand(x.shape, generator=g, dtype=x.dtype)


def gaussian_replace(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' ~ N(0, 1) (the paper's backward attack)."""
    return torch.randn(x.shape, generator=g, dtype=x.dtype)


def scale(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' = k · a, k = ``strength``."""
    return x * strength


def zero(x: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """a' = 0."""
    return torch.zeros_like(x)


FORWARD_ATTACKS: dict[str, Perturbation] = {
    "sign_flip": sign_flip,
    "gaussian": gaussian_add,
    "gaussian_stats": gaussian_stats,
    "uniform": uniform,
    "scale": scale,
    "zero": zero,
}

BACKWARD_ATTACKS: dict[str, Perturbation] = {
    "gaussian": gaussian_replace,
    "sign_flip": sign_flip,
    "scale": scale,
}


def perturb(kind: str, name: str, x: torch.Tensor, g: torch.Generator,
            strength: float) -> torch.Tensor:
    """Apply forward (``kind="forward"``) or backward attack ``name`` to ``x``, on the CPU."""
    table = FORWARD_ATTACKS if kind == "forward" else BACKWARD_ATTACKS
    if name not in table:
        raise KeyError(f"unknown {kind} attack {name!r}; known: {', '.join(sorted(table))}")
    return table[name](x.detach().to("cpu"), g, strength).to(x.device, x.dtype)
