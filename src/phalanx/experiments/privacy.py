"""Privacy inference at the cut: how much of the data owner's text the next stage reads.

For each cut depth (layers the data owner keeps), the next stage receives the hidden states
after them. The attacks (:mod:`phalanx.privacy`) know the public pretrained weights: the
nearest-embedding inversion, and the exact layer-wise search (SipIt idea) ranked by a table of
every token's context-free hidden state, with a candidate budget per position. At the first
cut, noise at the cut (Gaussian, relative to each token's RMS) is measured against both the
recovery and its utility cost: the public model's validation perplexity with that noise added
at the cut (no training: the cost a run would start from).

Writes ``summary.json``, ``table.md`` and ``recovery.png`` (recovery against cut depth, and the
privacy-utility curve of the noise). This is the start of issue 12's experiment: the learned
decoder, the gradient attacks, DP-Forward and the defenses' tokens/s are not in it yet.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phalanx.models.stages import blocks_of


@dataclass(kw_only=True)
class PrivacySpec:
    """Which model, cuts, texts and noise levels."""

    model: str = "smollm2"
    cuts: tuple[int, ...] = (1, 2, 4, 8, 16)
    sequences: int = 2  # held-out pydoc topics passages
    tokens: int = 16  # tokens of each
    budget: int = 512  # candidates the search tries per position
    sigmas: tuple[float, ...] = (0.5, 2.0, 8.0)  # noise std / each token's RMS, at cuts[0]
    val_batches: int = 4  # validation batches (8 x 64 tokens) for the utility cost
    seed: int = 0

    @classmethod
    def quick(cls) -> PrivacySpec:
        return cls(model="tiny", cuts=(1, 2), sequences=2, tokens=8, budget=256,
                   sigmas=(2.0, 64.0), val_batches=1)


def _texts(tokenizer, spec: PrivacySpec) -> torch.Tensor:  # noqa: ANN001
    """(sequences, tokens) ids of held-out passages: the middle of pydoc topics entries."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    rows = []
    for name in names[:: max(1, len(names) // max(spec.sequences, 1))]:
        ids = tokenizer.encode(topics[name])
        if len(ids) >= 40 + spec.tokens:
            rows.append(ids[40:40 + spec.tokens])
        if len(rows) == spec.sequences:
            break
    return torch.tensor(rows, dtype=torch.long)


def _hidden_of(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def noisy_cut(model: nn.Module, family: str, cut: int, sigma: float,
              seed: int) -> Iterator[None]:
    """The model with noise of ``sigma`` x each token's RMS added after its first ``cut``
    layers (what the next stage would receive)."""
    from phalanx.privacy import add_noise

    gen = torch.Generator().manual_seed(seed)

    def hook(_m: nn.Module, _a: tuple, out: torch.Tensor | tuple):  # noqa: ANN202
        h = add_noise(_hidden_of(out), sigma, generator=gen)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = blocks_of(model, family)[cut - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def perplexity(model: nn.Module, batches: list[torch.Tensor]) -> float:
    losses = [float(model(b, labels=b, use_cache=False).loss) for b in batches]
    return math.exp(sum(losses) / len(losses))


def attack(lm, ids: torch.Tensor, cut: int, spec: PrivacySpec,  # noqa: ANN001
           hidden: torch.Tensor | None = None, ranker=None) -> tuple[dict, object]:  # noqa: ANN001
    """Both attacks on what the stage after ``cut`` receives (``hidden``, default clean): their
    record, and the search's ranking table (to reuse at the same cut)."""
    from phalanx.privacy import (
        ExactSearch,
        Prefix,
        TableRanker,
        cut_hidden,
        leakage,
        nearest_embedding,
    )

    h = cut_hidden(lm.model, lm.family, ids, cut) if hidden is None else hidden
    weight = lm.model.get_input_embeddings().weight
    near = leakage(list(nearest_embedding(h, weight)), list(ids))
    search = ExactSearch(Prefix(lm.model, lm.family, cut), chunk=256, budget=spec.budget)
    t0 = time.perf_counter()
    search.rank = ranker or TableRanker(search, anchor=int(lm.tokenizer.eos_id or 0))
    table_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = search(h)
    return {"cut": cut, "nearest_embedding": near,
            "exact_search": leakage([r.tokens for r in found], list(ids)),
            "matched": sum(r.matched(1e-3) for r in found) / len(found),
            "table_s": table_s, "search_s_per_token": (time.perf_counter() - t0) / ids.numel(),
            }, search.rank


def run(spec: PrivacySpec, out: Path) -> dict:
    """Every cut, then every noise level at the first cut; writes the results."""
    from phalanx.data import DataConfig, build_data
    from phalanx.models import ModelConfig, load_model
    from phalanx.privacy import add_noise, cut_hidden, validate_cut, validate_sigma

    torch.manual_seed(spec.seed)
    lm = load_model(ModelConfig(name=spec.model))
    lm.model.eval()
    layers = len(blocks_of(lm.model, lm.family))
    for c in spec.cuts:
        validate_cut(c, layers)
    for s in spec.sigmas:
        validate_sigma(s)
    ids = _texts(lm.tokenizer, spec)
    val = build_data(DataConfig(seq_len=64), lm.tokenizer).val_batches(8, spec.val_batches)
    out.mkdir(parents=True, exist_ok=True)
    rows, first_ranker = [], None
    for k, cut in enumerate(spec.cuts, 1):
        print(f"[cut {k}/{len(spec.cuts)}] {cut} layers at the data owner ...", file=sys.stderr,
              flush=True)
        row, ranker = attack(lm, ids, cut, spec)
        first_ranker = first_ranker or ranker
        rows.append(row)
    base = perplexity(lm.model, val)
    noise = []
    cut = spec.cuts[0]
    for sigma in spec.sigmas:
        print(f"[noise] sigma {sigma} at cut {cut} ...", file=sys.stderr, flush=True)
        gen = torch.Generator().manual_seed(spec.seed)
        h = cut_hidden(lm.model, lm.family, ids, cut)
        row, _ = attack(lm, ids, cut, spec, hidden=add_noise(h, sigma, generator=gen),
                        ranker=first_ranker)
        with noisy_cut(lm.model, lm.family, cut, sigma, spec.seed):
            ppl = perplexity(lm.model, val)
        noise.append({"sigma": sigma, "val_ppl": ppl, "ppl_cost": ppl / base - 1,
                      **row})
    summary = {"spec": {k: v for k, v in vars(spec).items()}, "model": lm.source,
               "layers": layers, "val_ppl": base, "cuts": rows, "noise": noise}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    (out / "table.md").write_text(table(summary))
    plot(summary, out / "recovery.png")
    return summary


def table(summary: dict) -> str:
    lines = ["| cut (layers at the data owner) | exact search: tokens recovered | exact "
             "sequences | nearest embedding | search s/token |", "|---|---|---|---|---|"]
    for r in summary["cuts"]:
        lines.append(f"| {r['cut']} | {r['exact_search']['token_recovery']:.1%} | "
                     f"{r['exact_search']['exact_match']:.0%} | "
                     f"{r['nearest_embedding']['token_recovery']:.1%} | "
                     f"{r['search_s_per_token']:.2f} |")
    lines += ["", f"Noise at cut {summary['cuts'][0]['cut']} (validation perplexity without: "
              f"{summary['val_ppl']:.2f}):", "",
              "| sigma (x token RMS) | tokens recovered | ROUGE-L | val ppl | ppl cost |",
              "|---|---|---|---|---|"]
    for r in summary["noise"]:
        lines.append(f"| {r['sigma']:g} | {r['exact_search']['token_recovery']:.1%} | "
                     f"{r['exact_search']['rouge_l']:.2f} | {r['val_ppl']:.2f} | "
                     f"{r['ppl_cost']:+.1%} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    cuts = [r["cut"] for r in summary["cuts"]]
    a.plot(cuts, [r["exact_search"]["token_recovery"] for r in summary["cuts"]], "o-",
           label="exact search")
    a.plot(cuts, [r["nearest_embedding"]["token_recovery"] for r in summary["cuts"]], "s--",
           label="nearest embedding")
    a.set_xlabel("layers kept by the data owner")
    a.set_ylabel("tokens recovered")
    a.legend()
    b.plot([r["ppl_cost"] for r in summary["noise"]],
           [r["exact_search"]["token_recovery"] for r in summary["noise"]], "o-")
    for r in summary["noise"]:
        b.annotate(f"σ={r['sigma']:g}", (r["ppl_cost"], r["exact_search"]["token_recovery"]))
    b.set_xlabel("validation perplexity cost")
    b.set_ylabel("tokens recovered")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
