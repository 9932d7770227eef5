"""How a verifier joins a replica's computation to the pipeline's autograd graph."""

from __future__ import annotations

import torch


class _Join(torch.autograd.Function):
    """Joins the claimed input with the replica's side of the graph.

    The output has the values of ``other`` when ``use_other`` (else of ``claimed``); the
    gradient flows to ``other`` always and to ``claimed`` when ``to_claimed`` (else zeros).
    Tie (claimed, g to both): the replica learns in the same backward pass. Route (true input,
    zeros to the claim): a bypass. Repair (replica's output, g to both): the stage left out
    still steps in lockstep with its replica."""

    @staticmethod
    def forward(ctx, claimed: torch.Tensor, other: torch.Tensor, use_other: bool,  # noqa: ANN001
                to_claimed: bool) -> torch.Tensor:
        ctx.to_claimed = to_claimed
        return (other if use_other else claimed).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        return (grad if ctx.to_claimed else torch.zeros_like(grad)), grad, None, None


def tie(claimed: torch.Tensor, shadow_out: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, shadow_out, False, True)


def route(claimed: torch.Tensor, true_in: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, true_in, True, False)


def repair(claimed: torch.Tensor, shadow_out: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, shadow_out, True, True)
