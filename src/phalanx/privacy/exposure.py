"""A run's own exposure: how much of the user's batches the strongest attack reads at each cut
where an untrusted party receives hidden states (``privacy.report=true``, before training).

Which cuts: in a pipeline, every middle stage (the threat model's untrusted parties) receives
the hidden states after the layers before it (over the jumping connection too: a stage two
ahead receives a cut already counted); the trusted ends receive nothing new. In a split run,
the server receives the client's cut. ``privacy.cuts = "first"`` measures the shallowest one
only (one table, the cheapest), ``"all"`` every one.

The attack is the exact layer-wise search (:class:`~phalanx.privacy.search.ExactSearch`)
ranked by the context-free table (:mod:`phalanx.privacy.table`), against the run's initial
weights: the attacker is assumed to know them (public pretrained weights; a private model is
as exposed to whoever holds a copy). A noise or an enclave the run uses is not applied here:
the figure is what the cut itself gives away.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phalanx.errors import ConfigError, check_choice

CUTS = ("first", "all")


@dataclass(kw_only=True)
class ExposureConfig:
    """The opt-in exposure report of ``phalanx train`` (off by default: it costs a pass of the
    vocabulary through the layers before the deepest cut measured, cached after the first)."""

    report: bool = False
    cuts: str = "first"  # first | all
    sequences: int = 2  # of the run's own training batches
    tokens: int = 16  # of each, from its start
    budget: int = 512  # candidates the search tries per position

    def validate(self) -> None:
        check_choice("privacy.cuts", self.cuts, CUTS)
        for name in ("sequences", "tokens", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"privacy.{name}={value!r} must be a whole number >= 1")


def untrusted_cuts(bounds: list[int], split_cut: int | None) -> list[int]:
    """Layers before each hidden state an untrusted party receives, shallowest first.
    ``bounds``: the pipeline's cut points (first layer of stages 1..N-1); ``split_cut``: the
    client's layers in a split run (the server is the untrusted party)."""
    if split_cut is not None:
        return [split_cut]
    return sorted(set(bounds[:-1]))  # stages 1..N-2 receive; the last stage is the data owner's


@torch.no_grad()
def measure(model: nn.Module, family: str, ids: torch.Tensor, cuts: list[int], *, anchor: int,
            budget: int, cache_dir: Path | None = None,
            progress: Callable[[str], None] | None = None) -> list[dict]:
    """Per cut: the exact search's leakage of ``ids`` (B, T) from the hidden states after
    ``cut`` layers, and its cost."""
    from phalanx.privacy.cut import Prefix, cut_hidden
    from phalanx.privacy.metrics import leakage
    from phalanx.privacy.search import ExactSearch
    from phalanx.privacy.table import context_free_tables

    if not cuts:
        return []
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        prefix = Prefix(model, family, max(cuts))
        tables = context_free_tables(
            prefix, cuts, anchor, cache_dir=cache_dir,
            progress=(lambda k, n: progress(f"ranking table: layer {k}/{n}")) if progress else None)
        table_s = time.perf_counter() - t0
        rows = []
        for cut in cuts:
            if progress:
                progress(f"exact search at cut {cut} ({ids.numel()} tokens)")
            t0 = time.perf_counter()
            search = ExactSearch(Prefix(model, family, cut), budget=budget, rank=tables[cut])
            found = search(cut_hidden(model, family, ids, cut))
            rows.append({"cut": cut, "attack": "exact_search",
                         **leakage([r.tokens for r in found], [list(x) for x in ids.tolist()]),
                         "tokens": ids.numel(), "search_s": time.perf_counter() - t0,
                         "table_s": table_s})
        return rows
    finally:
        model.train(was_training)


def lines(rows: list[dict]) -> list[str]:
    """What the report prints, one line per cut."""
    return [f"privacy: at cut {r['cut']} (hidden states after {r['cut']} layers, received by an "
            f"untrusted stage) the exact search recovers {r['token_recovery']:.0%} of "
            f"{r['tokens']} tokens of your batches exactly ({r['exact_match']:.0%} of "
            f"sequences whole)" for r in rows]
