"""The cost of split fine-tuning's security machinery: tokens/s of a split LoRA run (client and
server as two processes over TLS) with the server's stage in the simulated enclave (attested,
every client-server frame encrypted end to end, checkpoints sealed) against the same split
without it, and of the masked method (the server's frozen linear layers on its host on masked,
Freivalds-checked inputs) against the enclave alone, in one run.

Each system is an ordinary ``phalanx train`` run, repeated ``--reps`` times in alternation; a
run's figure is tokens per step / median step time over its steps after the first. Output:
progress on stderr, then one JSON line with each system's median tokens/s and

* ``security_overhead`` = 1 - tok/s(enclave) / tok/s(plain)
* ``masking_overhead``  = 1 - tok/s(masked) / tok/s(enclave)

Usage::

    python benchmarks/split.py --model smollm2 --steps 4 --reps 3
    phalanx bench split --model tiny --steps 4 --reps 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from secure import emit, tokens_per_s  # noqa: E402

SPLIT = ['pipeline.runtime="secure"', 'split.mode="layers"', 'trainable.method="lora"',
         "optim.lr=2e-3"]
SYSTEMS = {
    "plain": SPLIT,
    "enclave": [*SPLIT, 'split.enclave="simulated"'],
    "masked": [*SPLIT, 'split.enclave="simulated"', "split.masked=true"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench split", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--cut", type=int, default=2, help="the client's layers")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per run (after one)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="subset, comma-separated")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", help="also write the JSON line to this file")
    a = ap.parse_args(argv)
    systems = [s.strip() for s in a.systems.split(",")]
    if a.steps < 1 or a.reps < 1 or not set(systems) <= set(SYSTEMS):
        ap.error(f"--steps >= 1, --reps >= 1, --systems among {','.join(SYSTEMS)}")
    t0 = time.perf_counter()
    tps: dict[str, list[float]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-split-") as tmp:
        for rep in range(a.reps):
            for system in systems:
                out = Path(tmp) / f"{system}-{rep}"
                tps[system].append(tokens_per_s(a, [*SYSTEMS[system], f"split.cut={a.cut}"],
                                                out, system))
                print(f"[bench split] rep {rep + 1}/{a.reps}: {system} "
                      f"{tps[system][-1]:.1f} tokens/s", file=sys.stderr, flush=True)
    med = {s: statistics.median(v) for s, v in tps.items()}
    rec: dict = {"benchmark": "split", **{f"{s}_tokens_per_s": v for s, v in med.items()}}
    if {"plain", "enclave"} <= set(med):
        rec["security_overhead"] = 1 - med["enclave"] / med["plain"]
    if {"enclave", "masked"} <= set(med):
        rec["masking_overhead"] = 1 - med["masked"] / med["enclave"]
    rec.update(reps=tps, settings={k: getattr(a, k) for k in (
        "model", "cut", "micro_batches", "batch_size", "seq_len", "steps", "reps")},
        wall_s=time.perf_counter() - t0)
    return emit(rec, a.out)


if __name__ == "__main__":
    raise SystemExit(main())
