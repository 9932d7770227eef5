"""The duplicated block's replicas: stage s + 1 holds a copy of stage s as its ``shadow``
submodule, so the stage's own optimizer steps it in lockstep with the original (same initial
weights, same upstream gradient, same clipping coefficient, same frozen iterations)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from phalanx.models.stages import StageModule

NAME = "shadow"
SECOND = "second"  # stage s + 2's second replica of stage s (phalanx.defense.second)


def shadow_of(stage: StageModule) -> StageModule:
    """An independent copy of ``stage`` (weights, buffers), to be a verifier's replica; the
    replicas the stage holds itself are not copied."""
    own = {k: stage._modules.pop(k) for k in (NAME, SECOND) if k in stage._modules}
    try:
        return copy.deepcopy(stage)
    finally:
        for k, m in own.items():
            stage.add_module(k, m)


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


def second_checked(num_stages: int) -> range:
    """The stages a second replica verifies: those whose first verifier is a middle stage."""
    return range(1, num_stages - 2)


def replicated(rank: int, num_stages: int, second: bool) -> dict[str, int]:
    """The replicas stage ``rank`` holds: name -> the stage it copies."""
    out = {NAME: rank - 1} if rank - 1 in checked(num_stages) else {}
    if second and rank - 2 in second_checked(num_stages):
        out[SECOND] = rank - 2
    return out


def add_replica(holder: StageModule, name: str, original: StageModule) -> None:
    """Give ``holder`` its replica ``name`` of ``original`` (before its optimizer is built, so
    the optimizer steps the replica too)."""
    holder.add_module(name, shadow_of(original))


def shadow_params(stage: nn.Module, name: str = NAME) -> list[nn.Parameter]:
    """The parameters of the replica ``name`` that ``stage`` holds (none if it holds none)."""
    shadow = stage._modules.get(name)
    return list(shadow.parameters()) if shadow is not None else []


def squared_norm(params: list[nn.Parameter]) -> float:
    """Squared norm of the gradients of ``params``, as the worker computes a stage's (per-tensor
    norms in the gradients' dtype, summed in float64), so a replica's equals its original's."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.stack(torch._foreach_norm(grads)).double().pow(2).sum())
