"""``phalanx demo``: SmolLM2-135M as a pipeline of 4 processes, trained four times on the
bundled corpus: clean, under a poisoning attack, and under the same attack with the duplicated
block + jumping connection recovering by skip layer, then by repair. Prints a table and writes
a plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from phalanx.experiments import robustness as rb

DEMO = rb.Spec(model="smollm2", stages=4, runtime="distributed", steps=10, batch_size=4,
               micro_batches=4, seq_len=64, eval_every=5, eval_batches=4, lr=2e-4,
               warmup_steps=2, rates=(0.7,))
ATTACK = "sign_flip"  # forward: a random middle stage negates what it sends, p = 0.7
CELLS = [rb.Cell("clean", 0.0, "none"), rb.Cell(ATTACK, 0.7, "none"),
         rb.Cell(ATTACK, 0.7, "skip"), rb.Cell(ATTACK, 0.7, "repair")]


def run_demo(out: str, overrides: list[str]) -> int:
    """Run the three cells (always afresh), print the table, write summary and plot."""
    spec = rb.Spec(**{**DEMO.__dict__, "extra": list(overrides)})
    print(f"phalanx demo: SmolLM2-135M, {spec.stages} pipeline stages (one process each, gloo), "
          f"{spec.steps} steps of {spec.batch_size}x{spec.seq_len} tokens of Python docs; "
          f"clean, then a {ATTACK} attack by a random middle stage in 70% of the iterations, "
          "without defense, with the duplicated block + jumping connection + skip layer, and "
          "with the same block repairing the poisoned messages",
          file=sys.stderr)
    rows = rb.Runner(spec, Path(out), fresh=True).run(CELLS)
    summary = rb.write(rows, spec, Path(out))
    print()
    print(headline(rows))
    print(f"\nplot: {out}/val_ppl.png; table: {out}/table.md; runs: {out}/runs/")
    print(json.dumps({r["run"]: round(r["val_ppl_end"], 3) for r in rows}
                     | {"detection_rate": summary["totals"]["detection_rate"]}))
    return 0


def headline(rows: list[dict]) -> str:
    """The demo's three rows as a short Markdown table."""
    names = {"clean": "clean", "none": "attacked, no defense",
             "skip": "attacked, duplicated block + skip layer",
             "repair": "attacked, duplicated block + repair"}
    lines = ["| run | val ppl start | val ppl end | × clean | attacked its. | detected | "
             "blame correct | tok/s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = names["clean" if r["attack"] == "clean" else r["defense"]]
        bc = "–" if r["blame_correct"] is None else f"{100 * r['blame_correct']:.0f}%"
        det = "–" if r["defense"] == "none" else str(r["detected_iterations"])
        lines.append(f"| {name} | {r['val_ppl_start']:.2f} | {r['val_ppl_end']:.2f} | "
                     f"{r['ppl_ratio_to_clean']:.3f} | {r['attacked_iterations']} | {det} | "
                     f"{bc} | {r['tokens_per_s']:.0f} |")
    return "\n".join(lines)
