"""The secure transport's cost: tokens/s of one pipeline over TLS with encryption and signing,
with signing off, in the clear (TLS authenticates, then plain TCP, unsigned), and over the
torch.distributed gloo runtime, in one run.

Each system is an ordinary ``phalanx train`` run (one process per stage, the same model,
batches and optimizer), repeated ``--reps`` times in alternation. A run's figure is
``tokens per step / median step time`` over its steps after the first (start-up, model loading
and evaluation are left out). Output: progress on stderr, then one JSON line with each system's
median tokens/s and the overheads, as fractions:

* ``encryption_overhead`` = 1 - tok/s(encrypt, no sign) / tok/s(clear, no sign)
* ``signing_overhead``    = 1 - tok/s(encrypt + sign) / tok/s(encrypt, no sign)
* ``total_overhead``      = 1 - tok/s(encrypt + sign) / tok/s(clear, no sign)
* ``clear_vs_gloo``       = tok/s(clear, no sign) / tok/s(gloo)

Usage::

    python benchmarks/secure.py --model smollm2 --stages 4 --steps 5 --reps 2
    phalanx bench secure --model tiny --steps 4 --reps 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEMS = {
    "secure": ['pipeline.runtime="secure"'],
    "secure_unsigned": ['pipeline.runtime="secure"', "secure.sign=false"],
    "clear": ['pipeline.runtime="secure"', "secure.sign=false", "secure.encrypt=false"],
    "gloo": ['pipeline.runtime="distributed"'],
}


def log(msg: str) -> None:
    print(f"[bench secure] {msg}", file=sys.stderr, flush=True)


def tokens_per_s(a: argparse.Namespace, overrides: list[str], out: Path, name: str) -> float:
    """One ``phalanx train`` run at ``a``'s scale with ``overrides``; its tokens/s over the
    steps after the first."""
    cmd = [sys.executable, "-m", "phalanx.cli", "train", f"model.name={json.dumps(a.model)}",
           f"pipeline.micro_batches={a.micro_batches}",
           f"train.batch_size={a.batch_size}", f"data.seq_len={a.seq_len}",
           f"train.steps={a.steps + 1}", "train.save=false", "train.progress=false",
           "train.eval_batches=1", "optim.warmup_steps=0", f"train.out_dir={json.dumps(str(out))}",
           *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    if r.returncode:
        raise SystemExit(f"bench: {name} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return a.batch_size * a.seq_len / statistics.median(s["step_s"] for s in steps)


def run(a: argparse.Namespace, system: str, out: Path) -> float:
    """One ``phalanx train`` run of ``system``; its tokens/s."""
    return tokens_per_s(a, [f"pipeline.stages={a.stages}", *SYSTEMS[system]], out, system)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench secure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", help="also write the JSON line to this file")
    a = ap.parse_args(argv)
    if a.stages < 2 or a.steps < 1 or a.reps < 1:
        ap.error("--stages >= 2, --steps >= 1 and --reps >= 1")
    t0 = time.perf_counter()
    tps: dict[str, list[float]] = {s: [] for s in SYSTEMS}
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-secure-") as tmp:
        for rep in range(a.reps):
            for system in SYSTEMS:
                tps[system].append(run(a, system, Path(tmp) / f"{system}-{rep}"))
                log(f"rep {rep + 1}/{a.reps}: {system} {tps[system][-1]:.1f} tokens/s")
    med = {s: statistics.median(v) for s, v in tps.items()}
    rec = {
        "benchmark": "secure",
        **{f"{s}_tokens_per_s": v for s, v in med.items()},
        "encryption_overhead": 1 - med["secure_unsigned"] / med["clear"],
        "signing_overhead": 1 - med["secure"] / med["secure_unsigned"],
        "total_overhead": 1 - med["secure"] / med["clear"],
        "clear_vs_gloo": med["clear"] / med["gloo"],
        "reps": tps,
        "settings": {"model": a.model, "stages": a.stages, "micro_batches": a.micro_batches,
                     "batch_size": a.batch_size, "seq_len": a.seq_len, "steps": a.steps,
                     "reps": a.reps},
        "wall_s": time.perf_counter() - t0,
    }
    return emit(rec, a.out)


def emit(rec: dict, out: str | None) -> int:
    """Print the benchmark's JSON line (and write it to ``out``)."""
    line = json.dumps(rec)
    if out:
        Path(out).write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
