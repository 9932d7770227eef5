"""Per-stage AdamW with a warm-up schedule, and clipping by the global gradient norm."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.errors import ConfigError

DECAYS = ("linear", "cosine", "constant")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW settings (paper 1: lr 5e-5, weight decay 0.01, linear warm-up, clip 1.0)."""

    lr: float = 5e-5
    weight_decay: float = 0.01  # applied to matrices only (not norms, biases)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 10
    decay: str = "linear"  # after warm-up: linear | cosine | constant
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of lr
    clip: float = 1.0  # max global gradient norm; 0 disables clipping

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr={self.lr} must be positive")
        if self.decay not in DECAYS:
            raise ConfigError(f"optim.decay={self.decay!r} is unknown; use one of {DECAYS}")
        if self.clip < 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("optim.clip, optim.warmup_steps and optim.weight_decay must be >= 0")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError("optim.beta1 and optim.beta2 must be in [0, 1)")


def lr_factor(step: int, total: int, warmup: int, decay: str, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay == "constant" or total <= warmup:
        return 1.0
    frac = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 1.0 - frac if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))
    return floor + (1.0 - floor) * shape


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """Scale for the gradients so their global norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``); 1.0 when clipping is off or not needed."""
    if max_norm <= 0 or not math.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices, none on vectors (norm weights, biases)."""
    seen: set[int] = set()
    decay, no_decay = [], []
    for _, p in named:
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class StageOptimizer:
    """AdamW over one stage's parameters, with the learning-rate schedule."""

    def __init__(self, module: nn.Module, cfg: OptimConfig, total_steps: int,
                 exclude: Iterable[nn.Parameter] = ()) -> None:
        self.cfg = cfg
        self.total_steps = total_steps
        skip = {id(p) for p in exclude}
        named = [(n, p) for n, p in module.named_parameters() if id(p) not in skip]
        self.params = [p for _, p in named if p.requires_grad]
        self.opt = torch.optim.AdamW(
            param_groups(named, cfg.weight_decay), lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        )
        self.steps_done = 0
        self.refresh_lr()

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def refresh_lr(self) -> None:
        c = self.cfg
        lr = c.lr * lr_factor(self.steps_done, self.total_steps, c.warmup_steps, c.decay,
                              c.min_lr_ratio)
        for g in self.opt.param_groups:
            g["lr"] = lr

    def step(self, scale: float = 1.0, skip: bool = False,
             frozen: Iterable[nn.Parameter] = (), advance: bool = True) -> None:
        """Scale the gradients (clipping), take an AdamW step, advance the schedule.

        ``skip`` leaves the weights and AdamW moments untouched (the gradients were not finite)
        but still advances the schedule, so every stage stays on the same learning rate.
        ``frozen`` parameters keep their weights and moments this step (an overseer's verdict
        says which); ``advance=False`` keeps the schedule where it is (the iteration will be
        redone)."""
        if not skip:
            held = {id(p) for p in frozen}
            if held:
                for p in self.params:
                    if id(p) in held:
                        p.grad = None  # AdamW leaves a parameter without a gradient alone
            if scale != 1.0:
                grads = [p.grad for p in self.params if p.grad is not None]
                if grads:
                    torch._foreach_mul_(grads, scale)
            self.opt.step()
        if advance:
            self.steps_done += 1
            self.refresh_lr()

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)
