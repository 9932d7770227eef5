"""Privacy inference at the cut: how much of the data owner's text the next stage reads.

For each cut depth (layers the data owner keeps), the next stage receives the hidden states
after them. The attacks (:mod:`phalanx.privacy`) know the public pretrained weights: the
nearest-embedding inversion, and the exact layer-wise search (SipIt idea) ranked by a table of
every token's context-free hidden state, with a candidate budget per position. At the first
cut, noise at the cut (Gaussian, relative to each token's RMS) is measured against both the
recovery and its utility cost: the public model's validation perplexity with that noise added
at the cut (no training: the cost a run would start from).

The ranking tables of every cut come from one layer-by-layer pass of the vocabulary, cached
under ``$PHALANX_CACHE/privacy`` (:mod:`phalanx.privacy.table`). A learned decoder per cut is
trained on standard-library docstrings (disjoint from the pydoc passages attacked). Gradient
rows: labels from the gradient at the head's input, and the token set from a value-projection
weight gradient, and from the LoRA gradients of the first server layer's attention
(:mod:`phalanx.privacy.lora_leak`: at initialisation and after a few steps on public text),
leaving an enclave. Victims whose stage 0 drifted from the public weights, and
DP-Forward (clip + noise, epsilon from Opacus' RDP accountant) beside the plain noise, at the
first cut, with each mechanism's tokens/s on the same forward passes.

Writes ``summary.json``, ``table.md`` and ``recovery.png`` (:mod:`.privacy_report`).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from phalanx.errors import ConfigError
from phalanx.experiments.privacy_rows import perplexity
from phalanx.models.stages import blocks_of


@dataclass(kw_only=True)
class PrivacySpec:
    """Which model, cuts, texts, victims and noise levels."""

    model: str = "smollm2"
    cuts: tuple[int, ...] = (1, 2, 4, 8, 16)
    sequences: int = 2  # held-out pydoc topics passages
    tokens: int = 16  # tokens of each
    budget: int = 512  # candidates the search tries per position
    sigmas: tuple[float, ...] = (0.5, 2.0, 8.0)  # noise std / each token's RMS, at cuts[0]
    dp_multipliers: tuple[float, ...] = (0.03, 0.3, 3.0)  # DP-Forward noise / clip, at cuts[0]
    delta: float = 1e-5
    drifts: tuple[float, ...] = (1e-3, 1e-2, 1e-1)  # victim's stage-0 noise / tensor RMS
    public_tokens: int = 32768  # stdlib docstring tokens the decoder learns from
    decoder_steps: int = 300
    val_batches: int = 4  # validation batches (8 x 64 tokens) for the utility cost
    lora_rank: int = 8  # LoRA adapters of the gradient rows (attention of the first server layer)
    lora_steps: int = 5  # AdamW steps (lr 1e-3, 8 public blocks each) before the attack
    cache: bool = True  # ranking tables in $PHALANX_CACHE/privacy
    seed: int = 0

    @classmethod
    def quick(cls) -> PrivacySpec:
        return cls(model="tiny", cuts=(1, 2), sequences=2, tokens=8, budget=256,
                   sigmas=(2.0, 64.0), dp_multipliers=(0.1, 10.0), drifts=(1e-3, 1.0),
                   public_tokens=4096, decoder_steps=100, val_batches=1, lora_rank=3,
                   cache=False)


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


def _public(tokenizer, spec: PrivacySpec) -> torch.Tensor:  # noqa: ANN001
    """(N, 64) blocks of the attacker's public text: standard-library docstrings."""
    from phalanx.data.stdlib import stdlib_documents

    ids: list[int] = []
    for _, text in stdlib_documents():
        ids += tokenizer.encode(text)
        if len(ids) >= spec.public_tokens:
            break
    n = min(len(ids), spec.public_tokens) // 64
    return torch.tensor(ids[: n * 64], dtype=torch.long).view(n, 64)


