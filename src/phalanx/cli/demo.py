"""``phalanx demo``: fine-tune SmolLM2-135M as a 4-stage pipeline on the bundled corpus."""

from __future__ import annotations

import sys

DEMO_OVERRIDES = [
    'model.name="smollm2"', "pipeline.stages=4", 'pipeline.schedule="1f1b"',
    "pipeline.micro_batches=4", 'pipeline.runtime="distributed"', "data.seq_len=128",
    "train.batch_size=8", "train.steps=16", "train.eval_batches=4", "train.eval_every=4",
    "optim.lr=2e-4", "optim.warmup_steps=3", "train.save=false",
]


def run_demo(out: str, overrides: list[str]) -> int:
    """Train with the demo settings (overridable) and print validation perplexity before/after."""
    from phalanx.cli.main import main

    argv = ["train", *DEMO_OVERRIDES, f'train.out_dir="{out}"', *overrides]
    print("phalanx demo: SmolLM2-135M, 4 pipeline stages (one process each, gloo), 1F1B, "
          "bundled Python-docs corpus", file=sys.stderr)
    code = main(argv)
    if code:
        return code
    from pathlib import Path

    from phalanx.experiments.report import markdown, plot_run, read_run

    _, summary = read_run(Path(out))
    print()
    print(markdown(summary))
    print(f"\nloss curve: {plot_run(Path(out))}; metrics: {out}/metrics.jsonl")
    return 0
