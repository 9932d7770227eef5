"""Nearest-neighbour inversion of hidden states against the public embedding matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from phalanx.errors import ConfigError

METRICS = ("cosine", "l2")


def embedding_scores(hidden: torch.Tensor, embedding_weight: torch.Tensor,
                     metric: str = "cosine") -> torch.Tensor:
    """Similarity (..., V) of each hidden state (..., C) to each embedding row (V, C): cosine,
    or minus the L2 distance; higher is closer."""
    if metric not in METRICS:
        raise ConfigError(f"privacy metric={metric!r} is unknown; use one of {', '.join(METRICS)}")
    h = hidden.detach().float()
    e = embedding_weight.detach().float()
    if metric == "cosine":
        return F.normalize(h, dim=-1) @ F.normalize(e, dim=-1).T
    sq = (h * h).sum(-1, keepdim=True) - 2 * h @ e.T + (e * e).sum(-1)
    return -sq.clamp_min(0).sqrt()


@torch.no_grad()
def nearest_embedding(hidden: torch.Tensor, embedding_weight: torch.Tensor,
                      metric: str = "cosine", chunk: int = 4096) -> torch.Tensor:
    """Token ids (...) whose embedding rows are nearest to ``hidden`` (..., C).

    Attacker model: knows the public input embedding matrix (pretrained, not fine-tuned away)
    and receives hidden states at a shallow cut. Exact at cut 0 (the server gets the
    embeddings themselves); after one or two layers it works as far as the residual stream
    still carries the token's own embedding. For GPT-2, subtract the public position
    embeddings (``wpe.weight[:T]``) from ``hidden`` first.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = [embedding_scores(part, embedding_weight, metric).argmax(-1)
           for part in flat.split(chunk)]
    ids = torch.cat(out) if out else torch.empty(0, dtype=torch.long)
    return ids.reshape(hidden.shape[:-1])