def _hidden_of(out: torch.Tensor | tuple) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@contextmanager
def mechanism_at(model: nn.Module, family: str, cut: int,
                 mechanism: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """The model with ``mechanism`` applied to the hidden states after its first ``cut``
    layers (what the next stage would receive)."""

    def hook(_m: nn.Module, _a: tuple, out: torch.Tensor | tuple):  # noqa: ANN202
        h = mechanism(_hidden_of(out))
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handle = blocks_of(model, family)[cut - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _cost(lm, val: list[torch.Tensor], cut: int, mechanism, base: tuple[float, float]) -> dict:  # noqa: ANN001
    """Validation perplexity and tokens/s with ``mechanism`` at ``cut``, against ``base``
    (perplexity, seconds) without it."""
    t0 = time.perf_counter()
    with mechanism_at(lm.model, lm.family, cut, mechanism):
        ppl = perplexity(lm.model, val)
    seconds = time.perf_counter() - t0
    return {"val_ppl": ppl, "ppl_cost": ppl / base[0] - 1, "tokens_per_s_ratio": base[1] / seconds}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(spec: PrivacySpec, out: Path) -> dict:
    """Every cut, the decoder, the gradient attacks, drifted victims, then every noise level
    and DP-Forward setting at the first cut; writes the results."""
    from phalanx.data import DataConfig, build_data
    from phalanx.experiments import privacy_report
    from phalanx.experiments import privacy_rows as pr
    from phalanx.models import ModelConfig, load_model
    from phalanx.models.loading import cache_root
    from phalanx.privacy import (
        DPForward,
        Prefix,
        add_noise,
        context_free_tables,
        cut_hidden,
        finetuned_copy,
        fit_decoder,
        perturbed_copy,
        validate_cut,
        validate_sigma,
    )

    torch.manual_seed(spec.seed)
    lm = load_model(ModelConfig(name=spec.model))
    lm.model.eval()
    layers = len(blocks_of(lm.model, lm.family))
    for c in spec.cuts:
        validate_cut(c, layers - 1)
        if c == 0:
            raise ConfigError("privacy cut=0 sends the embeddings themselves: use cuts >= 1")
    for s in (*spec.sigmas, *spec.drifts):
        validate_sigma(s)
    if not (isinstance(spec.lora_rank, int) and spec.lora_rank >= 1 and spec.lora_steps >= 0):
        raise ConfigError(f"privacy lora_rank={spec.lora_rank!r} must be a positive integer and "
                          f"lora_steps={spec.lora_steps!r} at least 0")
    for m in spec.dp_multipliers:
        validate_sigma(m, "noise_multiplier")
    ids = _texts(lm.tokenizer, spec)
    val = build_data(DataConfig(seq_len=64), lm.tokenizer).val_batches(8, spec.val_batches)
    out.mkdir(parents=True, exist_ok=True)
    deepest = Prefix(lm.model, lm.family, max(spec.cuts))
    anchor = int(lm.tokenizer.eos_id or 0)
    t0 = time.perf_counter()
    tables = context_free_tables(
        deepest, [0, *spec.cuts], anchor,
        cache_dir=cache_root(ModelConfig(name=spec.model)) / "privacy" if spec.cache else None,
        progress=lambda k, n: _log(f"[tables] layer {k}/{n} of the vocabulary pass"))
    table_s = time.perf_counter() - t0
    _log(f"[decoder] hidden states of {spec.public_tokens} public tokens at every cut ...")
    public = _public(lm.tokenizer, spec)
    feats = {c: [] for c in spec.cuts}
    for part in public.split(16):
        for c, h in deepest.at_cuts(part, list(spec.cuts)).items():
            feats[c].append(h.reshape(-1, h.shape[-1]).float())
    rows, decoders = [], {}
    for k, cut in enumerate(spec.cuts, 1):
        _log(f"[cut {k}/{len(spec.cuts)}] {cut} layers at the data owner ...")
        row = pr.search_row(lm, ids, cut, tables[cut], spec.budget)
        t0 = time.perf_counter()
        decoders[cut] = fit_decoder(deepest, public, feats=torch.cat(feats[cut]),
                                    seen_only=True, steps=spec.decoder_steps, seed=spec.seed)
        row["decoder"] = pr.decoder_row(decoders[cut], cut_hidden(lm.model, lm.family, ids, cut),
                                        ids)
        row["decoder_fit_s"] = time.perf_counter() - t0
        rows.append(row)
    first = spec.cuts[0]
    _log("[gradients] labels from the head's input gradient, tokens from weight gradients ...")
    gradients = {"labels": pr.head_label_row(lm, ids),
                 "weights": [pr.weight_grad_row(lm, ids, c, tables[c].alone)
                             for c in sorted({0, first})]}
    if lm.family == "llama":  # separate q, k, v projections
        _log(f"[gradients] LoRA (rank {spec.lora_rank}) gradients of layers 0 and {first} ...")
        gradients["lora"] = [
            row for c in sorted({0, first})
            for row in pr.lora_grad_rows(lm, ids, c, tables[c].alone, public,
                                         rank=spec.lora_rank, steps=spec.lora_steps,
                                         seed=spec.seed)]
    _log(f"[victims] stage 0 drifted from the public weights, cut {first} ...")
    victims = []
    for rel in spec.drifts:
        victim = perturbed_copy(lm.model, lm.family, first, rel, seed=spec.seed)
        h = cut_hidden(victim, lm.family, ids, first)
        victims.append({"victim": f"perturbed {rel:g} x RMS", "rel_std": rel,
                        **pr.search_row(lm, ids, first, tables[first], spec.budget, h),
                        "decoder": pr.decoder_row(decoders[first], h, ids)})
    victim = finetuned_copy(lm.model, lm.family, first, ids, steps=5, lr=1e-3)
    h = cut_hidden(victim, lm.family, ids, first)
    victims.append({"victim": "fine-tuned (5 SGD steps, lr 1e-3, on its own text)",
                    **pr.search_row(lm, ids, first, tables[first], spec.budget, h),
                    "decoder": pr.decoder_row(decoders[first], h, ids)})
    del victim
    t0 = time.perf_counter()
    base_ppl = perplexity(lm.model, val)
    base = (base_ppl, time.perf_counter() - t0)
    clip = float(torch.cat(feats[first]).norm(dim=-1).median())  # from public text only
    noise, dp = [], []
    settings = [("noise", s, lambda h, g=None, s=s: add_noise(h, s, generator=g))
                for s in spec.sigmas]
    settings += [("dp", m, DPForward(clip=clip, noise_multiplier=m)) for m in spec.dp_multipliers]
    for kind, level, mech in settings:
        _log(f"[{kind}] {level:g} at cut {first} ...")
        gen = torch.Generator().manual_seed(spec.seed)
        h = mech(cut_hidden(lm.model, lm.family, ids, first), gen)
        row = {**pr.search_row(lm, ids, first, tables[first], spec.budget, h),
               "decoder": pr.decoder_row(decoders[first], h, ids),
               **_cost(lm, val, first, lambda x, mech=mech, g=gen: mech(x, g), base)}
        if kind == "noise":
            noise.append({"sigma": level, **row})
        else:
            eps = mech.epsilon(steps=1, delta=spec.delta, seq_len=spec.tokens)
            dp.append({"noise_multiplier": level, "clip": clip, "epsilon": eps,
                       "delta": spec.delta, **row})
    _log(f"[encryption] attacks on the AES-GCM ciphertext of cut {first} ...")
    h = pr.ciphertext_view(cut_hidden(lm.model, lm.family, ids, first))
    crypt = pr.crypto_seconds([cut_hidden(lm.model, lm.family, b, first) for b in val])
    encryption = {**pr.search_row(lm, ids, first, tables[first], spec.budget, h),
                  "decoder": pr.decoder_row(decoders[first], h, ids),
                  "tokens_per_s_ratio": base[1] / (base[1] + crypt)}
    summary = {"spec": dict(vars(spec)), "model": lm.source, "layers": layers,
               "val_ppl": base_ppl, "table_s": table_s, "cuts": rows, "gradients": gradients,
               "victims": victims, "noise": noise, "dp_forward": dp, "encryption": encryption}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=list) + "\n")
    (out / "table.md").write_text(privacy_report.table(summary))
    privacy_report.plot(summary, out / "recovery.png")
    return summary

