"""Cost of the defenses: tokens/s and peak memory of each setting against no defense.

Each setting trains the same model on the same batches with ``phalanx train`` (by default the
distributed runtime: one process per stage, gloo), under the same attack (none by default):

* ``none``      -- no verification;
* ``skip``      -- duplicated block + jumping connection, skip-layer recovery;
* ``restart``   -- duplicated block + jumping connection, the iteration is redone on an alert;
* ``second``    -- skip, plus a second replica of each stage two stages on
  (``defense.second=replica``: catches a colluding adjacent pair).

Repetitions alternate the settings (none, skip, restart, none, ...), each a fresh run. Tokens/s
of a run is the tokens of its steps after ``--warmup`` over their summed step time (from
``metrics.jsonl``; evaluation and start-up are not counted); peak memory is the largest peak RSS
of its processes and the sum of its processes' peaks (``summary.json``). The JSON line on
stdout has the median of each setting, the ratios to ``none`` (``tokens_per_s_ratio``: < 1 is
slower; ``peak_rss_ratio``, ``total_rss_ratio``: > 1 is more memory), the per-repetition
figures and the settings. Progress goes to stderr.

Usage::

    python benchmarks/defense.py --model smollm2 --stages 6 --steps 6 --reps 3
    phalanx bench defense --model tiny --stages 4 --runtime local
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SETTINGS = {
    "none": [],
    "skip": ['defense.verify="duplicate"', 'defense.recovery="skip"'],
    "restart": ['defense.verify="duplicate"', 'defense.recovery="restart"'],
    "second": ['defense.verify="duplicate"', 'defense.recovery="skip"',
               'defense.second="replica"'],
}


def log(msg: str) -> None:
    print(f"[bench defense] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stages", type=int, default=6)
    ap.add_argument("--runtime", choices=("local", "distributed"), default="distributed")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="steps per run, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of tokens/s")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--attack", default="none",
                    help='attack during the runs: none, or e.g. forward=sign_flip')
    ap.add_argument("--attack-rate", type=float, default=0.3)
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help="comma-separated subset of " + ",".join(SETTINGS) + " (with none)")
    ap.add_argument("--out", help="also write the JSON result to this file")
    a = ap.parse_args(argv)
    a.settings = [s.strip() for s in a.settings.split(",")]
    if not set(a.settings) <= set(SETTINGS) or "none" not in a.settings:
        ap.error(f"--settings: choose among {','.join(SETTINGS)}, including none")
    if "second" in a.settings and a.stages < 4:
        ap.error("the second replica needs at least 4 stages")
    if a.steps <= a.warmup:
        ap.error("--steps must exceed --warmup")
    if a.stages < 3:
        ap.error("the duplicated block needs at least 3 stages")
    return a


def overrides(a: argparse.Namespace, setting: str, out: Path) -> list[str]:
    o = [f"model.name={json.dumps(a.model)}", f"pipeline.stages={a.stages}",
         f"pipeline.runtime={json.dumps(a.runtime)}", f"pipeline.micro_batches={a.micro_batches}",
         f"train.batch_size={a.batch_size}", f"data.seq_len={a.seq_len}",
         f"train.steps={a.steps}", "train.eval_batches=1", "train.save=false",
         "train.progress=false", f"train.out_dir={json.dumps(str(out))}", *SETTINGS[setting]]
    if a.attack != "none":
        direction, _, name = a.attack.partition("=")
        o += [f"attack.{direction}={json.dumps(name)}", f"attack.rate={a.attack_rate}"]
    return o


def run_one(a: argparse.Namespace, setting: str, out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "phalanx.cli", "train", *overrides(a, setting, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{setting} run failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    recs = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    timed = recs[a.warmup:]
    tokens = a.batch_size * a.seq_len * len(timed)
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": tokens / sum(r["step_s"] for r in timed),
            "peak_rss_mb": float(summary["peak_rss_mb"]),
            "total_rss_mb": float(sum(summary["peak_rss_mb_per_process"])),
            "redone": sum(len(r.get("redone", [])) for r in recs)}


def summarise(a: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    keys = ("tokens_per_s", "peak_rss_mb", "total_rss_mb")
    med = {s: {k: statistics.median(r[k] for r in rs) for k in keys} for s, rs in runs.items()}
    base = med["none"]
    return {
        "benchmark": "defense",
        "median": med,
        "tokens_per_s_ratio": {s: m["tokens_per_s"] / base["tokens_per_s"] for s, m in med.items()
                               if s != "none"},
        "peak_rss_ratio": {s: m["peak_rss_mb"] / base["peak_rss_mb"] for s, m in med.items()
                           if s != "none"},
        "total_rss_ratio": {s: m["total_rss_mb"] / base["total_rss_mb"] for s, m in med.items()
                            if s != "none"},
        "runs": runs,
        "settings": {k: v for k, v in vars(a).items() if k != "out"},
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in a.settings}
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-defense-") as tmp:
        for rep in range(a.reps):
            for setting in a.settings:
                r = run_one(a, setting, Path(tmp) / f"{setting}-{rep}")
                runs[setting].append(r)
                log(f"rep {rep + 1}/{a.reps} {setting}: {r['tokens_per_s']:.1f} tok/s, "
                    f"peak {r['peak_rss_mb']:.0f} MiB")
    result = summarise(a, runs)
    line = json.dumps(result)
    print(line)
    if a.out:
        Path(a.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
