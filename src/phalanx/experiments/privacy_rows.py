"""The measurements of the privacy experiment, one function per row family.

Each attacks what an untrusted party receives from held-out pydoc passages ``ids`` (B, T) with
the attacker's public copy of the model ``lm`` (see :mod:`phalanx.privacy` for each attacker
model) and returns plain dicts of the leakage metrics (:func:`phalanx.privacy.leakage`).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from phalanx.models.stages import blocks_of, lm_loss
from phalanx.privacy import (
    ExactSearch,
    InversionDecoder,
    Prefix,
    TableRanker,
    cut_hidden,
    labels_from_head_grad,
    leakage,
    nearest_embedding,
    public_head,
    token_f1,
    tokens_from_weight_grad,
)


def search_row(lm, ids: torch.Tensor, cut: int, ranker: TableRanker, budget: int,  # noqa: ANN001
               hidden: torch.Tensor | None = None) -> dict:
    """Nearest embedding and the exact search on ``hidden`` (default: the clean hidden states
    at ``cut``)."""
    h = cut_hidden(lm.model, lm.family, ids, cut) if hidden is None else hidden
    weight = lm.model.get_input_embeddings().weight
    search = ExactSearch(Prefix(lm.model, lm.family, cut), chunk=256, budget=budget,
                         rank=ranker)
    t0 = time.perf_counter()
    found = search(h)
    return {"cut": cut,
            "nearest_embedding": leakage(list(nearest_embedding(h, weight)), list(ids)),
            "exact_search": leakage([r.tokens for r in found], list(ids)),
            "matched": sum(r.matched(1e-3) for r in found) / len(found),
            "search_s_per_token": (time.perf_counter() - t0) / ids.numel()}


def decoder_row(decoder: InversionDecoder, hidden: torch.Tensor, ids: torch.Tensor) -> dict:
    """The learned decoder's leakage on ``hidden`` (B, T, C)."""
    return leakage(list(decoder.decode(hidden)), list(ids))


def head_label_row(lm, ids: torch.Tensor) -> dict:  # noqa: ANN001
    """Labels (the text shifted by one) from the gradient the last untrusted stage receives
    when the data owner's last stage is the final norm + head alone."""
    head = public_head(lm.model, lm.family)
    layers = len(blocks_of(lm.model, lm.family))
    preds, trues = [], []
    t0 = time.perf_counter()
    for seq in ids:
        hidden = cut_hidden(lm.model, lm.family, seq[None], layers)[0].clone().requires_grad_()
        lm_loss(head(hidden)[None], seq[None]).backward()
        preds.append(labels_from_head_grad(hidden.grad, hidden.detach(), head)[:-1].tolist())
        trues.append(seq[1:].tolist())
    lm.model.zero_grad(set_to_none=True)
    return {"attack": "labels from the gradient at the head's input", **leakage(preds, trues),
            "seconds": time.perf_counter() - t0}


def weight_grad_row(lm, ids: torch.Tensor, cut: int, alone: torch.Tensor) -> dict:  # noqa: ANN001
    """The token set of each sequence from the gradient of the value projection of layer
    ``cut`` (the first layer past the data owner, trained in an enclave) if it left the
    enclave; candidates are each token's context-free input of that layer (``alone`` (V, C),
    a table's unit rows: exact at cut 0, approximate deeper), the k best by row-space share."""
    block = blocks_of(lm.model, lm.family)[cut]
    norm = block.input_layernorm if lm.family == "llama" else block.ln_1
    v_proj = block.self_attn.v_proj if lm.family == "llama" else block.attn.c_attn
    with torch.no_grad():
        cands = norm(alone * alone.shape[1] ** 0.5).float()  # RMS 1: as the layer sees it
    scores = []
    for seq in ids:
        lm.model.zero_grad(set_to_none=True)
        lm_loss(lm.model(seq[None]).logits, seq[None]).backward()
        grad = v_proj.weight.grad.clone()
        found = tokens_from_weight_grad(grad if lm.family == "llama" else grad.T, cands,
                                        top_rank=True)
        scores.append(token_f1(found, sorted(set(seq[:-1].tolist()))))
    lm.model.zero_grad(set_to_none=True)
    return {"attack": f"token set from the layer-{cut} value-projection weight gradient",
            "cut": cut, "token_f1": sum(scores) / len(scores)}


def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """exp of the mean LM loss over ``batches`` (B, T)."""
    import math

    with torch.no_grad():
        losses = [float(model(b, labels=b, use_cache=False).loss) for b in batches]
    return math.exp(sum(losses) / len(losses))


def ciphertext_view(hidden: torch.Tensor) -> torch.Tensor:
    """What a host (or an eavesdropper) holds when ``hidden`` (B, T, C) crosses an AES-256-GCM
    session (:class:`phalanx.split.envelope.Session`): the ciphertext bytes read as float32 of
    the same shape (non-finite values zeroed), the best it can feed an attack without the key."""
    import os

    from phalanx.split.envelope import NONCE_SIZE, Session

    blob = Session(os.urandom(32), role="client").encrypt({"h": hidden.float().contiguous()})
    raw = torch.frombuffer(bytearray(blob[NONCE_SIZE:]), dtype=torch.uint8)
    n = hidden.numel() * 4
    view = raw[-n - 16:-16].clone().view(torch.float32).reshape(hidden.shape)  # its bytes
    return torch.nan_to_num(view, nan=0.0, posinf=0.0, neginf=0.0).clamp(-1e4, 1e4)


def crypto_seconds(hidden: list[torch.Tensor]) -> float:
    """Seconds to encrypt and decrypt each tensor once over an AES-256-GCM session."""
    import os

    from phalanx.split.envelope import Session

    key = os.urandom(32)
    send, recv = Session(key, role="client"), Session(key, role="enclave")
    t0 = time.perf_counter()
    for h in hidden:
        recv.decrypt(send.encrypt({"h": h.float().contiguous()}))
    return time.perf_counter() - t0
