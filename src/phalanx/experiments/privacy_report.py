"""The privacy experiment's Markdown table and plot, from its summary dict."""

from __future__ import annotations

from pathlib import Path


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _best(r: dict) -> float:
    return max(r["exact_search"]["token_recovery"], r["decoder"]["token_recovery"])


def table(summary: dict) -> str:
    """Every row family of the summary as Markdown tables."""
    lines = [f"Model {summary['model']} ({summary['layers']} layers); ranking tables "
             f"{summary['table_s']:.0f} s (one vocabulary pass for every cut, or the cache).", "",
             "| cut (layers at the data owner) | exact search: tokens | exact sequences | "
             "learned decoder: tokens | nearest embedding | search s/token |",
             "|---|---|---|---|---|---|"]
    for r in summary["cuts"]:
        lines.append(f"| {r['cut']} | {_pct(r['exact_search']['token_recovery'])} | "
                     f"{r['exact_search']['exact_match']:.0%} | "
                     f"{_pct(r['decoder']['token_recovery'])} | "
                     f"{_pct(r['nearest_embedding']['token_recovery'])} | "
                     f"{r['search_s_per_token']:.2f} |")
    g = summary["gradients"]
    lines += ["", "Gradients:", "", "| what leaks | recovered |", "|---|---|",
              f"| {g['labels']['attack']} (last untrusted stage, backward) | "
              f"{_pct(g['labels']['token_recovery'])} of the labels (the text shifted by one) |"]
    for w in g["weights"]:
        lines.append(f"| {w['attack']} (leaving an enclave) | token-set F1 {w['token_f1']:.2f} |")
    for w in g.get("lora", []):
        lines.append(f"| {w['attack']} (leaving an enclave; attacker needs "
                     f"{w['attacker_needs']}) | token-set F1 {w['token_f1']:.2f} "
                     f"({w['distinct_tokens']:.1f} distinct tokens a sequence) |")
    first = summary["cuts"][0]["cut"]
    lines += ["", f"Victim's stage 0 drifted from the public weights (cut {first}):", "",
              "| victim | exact search: tokens | exact matches | decoder: tokens |",
              "|---|---|---|---|"]
    for v in summary["victims"]:
        lines.append(f"| {v['victim']} | {_pct(v['exact_search']['token_recovery'])} | "
                     f"{v['matched']:.0%} | {_pct(v['decoder']['token_recovery'])} |")
    lines += ["", f"Defenses at cut {first} (validation perplexity without: "
              f"{summary['val_ppl']:.2f}); tokens/s ratio = forward throughput with the "
              "mechanism / without, same run:", "",
              "| defense | exact search: tokens | decoder: tokens | ROUGE-L (best attack) | "
              "val ppl | ppl cost | tokens/s ratio |", "|---|---|---|---|---|---|---|"]
    rows = [(f"Gaussian noise {r['sigma']:g} x token RMS", r) for r in summary["noise"]]
    rows += [(f"DP-Forward clip {r['clip']:.3g}, noise {r['noise_multiplier']:g} x clip "
              f"(epsilon {r['epsilon']:.3g} per {summary['spec']['tokens']}-token sequence, "
              f"delta {r['delta']:g})", r) for r in summary["dp_forward"]]
    for name, r in rows:
        rouge = max(r["exact_search"]["rouge_l"], r["decoder"]["rouge_l"])
        lines.append(f"| {name} | {_pct(r['exact_search']['token_recovery'])} | "
                     f"{_pct(r['decoder']['token_recovery'])} | {rouge:.2f} | "
                     f"{r['val_ppl']:.4g} | {r['ppl_cost']:+.1%} | {r['tokens_per_s_ratio']:.2f} |")
    if "encryption" in summary:
        e, c = summary["encryption"], summary["cuts"][0]
        lines += ["", f"Encryption of cut {first} (AES-256-GCM session, as split fine-tuning's "
                  "enclave link): the attacks on the ciphertext read as the tensor, and on what "
                  "the receiving stage decrypts:", "",
                  "| who | exact search: tokens | decoder: tokens | tokens/s ratio |",
                  "|---|---|---|---|",
                  f"| eavesdropper, or the host around an enclave (ciphertext only) | "
                  f"{_pct(e['exact_search']['token_recovery'])} | "
                  f"{_pct(e['decoder']['token_recovery'])} | {e['tokens_per_s_ratio']:.2f} |",
                  f"| the receiving stage outside an enclave (decrypts: encryption in transit "
                  f"does not stop it) | {_pct(c['exact_search']['token_recovery'])} | "
                  f"{_pct(c['decoder']['token_recovery'])} | {e['tokens_per_s_ratio']:.2f} |"]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Recovery against cut depth, and recovery (best attack) against perplexity cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    cuts = [r["cut"] for r in summary["cuts"]]
    for key, style, label in (("exact_search", "o-", "exact search"),
                              ("decoder", "^-", "learned decoder"),
                              ("nearest_embedding", "s--", "nearest embedding")):
        a.plot(cuts, [r[key]["token_recovery"] for r in summary["cuts"]], style, label=label)
    a.set_xscale("log", base=2)
    a.set_xlabel("layers kept by the data owner")
    a.set_ylabel("tokens recovered")
    a.legend()
    for rows, key, style, label in ((summary["noise"], "sigma", "o-", "Gaussian σ"),
                                    (summary["dp_forward"], "noise_multiplier", "s-",
                                     "DP-Forward z")):
        xs = [max(r["ppl_cost"], 1e-4) for r in rows]
        b.plot(xs, [_best(r) for r in rows], style, label=label)
        for x, r in zip(xs, rows, strict=True):
            b.annotate(f"{r[key]:g}", (x, _best(r)), fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("validation perplexity cost (relative)")
    b.set_ylabel("tokens recovered (best attack)")
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
