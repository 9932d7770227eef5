"""Victims whose first layers drifted from the public weights the attacker holds.

The exact search assumes the victim's stage 0 runs the public pretrained layers; a data owner
who fine-tuned or perturbed them breaks that assumption. These helpers make such a victim: a
deep copy of the model with its embedding and first ``cut`` layers perturbed by Gaussian noise
(relative to each tensor's RMS) or moved by a few SGD steps on the victim's own text.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from phalanx.models.stages import blocks_of, embedding_of, lm_loss
from phalanx.privacy.cut import validate_cut, validate_sigma


def _front(model: nn.Module, family: str, cut: int) -> list[nn.Parameter]:
    blocks = blocks_of(model, family)
    validate_cut(cut, len(blocks))
    params = list(embedding_of(model, family).parameters())
    for block in blocks[:cut]:
        params.extend(block.parameters())
    return params


def perturbed_copy(model: nn.Module, family: str, cut: int, rel_std: float,
                   seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose embedding and layers ``[0, cut)`` get noise of ``rel_std``
    times each tensor's RMS (the rest is unchanged)."""
    rel_std = validate_sigma(rel_std, "rel_std")
    victim = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _front(victim, family, cut):
            rms = p.float().pow(2).mean().sqrt()
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.add_((noise * rms * rel_std).to(p.dtype))
    return victim


def finetuned_copy(model: nn.Module, family: str, cut: int, ids: torch.Tensor, *,
                   steps: int = 5, lr: float = 1e-3) -> nn.Module:
    """A copy of ``model`` after ``steps`` SGD steps of the LM loss on ``ids`` (B, T) that
    update only its embedding and layers ``[0, cut)``, as a data owner fine-tuning stage 0."""
    victim = copy.deepcopy(model)
    front = _front(victim, family, cut)
    for p in victim.parameters():
        p.requires_grad_(False)
    for p in front:
        p.requires_grad_(True)
    opt = torch.optim.SGD(front, lr=lr)
    victim.train()
    for _ in range(steps):
        opt.zero_grad()
        lm_loss(victim(ids).logits, ids).backward()
        opt.step()
    victim.eval()
    for p in victim.parameters():
        p.requires_grad_(True)
    return victim
