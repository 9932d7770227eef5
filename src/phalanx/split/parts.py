"""What trains in split fine-tuning, and its state: the rule every trainable method shares.

A module's trainable parameters are exactly those of its *trainable parts*: peft adapter layers
(LoRA's ``lora_A``/``lora_B``) and phalanx's own :class:`TrainablePart` modules (P-tuning v2
prefixes, SPF sparse deltas). Every base parameter is frozen. Each method re-applies the rule
after it adds its part (:func:`freeze_base`), so methods compose in any order. Stages share
their decoder layers with the model they were cut from, so a part added to a stage is in that
model too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

from phalanx.errors import PhalanxError


class TrainablePart(nn.Module):
    """Base of the modules phalanx adds to a frozen model: all their parameters train, and the
    buffers named in ``state_buffers`` belong to the trained state (:func:`trainable_state`)."""

    state_buffers: tuple[str, ...] = ()


def _adapter_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, TrainablePart):
            yield from m.parameters()
        elif isinstance(m, BaseTunerLayer):
            for attr in m.adapter_layer_names:
                yield from getattr(m, attr).parameters()


def freeze_base(module: nn.Module) -> None:
    """Freeze every parameter of ``module`` except those of its trainable parts."""
    module.requires_grad_(False)
    for p in _adapter_parameters(module):
        p.requires_grad_(True)


def trainable_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter of ``module`` that requires a gradient."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def count_trainable(module: nn.Module) -> int:
    """Number of trainable scalar entries of ``module``."""
    return sum(p.numel() for _, p in trainable_parameters(module))


def _state_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, m in module.named_modules():
        if isinstance(m, TrainablePart):
            for b in m.state_buffers:
                out[f"{prefix}.{b}" if prefix else b] = getattr(m, b)
    return out


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of just the trained state of ``module``: its trainable parameters and
    the buffers that give them meaning (the SPF indices), by name; what an enclave seals."""
    state = {n: p for n, p in trainable_parameters(module)}
    state.update(_state_buffers(module))
    return {n: t.detach().clone() for n, t in sorted(state.items())}


def load_trainable_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into ``module``, which must have the same
    trainable parts: the same names, shapes and dtypes, no more and no fewer."""
    params = dict(trainable_parameters(module))
    target = {**params, **_state_buffers(module)}
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise PhalanxError(
            f"trainable state does not fit this model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; apply the same trainable config before loading"
        )
    for name, t in target.items():
        src = state[name]
        if src.shape != t.shape or src.dtype != t.dtype:
            raise PhalanxError(
                f"trainable state {name!r} is {src.dtype} {tuple(src.shape)}; the model's is "
                f"{t.dtype} {tuple(t.shape)}"
            )
    with torch.no_grad():
        for name, t in target.items():
            t.copy_(state[name])
