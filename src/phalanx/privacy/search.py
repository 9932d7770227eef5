"""Exact layer-wise inversion (the SipIt idea, arXiv 2510.15511): causal prefixes are injective.

Attacker model: knows the public pretrained weights of the embedding and of layers
``[0, cut)`` (the victim's stage 0 runs them unchanged) and the architecture; receives the
hidden states (T, C) stage 0 sends. Because the model is causal, the hidden state at position
t depends only on tokens ``0..t``: given the tokens already recovered, the attacker runs the
public prefix on ``recovered + candidate`` for vocabulary tokens and keeps the one whose
hidden state at t matches the observed one. Candidates are evaluated in chunks packed into one
sequence (the recovered prefix once, then each candidate at position t seeing the prefix and
itself), in the order of a cheap guess, stopping at the first match within ``tol``: nearest
embedding by default, or :class:`TableRanker` (each token's hidden state without context, far
better past the first layer). Without a match (the victim's weights differ from the public
ones) the whole vocabulary (or ``budget`` candidates) is scanned and the nearest candidate
kept, so errors grow with the drift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from phalanx.errors import ConfigError
from phalanx.privacy.cut import Prefix
from phalanx.privacy.embedding import embedding_scores

Ranker = Callable[[torch.Tensor, int], torch.Tensor]
"""Hidden state (C,) at position t, t -> a score per vocabulary token (V,); higher first."""


@dataclass
class SearchResult:
    """Recovered tokens of one sequence, each with the relative L2 distance of its match and
    the number of candidates evaluated for it."""

    tokens: list[int] = field(default_factory=list)
    distances: list[float] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def matched(self, tol: float) -> float:
        """Share of positions whose match was within ``tol`` (exact up to float error)."""
        return sum(d <= tol for d in self.distances) / max(len(self.distances), 1)


def packed_mask(t: int, n: int) -> torch.Tensor:
    """Attention mask (1, 1, t+n, t+n): causal over a prefix of ``t`` tokens, then ``n``
    candidates that each see the prefix and themselves only."""
    mask = torch.zeros(t + n, t + n, dtype=torch.bool)
    mask[:t, :t] = torch.ones(t, t, dtype=torch.bool).tril()
    mask[t:, :t] = True
    mask[t:, t:] = torch.eye(n, dtype=torch.bool)
    return mask[None, None]


class ExactSearch:
    """Recover tokens one position at a time by matching hidden states of the public prefix."""

    def __init__(self, prefix: Prefix, *, tol: float = 1e-3, chunk: int = 512,
                 rank: Ranker | None = None, budget: int | None = None) -> None:
        if not tol > 0 or chunk < 1 or (budget is not None and budget < 1):
            raise ConfigError(f"privacy search needs tol > 0, chunk >= 1 and budget >= 1 "
                              f"(got tol={tol}, chunk={chunk}, budget={budget})")
        self.prefix = prefix.eval()
        self.tol, self.chunk, self.budget = tol, chunk, budget
        weight = prefix.embed.weight
        self.rank = rank or (lambda h, t: embedding_scores(h, weight))

    @torch.no_grad()
    def candidates(self, recovered: list[int], cands: torch.Tensor) -> torch.Tensor:
        """Hidden states (n, C) at position ``len(recovered)`` of each candidate token (n,)."""
        t, n = len(recovered), len(cands)
        dev = self.prefix.embed.weight.device
        ids = torch.cat([torch.tensor(recovered, dtype=torch.long), cands.cpu()])[None]
        pos = torch.cat([torch.arange(t), torch.full((n,), t)])[None]
        out = self.prefix.packed(ids.to(dev), pos.to(dev), packed_mask(t, n).to(dev))
        return out[0, t:].float()

    @torch.no_grad()
    def invert(self, hidden: torch.Tensor) -> SearchResult:
        """Tokens (T,) of one sequence from its hidden states at the cut (T, C)."""
        start = time.perf_counter()
        out = SearchResult()
        dev = self.prefix.embed.weight.device
        for t, target in enumerate(hidden.detach().float().to(dev)):
            order = self.rank(target, t).argsort(descending=True)[:self.budget]
            scale = target.norm().clamp_min(1e-12)
            best_d, best_id, seen = float("inf"), -1, 0
            for cands in order.split(self.chunk):
                dist = (self.candidates(out.tokens, cands) - target).norm(dim=-1) / scale
                seen += len(cands)
                i = int(dist.argmin())
                if float(dist[i]) < best_d:
                    best_d, best_id = float(dist[i]), int(cands[i])
                if best_d <= self.tol:
                    break
            out.tokens.append(best_id)
            out.distances.append(best_d)
            out.evaluated.append(seen)
        out.seconds = time.perf_counter() - start
        return out

    def __call__(self, hidden: torch.Tensor) -> list[SearchResult]:
        """One result per sequence of hidden states (B, T, C) or (T, C)."""
        batch = hidden if hidden.dim() == 3 else hidden[None]
        return [self.invert(h) for h in batch]


class TableRanker:
    """Ranks candidates by the cosine of the observed hidden state to each token's hidden state
    at the cut without its real context: alone at position 0 (for t = 0), and for t > 0 the
    better of that and after one public ``anchor`` token (e.g. end-of-text) at position 1.

    Attacker model: the public weights only. ``alone`` and ``after`` are unit rows (V, C),
    built by :func:`phalanx.privacy.table.context_free_tables` (one pass of the vocabulary for
    all cuts, cached); the table puts the true token first for most positions of SmolLM2 at
    shallow cuts, where the raw embedding is no guide at all.
    """

    def __init__(self, alone: torch.Tensor, after: torch.Tensor) -> None:
        self.alone, self.after = alone, after  # (V, C) each

    def __call__(self, hidden: torch.Tensor, t: int) -> torch.Tensor:
        h = F.normalize(hidden.float(), dim=-1)
        alone = self.alone @ h
        return alone if t == 0 else torch.maximum(alone, self.after @ h)
