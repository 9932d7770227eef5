"""Gradient inversion: labels (= the next input tokens) and input tokens from gradients.

Label attacks. Attacker model: an untrusted stage that receives, in backward, the gradient of
the mean next-token cross-entropy with respect to what it sent forward, and knows the public
weights of everything after it (not fine-tuned away) and the number of labelled tokens.
- :func:`labels_from_logit_grad`: d loss / d logits = (softmax - onehot) / N, so each row's
  only negative entry is its label.
- :func:`labels_from_head_grad`: the gradient at the input of a position-wise head (final norm
  + LM head): N g_t = J_t^T p_t - J_t[y_t] with J_t the head's Jacobian; the label is the
  vocabulary row whose ``J_t^T p_t - J_t[v]`` points along g_t (no need to know N).
- :func:`labels_from_stage_grad`: the gradient at the input of a causal stage with layers:
  position t's gradient mixes the labels of positions >= t, so labels are peeled off from the
  last position back, each from the Jacobian of the stage's logits at t by its input at t.

Input attacks. Attacker model: sees the weight gradient of one linear layer of a single
sequence (its own or a LoRA adapter's) and knows what the layer's input looks like for each
vocabulary token (exact at cut 0: the normed embedding row). d loss / d W = sum_t g_t x_t^T,
so the rows of W's gradient span the inputs x_t: :func:`rowspace_scores` measures how much of
each candidate input lies in that span and :func:`tokens_from_weight_grad` returns the set of
tokens (not their order) whose inputs lie in it. For LoRA, ``grad_A = s B^T G`` also has rows
in the span (empty while B is still zero at initialisation, and only an r-dimensional part of
it: all tokens are found only when the sequence has at most r distinct tokens); ``grad_B = s G
A^T`` leaks only the r-dimensional projections ``A x_t`` (score candidates ``x_v @ A.T``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from phalanx.models.stages import blocks_of
from phalanx.privacy.cut import Prefix, validate_cut

UNLABELLED = -1  # a position whose gradient is zero (the last one has no next token)


@torch.no_grad()
def labels_from_logit_grad(grad_logits: torch.Tensor) -> torch.Tensor:
    """Label ids (...) from the gradient of the cross-entropy by the logits (..., V)."""
    g = grad_logits.float()
    low, ids = g.min(-1)
    return torch.where(low < 0, ids, torch.full_like(ids, UNLABELLED))


def public_head(model: nn.Module, family: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The public final norm + LM head as a function of hidden states (..., C) -> (..., V)."""
    norm = model.model.norm if family == "llama" else model.transformer.ln_f
    return lambda h: model.lm_head(norm(h))


def _live(grad: torch.Tensor) -> torch.Tensor:
    return grad.float().abs().amax(-1) > 0  # (T,)


