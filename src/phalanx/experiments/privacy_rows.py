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


def layer_inputs(lm, cut: int, alone: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Each token's context-free input (V, C) of layer ``cut``'s attention projections, from a
    table's unit rows ``alone`` (V, C): the layer's first norm of them at RMS 1."""
    block = blocks_of(lm.model, lm.family)[cut]
    norm = block.input_layernorm if lm.family == "llama" else block.ln_1
    with torch.no_grad():
        return norm(alone * alone.shape[1] ** 0.5).float()  # RMS 1: as the layer sees it


def _traced(seq: torch.Tensor) -> list[int]:
    """The distinct tokens of ``seq`` (T,) whose inputs reach a weight gradient (not the last,
    which has no label)."""
    return sorted(set(seq[:-1].tolist()))


def weight_grad_row(lm, ids: torch.Tensor, cut: int, alone: torch.Tensor) -> dict:  # noqa: ANN001
    """The token set of each sequence from the gradient of the value projection of layer
    ``cut`` (the first layer past the data owner, trained in an enclave) if it left the
    enclave; candidates are each token's context-free input of that layer (``alone`` (V, C),
    a table's unit rows: exact at cut 0, approximate deeper), the k best by row-space share."""
    block = blocks_of(lm.model, lm.family)[cut]
    v_proj = block.self_attn.v_proj if lm.family == "llama" else block.attn.c_attn
    cands = layer_inputs(lm, cut, alone)
    scores = []
    for seq in ids:
        lm.model.zero_grad(set_to_none=True)
        lm_loss(lm.model(seq[None]).logits, seq[None]).backward()
        grad = v_proj.weight.grad.clone()
        found = tokens_from_weight_grad(grad if lm.family == "llama" else grad.T, cands,
                                        top_rank=True)
        scores.append(token_f1(found, _traced(seq)))
    lm.model.zero_grad(set_to_none=True)
    return {"attack": f"token set from the layer-{cut} value-projection weight gradient",
            "cut": cut, "token_f1": sum(scores) / len(scores)}


def lora_grad_rows(lm, ids: torch.Tensor, cut: int, alone: torch.Tensor,  # noqa: ANN001
                   public: torch.Tensor, *, rank: int, steps: int, seed: int = 0) -> list[dict]:
    """The token set of each sequence from the per-sequence gradients of peft LoRA adapters
    (``rank``) on the attention projections of layer ``cut`` (what the enclave trains), on a
    copy of the model: right after initialisation (B = 0) and after ``steps`` AdamW steps on
    the ``public`` text blocks; candidates as :func:`weight_grad_row` (the k best).
    ``setup_s``: the copy, its training and the gradients; ``attack_s``: the attack alone."""
    from phalanx.privacy.lora_leak import (
        QKV,
        lora_copy,
        lora_gradients,
        tokens_from_lora_a,
        tokens_from_lora_b,
    )

    cands = layer_inputs(lm, cut, alone)
    attacks = [
        (0, "A", QKV, "grad A alone (the public weights)"),
        (steps, "A", ("v_proj",), "grad A alone (the public weights)"),
        (steps, "A", QKV, "grad A alone (the public weights)"),
        (steps, "B", ("v_proj",), "grad B and the adapter's A (the public weights)")]
    rows = []
    for n_steps in sorted({0, steps}):
        t0 = time.perf_counter()
        model = lora_copy(lm.model, lm.family, cut, rank=rank, public=public, steps=n_steps,
                          seed=seed)
        grads = [lora_gradients(model, lm.family, cut, seq) for seq in ids]
        b_norm = float(blocks_of(model, lm.family)[cut].self_attn.v_proj
                       .lora_B["default"].weight.detach().norm())
        del model
        setup_s = time.perf_counter() - t0
        for at, kind, targets, needs in attacks:
            if at != n_steps:
                continue
            t1 = time.perf_counter()
            scores = []
            for seq, g in zip(ids, grads, strict=True):
                if kind == "A":
                    found = tokens_from_lora_a([g[t].grad_a for t in targets], cands,
                                               top_rank=True)
                else:
                    found = tokens_from_lora_b(g["v_proj"].grad_b, g["v_proj"].a, cands,
                                               top_rank=True)
                scores.append(token_f1(found, _traced(seq)))
            when = "at initialisation (B = 0)" if at == 0 else f"after {at} AdamW steps"
            rows.append({
                "attack": f"token set from the layer-{cut} LoRA grad {kind} of "
                          f"{', '.join(t.removesuffix('_proj') for t in targets)} "
                          f"(rank {rank}, {when})",
                "cut": cut, "rank": rank, "gradient": kind, "targets": list(targets),
                "lora_steps": at, "lora_b_norm": b_norm, "attacker_needs": needs,
                "distinct_tokens": sum(len(_traced(s)) for s in ids) / len(ids),
                "token_f1": sum(scores) / len(scores),
                "setup_s": setup_s, "attack_s": time.perf_counter() - t1})
    lm.model.zero_grad(set_to_none=True)
    return rows


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
