"""Reports of a run directory: a Markdown summary and a PNG of the training curve."""

from __future__ import annotations

import json
from pathlib import Path

from phalanx.errors import PhalanxError


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """The per-step records and the summary of a finished run."""
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not (metrics.is_file() and summary.is_file()):
        raise PhalanxError(f"{run_dir} is not a finished run directory (no metrics.jsonl and "
                           "summary.json); point at a train.out_dir")
    try:
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return records, json.loads(summary.read_text())
    except ValueError as exc:
        raise PhalanxError(f"{run_dir} holds malformed metrics: {exc}") from None


def markdown(summary: dict) -> str:
    """The headline numbers of a run as a Markdown table."""
    rows = [
        ("validation perplexity before", f"{summary['val_ppl_start']:.2f}"),
        ("validation perplexity after", f"{summary['val_ppl_end']:.2f}"),
        ("steps", str(summary["steps"])),
        ("tokens/s", f"{summary['tokens_per_s']:.0f}"),
        ("peak RSS per process (MiB)", f"{summary['peak_rss_mb']:.0f}"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Training loss per step, with validation loss at the start, during and at the end."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PhalanxError("plots need matplotlib: pip install 'phalanx[plot]'") from None
    records, summary = read_run(run_dir)
    out = out or run_dir / "loss.png"
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    # the loss of step s is measured with the weights after s updates
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], label="training loss",
            lw=1.5)
    val = [(0, summary["val_loss_start"])]
    val += [(r["step"] + 1, r["val_loss"]) for r in records if "val_loss" in r]
    val.append((summary["steps"], summary["val_loss_end"]))
    ax.plot(*zip(*val, strict=True), "o--", label="validation loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_title(f"{summary.get('model', '')}: {summary['config']['pipeline']['stages']}-stage "
                 f"{summary['config']['pipeline']['schedule']} pipeline", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