def labels_from_head_grad(grad: torch.Tensor, hidden: torch.Tensor,
                          head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Label ids (T,) from the gradient (T, C) at the input ``hidden`` (T, C) of a
    position-wise ``head`` (C,) -> (V,); UNLABELLED where the gradient is zero."""
    out = torch.full((hidden.shape[0],), UNLABELLED, dtype=torch.long)
    live = _live(grad)
    for t in torch.nonzero(live).flatten().tolist():
        h = hidden[t].detach().float()
        with torch.no_grad():
            jac = torch.func.jacfwd(head)(h).float()  # (V, C)
            p = torch.softmax(head(h).float(), -1)  # (V,)
            cands = (p @ jac) - jac  # (V, C): N * predicted gradient for each label
            out[t] = int(F.cosine_similarity(cands, grad[t].float()[None], dim=-1).argmax())
    return out


def labels_from_stage_grad(grad: torch.Tensor, hidden: torch.Tensor,
                           stage: Callable[[torch.Tensor], torch.Tensor],
                           n_labels: int | None = None) -> torch.Tensor:
    """Label ids (T,) from the gradient (T, C) at the input ``hidden`` (T, C) of a causal
    ``stage`` (T, C) -> logits (T, V), for a loss averaged over ``n_labels`` tokens (default
    T - 1: one sequence, the last position unlabelled). Cost: T * C forward passes."""
    h = hidden.detach().float()
    T = h.shape[0]
    n = n_labels if n_labels is not None else T - 1
    logits, vjp = torch.func.vjp(stage, h)
    probs = torch.softmax(logits.detach().float(), -1)
    live = _live(grad)
    probs[~live] = 0
    with torch.no_grad():
        resid = vjp(probs)[0] - n * grad.float()  # (T, C) = vjp of the one-hot labels
    onehot = torch.zeros_like(probs)
    out = torch.full((T,), UNLABELLED, dtype=torch.long)
    for t in reversed(torch.nonzero(live).flatten().tolist()):
        with torch.no_grad():
            target = resid[t] - vjp(onehot)[0][t]  # (C,) the label at t's own share

        def at_t(u: torch.Tensor, t: int = t) -> torch.Tensor:
            return stage(torch.cat([h[:t], u[None], h[t + 1:]]))[t]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):  # forward AD needs the math kernel
            jac = torch.func.jacfwd(at_t)(h[t]).float()  # (V, C)
            out[t] = int((jac - target).norm(dim=-1).argmin())
        onehot[t, out[t]] = 1.0
    return out


def rowspace_basis(grad: torch.Tensor, rtol: float = 1e-4) -> torch.Tensor:
    """Orthonormal basis (k, in) of the row space of a weight gradient (out, in): the right
    singular vectors whose singular values exceed ``rtol`` times the largest."""
    _, s, vh = torch.linalg.svd(grad.detach().double(), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0:
        return vh[:0]
    return vh[s > rtol * s[0]]


def rowspace_scores(grad: torch.Tensor, candidates: torch.Tensor,
                    rtol: float = 1e-4) -> torch.Tensor:
    """Share (V,) in [0, 1] of each candidate input's norm (V, in) inside the gradient's row
    space: 1 for an input that the gradient was made of."""
    basis = rowspace_basis(grad, rtol)
    x = candidates.detach().double()
    proj = (x @ basis.T).norm(dim=-1)
    return (proj / x.norm(dim=-1).clamp_min(1e-300)).float()


def tokens_from_weight_grad(grad: torch.Tensor, candidates: torch.Tensor, *,
                            threshold: float = 0.999, rtol: float = 1e-4,
                            top_rank: bool = False) -> list[int]:
    """Sorted ids of the vocabulary tokens whose inputs lie in the gradient's row space: those
    scoring at least ``threshold``, or with ``top_rank`` the k best-scoring ones, k the
    gradient's numerical rank (one per distinct input; for approximate candidates, deeper
    than cut 0, where no candidate lies exactly in the span).

    A token whose output gradient g_t is zero leaves no trace: the last position (no label),
    and for a query projection also position 0 (its attention is to itself alone, whatever
    its query); use a value or MLP projection to see position 0."""
    scores = rowspace_scores(grad, candidates, rtol)
    if top_rank:
        k = len(rowspace_basis(grad, rtol))
        return sorted(scores.argsort(descending=True)[:k].tolist())
    return torch.nonzero(scores >= threshold).flatten().tolist()


@torch.no_grad()
def layer_input_candidates(model: nn.Module, family: str, cut: int,
                           batch: int = 4096) -> torch.Tensor:
    """Input (V, C) of layer ``cut``'s attention projections for each vocabulary token alone
    at position 0 (its first norm applied to the public prefix's hidden state): exact
    candidates at cut 0, context-free approximations deeper."""
    blocks = blocks_of(model, family)
    validate_cut(cut, len(blocks) - 1)
    block = blocks[cut]
    norm = block.input_layernorm if family == "llama" else block.ln_1
    prefix = Prefix(model, family, cut).eval()
    ids = torch.arange(prefix.vocab_size)[:, None]  # (V, 1)
    return torch.cat([norm(prefix(part))[:, 0].float() for part in ids.split(batch)])
