"""The duplicated block's replicas: stage s + 1 holds a copy of stage s as its ``shadow``
submodule, so the stage's own optimizer steps it in lockstep with the original (same initial
weights, same upstream gradient, same clipping coefficient, same frozen iterations)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from phalanx.models.stages import StageModule

NAME = "shadow"


def shadow_of(stage: StageModule) -> StageModule:
    """An independent copy of ``stage`` (weights, buffers), to be a verifier's shadow; a shadow
    the stage holds itself is not copied."""
    own = stage._modules.pop(NAME, None)
    try:
        return copy.deepcopy(stage)
    finally:
        if own is not None:
            stage.add_module(NAME, own)


class OtherRounding(nn.Module):
    """A replica that computes in float64 and rounds back to its input's dtype: what a verifier
    on other hardware (other kernels, other summation order) sees, for calibrating and testing
    tolerances on one machine. Its parameters are the wrapped replica's, so it trains in
    lockstep as that replica would."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = {k: v.double() if v.is_floating_point() else v
                 for k, v in [*self.inner.named_parameters(), *self.inner.named_buffers()]}
        return torch.func.functional_call(self.inner, state, (x.double(),)).to(x.dtype)


def checked(num_stages: int) -> range:
    """The stages a duplicated block verifies: the middle ones (the ends are trusted)."""
    return range(1, num_stages - 1)


def add_shadow(verifier: StageModule, original: StageModule) -> None:
    """Give stage ``original.index + 1`` its shadow of ``original`` (before its optimizer is
    built, so the optimizer steps the shadow too)."""
    verifier.add_module(NAME, shadow_of(original))


def shadow_params(stage: nn.Module) -> list[nn.Parameter]:
    """The parameters of the shadow ``stage`` holds (none if it holds none)."""
    shadow = stage._modules.get(NAME)
    return list(shadow.parameters()) if shadow is not None else []


def squared_norm(params: list[nn.Parameter]) -> float:
    """Squared norm of the gradients of ``params``, as the worker computes a stage's (per-tensor
    norms in the gradients' dtype, summed in float64), so a replica's equals its original's."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(torch._foreach_norm(grads)).double().pow(2).sum())
