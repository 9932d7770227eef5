"""``phalanx demo``: fine-tune SmolLM2-135M as a 4-stage pipeline on the bundled corpus."""

from __future__ import annotations

import json
import sys

DEMO_OVERRIDES = [
    'model.name="smollm2"', "pipeline.stages=4", 'pipeline.schedule="1f1b"',
    "pipeline.micro_batches=4", 'pipeline.runtime="distributed"', "data.seq_len=128",
    "train.batch_size=8", "train.steps=16", "train.eval_batches=4", "optim.lr=2e-4",
    "optim.warmup_steps=3", "train.save=false",
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
    with open(f"{out}/summary.json") as f:
        s = json.load(f)
    print()
    print("| | validation perplexity |")
    print("|---|---|")
    print(f"| before fine-tuning | {s['val_ppl_start']:.2f} |")
    print(f"| after {s['steps']} steps | {s['val_ppl_end']:.2f} |")
    print(f"\n{s['tokens_per_s']:.0f} tokens/s, peak RSS {s['peak_rss_mb']:.0f} MiB per process, "
          f"{s['wall_s']:.0f} s; metrics in {out}/metrics.jsonl")
    return 0
