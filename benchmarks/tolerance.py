"""The duplicated block on mixed hardware: a calibrated tolerance, and the attack budget it leaves.

One machine cannot run two kinds of hardware, so the replicas here compute in float64 and round
back to float32 (``phalanx.defense.replica.OtherRounding``): an honest replica then no longer
agrees with its original bit for bit, as on other kernels. The benchmark

1. calibrates (``phalanx calibrate``: honest steps with ``defense.tolerance=measure``);
2. runs honest steps with the bitwise comparison (false alerts expected) and with the
   calibrated tolerance (none expected);
3. runs the ``drift`` attacker (a push of ``strength x 1e-6 x RMS`` in one fixed direction on
   every activation and gradient it sends) at multiples of the attacked stage's calibrated
   forward budget, and counts the attacked iterations whose first attempt raised an alert,
   and the honest stages blamed (``defense.recovery=none``: one attempt a step, alerts only).

Prints one JSON line (also written to ``--out``): the calibration, the honest alerts, and per
multiple of the budget the detection rate.

Usage::

    python benchmarks/tolerance.py --model smollm2 --stages 6 --out results/tolerance/bench.json
    python benchmarks/tolerance.py --model tiny --stages 4 --steps 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import phalanx.defense.replica as replica
from phalanx.cli.main import main


def log(msg: str) -> None:
    print(f"[bench tolerance] {msg}", file=sys.stderr, flush=True)


def run(base: list[str], extra: list[str], out: Path) -> list[dict]:
    """``phalanx train`` in this process (so the replicas round otherwise); its metrics."""
    code = main(["train", *base, *extra, f'train.out_dir="{out}"'])
    if code:
        raise SystemExit(f"phalanx train {' '.join(extra)} exited {code}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def first(rec: dict) -> dict:
    """The first attempt of a step (the one the attacker strikes)."""
    return (rec.get("redone") or [rec])[0]


def tally(metrics: list[dict], attacker: int | None) -> dict:
    attacked = [r for r in metrics if r["malicious"]]
    detected = [r for r in attacked if first(r)["alerts"]]
    honest_blamed = sorted({s for r in metrics for t in [*r.get("redone", []), r]
                            for s in t["blamed"] if s != attacker})
    alerts = sum(sum(first(r)["alerts"].values()) for r in metrics)
    return {"steps": len(metrics), "attacked": len(attacked), "detected": len(detected),
            "first_attempt_alerts": alerts, "honest_blamed": honest_blamed}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--stages", type=int, default=6)
    ap.add_argument("--attacker", type=int, default=2)
    ap.add_argument("--calibration-steps", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4, help="steps of each honest or attacked run")
    ap.add_argument("--margin", type=float, default=10.0)
    ap.add_argument("--multiples", default="0.1,0.3,1,3,10",
                    help="drift strengths, in multiples of the attacked stage's budget")
    ap.add_argument("--out", help="JSON file to write")
    return ap.parse_args(argv)


def bench(a: argparse.Namespace) -> dict:
    real = replica.shadow_of
    replica.shadow_of = lambda stage: replica.OtherRounding(real(stage))
    base = [f'model.name="{a.model}"', f"pipeline.stages={a.stages}", "pipeline.micro_batches=4",
            "train.batch_size=4", "data.seq_len=64", "train.eval_every=0", "train.eval_batches=1",
            "train.progress=false", "optim.warmup_steps=0", "optim.lr=2e-4",
            'defense.verify="duplicate"', 'defense.recovery="none"']  # alerts only: one attempt
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cal = t / "calibration.json"
        log(f"calibrating on {a.calibration_steps} honest steps")
        code = main(["calibrate", "--out", str(cal), "--margin", str(a.margin), *base,
                     f"train.steps={a.calibration_steps}", f'train.out_dir="{t / "cal"}"'])
        if code:
            raise SystemExit(f"phalanx calibrate exited {code}")
        calibration = json.loads(cal.read_text())
        steps = [f"train.steps={a.steps}"]
        calibrated = [*steps, 'defense.tolerance="calibrated"', f'defense.calibration="{cal}"']
        log("honest, bitwise")
        bitwise = tally(run(base, steps, t / "bitwise"), None)
        log("honest, calibrated")
        honest = tally(run(base, calibrated, t / "honest"), None)
        budget = calibration["rtol"]["forward"][a.attacker]
        drift = {}
        for m in (float(x) for x in a.multiples.split(",")):
            log(f"drift at {m} x the budget ({m * budget:.3g} x RMS)")
            attack = ['attack.adaptive="drift"', "attack.rate=1.0",
                      f"attack.stages=[{a.attacker}]", f"attack.strength={m * budget / 1e-6}"]
            drift[str(m)] = tally(run(base, [*calibrated, *attack], t / f"drift{m}"), a.attacker)
    return {"model": a.model, "stages": a.stages, "attacker": a.attacker,
            "calibration": {k: calibration[k] for k in ("margin", "deviation", "rtol")},
            "calibration_steps": a.calibration_steps, "honest_bitwise": bitwise,
            "honest_calibrated": honest, "budget_rms": budget, "drift": drift}


def main_(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    result = bench(a)
    line = json.dumps(result)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
