"""Inversion from LoRA gradients that leave an enclave: the token set of one sequence.

Setting: split fine-tuning trains peft LoRA adapters on the attention projections of the
first layer past the data owner (layer ``cut``) inside an enclave. If the adapters' gradients
of a single sequence leave the enclave in the clear (to an optimizer, an aggregator, a log),
what do they say about the sequence? For a projection ``y = W x + s B A x`` and output
gradients ``G`` (out, T) of the inputs ``X`` (in, T):

- ``grad_A = s B^T G X^T`` (r, in): its rows lie in the span of the inputs ``x_t`` but span
  at most r dimensions of it, and it is zero while B is zero (at initialisation).
  :func:`tokens_from_lora_a` scores each candidate input by its share in that row space.
  **Attacker knows**: the gradients ``grad_A`` and the public weights (for the candidates:
  :func:`~phalanx.privacy.gradients.layer_input_candidates`, exact at cut 0). Not B, not A.
  One adapter finds all tokens only when the sequence has at most r distinct inputs; but q,
  k and v read the same normed input, so their ``grad_A`` stacked span up to 3r dimensions of
  it: low rank is no protection once several adapters share an input.
- ``grad_B = s G (A X)^T`` (out, r): its rows lie in the span of the r-dimensional projections
  ``A x_t`` (non-zero from the first step: it does not need B). :func:`tokens_from_lora_b`
  scores the candidates projected by A. **Attacker knows**: ``grad_B``, the adapter's A (it
  leaves too, or is still at an initialisation the attacker can reproduce) and the public
  weights. Once the sequence has r distinct inputs or more, the projections fill all of R^r
  and the span says nothing.

Which positions leave no trace: see :func:`~phalanx.privacy.gradients.tokens_from_weight_grad`
(the last one in every projection; position 0 in the query projection alone).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from phalanx.errors import ConfigError
from phalanx.models.stages import blocks_of, lm_loss
from phalanx.privacy.cut import validate_cut
from phalanx.privacy.gradients import tokens_from_weight_grad

QKV = ("q_proj", "k_proj", "v_proj")  # the projections that read the layer's normed input


@dataclass(frozen=True)
class LoraGrad:
    """One adapted projection's LoRA weights and the gradients of one sequence's loss."""

    a: torch.Tensor  # A (r, in)
    grad_a: torch.Tensor  # d loss / d A (r, in)
    grad_b: torch.Tensor  # d loss / d B (out, r)


def lora_copy(model: nn.Module, family: str, layer: int, *, rank: int = 8, alpha: float = 16.0,
              public: torch.Tensor | None = None, steps: int = 0, lr: float = 1e-3,
              batch: int = 8, seed: int = 0) -> nn.Module:
    """A copy of ``model`` (the original is untouched) with peft LoRA adapters of ``rank`` on
    every attention projection of layer ``layer`` alone (everything else frozen), after
    ``steps`` AdamW steps of the LM loss on ``public`` (N, T) blocks, ``batch`` at a time, so
    that B is no longer zero; ``steps=0``: B = 0, as initialised."""
    from phalanx.split.lora import add_lora

    if family != "llama":
        raise ConfigError(f"LoRA gradient attacks need separate q/k/v projections (a Llama-"
                          f"family model), not {family!r}")
    if steps and (public is None or len(public) == 0):
        raise ConfigError("LoRA training steps need public text blocks")
    out = copy.deepcopy(model)
    out.requires_grad_(False)
    blocks = blocks_of(out, family)
    validate_cut(layer, len(blocks) - 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        add_lora(blocks[layer].self_attn, rank=rank, alpha=alpha)
    params = [p for p in out.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    out.train()
    for step in range(steps):
        start = (step * batch) % len(public)
        ids = public[start:start + batch]
        opt.zero_grad(set_to_none=True)
        lm_loss(out(ids).logits, ids).backward()
        opt.step()
    out.zero_grad(set_to_none=True)
    return out.eval()


def lora_gradients(model: nn.Module, family: str, layer: int,
                   ids: torch.Tensor) -> dict[str, LoraGrad]:
    """Per adapted projection of layer ``layer`` (``q_proj``, ...), the LoRA weights and
    gradients of the LM loss of the single sequence ``ids`` (T,)."""
    from peft.tuners.lora import LoraLayer

    attn = blocks_of(model, family)[layer].self_attn
    model.zero_grad(set_to_none=True)
    lm_loss(model(ids[None]).logits, ids[None]).backward()
    out = {}
    for name, m in attn.named_children():
        if isinstance(m, LoraLayer):
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            out[name] = LoraGrad(a=a.detach().clone(), grad_a=a.grad.detach().clone(),
                                 grad_b=b.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return out


def _unit(g: torch.Tensor) -> torch.Tensor:
    """``g`` scaled to spectral norm 1 (0 stays 0): stacked gradients weigh alike."""
    g = g.detach().double()
    top = torch.linalg.matrix_norm(g, ord=2) if g.numel() else g.new_zeros(())
    return g / top if float(top) > 0 else g


def tokens_from_lora_a(grads_a: Sequence[torch.Tensor], candidates: torch.Tensor, *,
                       threshold: float = 0.999, rtol: float = 1e-4,
                       top_rank: bool = False) -> list[int]:
    """Token ids whose candidate input (V, in) lies in the row space of the ``grad_A`` (r, in)
    of one or more adapters reading the same input, stacked (each scaled to spectral norm 1);
    ``threshold``, ``rtol`` and ``top_rank`` as :func:`tokens_from_weight_grad`."""
    if not grads_a:
        raise ValueError("tokens_from_lora_a needs at least one gradient")
    return tokens_from_weight_grad(torch.cat([_unit(g) for g in grads_a]), candidates,
                                   threshold=threshold, rtol=rtol, top_rank=top_rank)


def tokens_from_lora_b(grad_b: torch.Tensor, a: torch.Tensor, candidates: torch.Tensor, *,
                       threshold: float = 0.999, rtol: float = 1e-4,
                       top_rank: bool = False) -> list[int]:
    """Token ids whose candidate input (V, in), projected by the adapter's A (r, in), lies in
    the row space of its ``grad_B`` (out, r); the options as :func:`tokens_from_weight_grad`."""
    projected = candidates.detach().double() @ a.detach().double().T  # (V, r)
    return tokens_from_weight_grad(grad_b, projected, threshold=threshold, rtol=rtol,
                                   top_rank=top_rank)
