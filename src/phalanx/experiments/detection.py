"""Detection coverage: every attack of the threat model against the duplicated block.

For each forward attack (the forged consistent pair included) and each backward attack, a short
run in which a random middle stage attacks every iteration (p = 1), with the duplicated block,
jumping connection and skip layer on. Reports, per attack, the attacked and detected
iterations, whether the blame named the attacker, and false alerts.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from phalanx.experiments.robustness import Runner
from phalanx.experiments.scoring import Cell, score
from phalanx.experiments.spec import ShortRuns
from phalanx.threats.attacks import BACKWARD_ATTACKS, FORWARD_ATTACKS


@dataclass(kw_only=True)
class DetectionSpec(ShortRuns):
    """Scale of the coverage runs (simulator: one process, the same stage code)."""

    strength: float = 4.0  # the factor of ``scale``, σ of ``gaussian``; below: every attack

    @classmethod
    def quick(cls) -> DetectionSpec:
        return cls(model="tiny", stages=4, steps=2, seq_len=16)


def attacks() -> list[tuple[str, str]]:
    """(direction, name) of every attack."""
    return [("forward", a) for a in [*sorted(FORWARD_ATTACKS), "forged"]] + [
        ("backward", a) for a in sorted(BACKWARD_ATTACKS)]


def run(spec: DetectionSpec, out: Path) -> list[dict]:
    """Run every attack; write ``summary.json`` and ``table.md`` into ``out``."""
    from phalanx.experiments.report import read_run

    rows = []
    for k, (direction, name) in enumerate(attacks(), 1):
        run_dir = out / "runs" / f"{direction}-{name}"
        settings = [
            f"model.name={json.dumps(spec.model)}", f"pipeline.stages={spec.stages}",
            f"pipeline.micro_batches={spec.micro_batches}", f"train.batch_size={spec.batch_size}",
            f"data.seq_len={spec.seq_len}", f"train.steps={spec.steps}", "train.eval_batches=1",
            "train.save=false", "train.progress=false", f"train.out_dir={json.dumps(str(run_dir))}",
            f"attack.{direction}={json.dumps(name)}", "attack.rate=1.0",
            f"attack.strength={spec.strength}", f"attack.seed={spec.seed}",
            'defense.verify="duplicate"', 'defense.recovery="skip"', *spec.extra]
        Runner.train_here(settings)
        records, summary = read_run(run_dir)
        row = score(Cell(name, 1.0, "skip"), records, summary)
        row["direction"] = direction
        rows.append(row)
        print(f"[{k}/{len(attacks())}] {direction} {name}: detected {row['detected_iterations']}"
              f"/{row['attacked_iterations']}", file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    keep = ("direction", "attack", "attacked_iterations", "detected_iterations", "blame_correct",
            "false_alerts", "comparisons", "max_agreeing_deviation")
    (out / "summary.json").write_text(json.dumps(
        {"spec": spec.__dict__, "runs": [{k: r[k] for k in keep} for r in rows]}, indent=1)
        + "\n")
    lines = [f"Detection coverage: {spec.model}, {spec.stages} stages, {spec.steps} iterations "
             "per attack, a random middle stage attacking every iteration.", "",
             "| direction | attack | attacked | detected | blame correct | false alerts |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        bc = "–" if r["blame_correct"] is None else f"{100 * r['blame_correct']:.0f}%"
        lines.append(f"| {r['direction']} | {r['attack']} | {r['attacked_iterations']} | "
                     f"{r['detected_iterations']} | {bc} | {r['false_alerts']} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return rows
