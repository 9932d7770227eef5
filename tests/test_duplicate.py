"""Duplicated block + jumping connection: exact lockstep on honest runs, every forward attack
caught at the iteration it happens, the attacker named, in both runtimes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from phalanx.config import load_config
from phalanx.defense.duplicate import agrees
from phalanx.train import Config
from phalanx.train.setup import build_pipeline

BASE = ['model.name="tiny"', "pipeline.stages=4", "pipeline.micro_batches=2",
        "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0"]
BATCH = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))


def _run(extra: list[str], steps: int = 3):  # noqa: ANN202
    pipe = build_pipeline(load_config(Config, None, [*BASE, *extra]), steps + 2)
    losses = [pipe.runtime.train_step(s, BATCH).loss for s in range(steps)]
    return pipe, losses


def test_agrees_by_hand():
    a = torch.tensor([1.0, 2.0, -4.0])
    assert agrees(a, a.clone(), 0, 0)
    assert not agrees(a, a + 1e-7, 0, 0)  # bitwise mode
    assert agrees(a, a + 1e-5, rtol=1e-5, atol=0.0)  # 1e-5 <= 1e-5 * 4
    assert not agrees(a, a + 1e-4, rtol=1e-5, atol=0.0)
    assert not agrees(a, torch.tensor([1.0, float("nan"), -4.0]), 1.0, 1.0)
    assert not agrees(a, a[:2], 1.0, 1.0)


def test_honest_run_is_unchanged_raises_nothing_and_shadows_stay_in_lockstep():
    defended, d_losses = _run(['defense.verify="duplicate"', "defense.rtol=0", "defense.atol=0"])
    _, c_losses = _run([])
    assert d_losses == c_losses  # the defense does not touch the training
    verifiers = defended.defense.verifiers
    assert {v: (x.checked, len(x.alerts)) for v, x in verifiers.items()} == {2: (6, 0), 3: (6, 0)}
    workers = defended.runtime.workers
    for v in (2, 3):
        shadow = dict(workers[v].stage.shadow.named_parameters())
        original = dict(workers[v - 1].stage.named_parameters())
        assert set(shadow) == {k for k in original if not k.startswith("shadow.")}
        assert all(torch.equal(shadow[k], original[k]) for k in shadow)  # bitwise, 3 steps on


@pytest.mark.parametrize("attack", ["sign_flip", "gaussian", "gaussian_stats", "uniform",
                                    "scale", "zero"])
@pytest.mark.parametrize("attacker", [1, 2])
def test_every_forward_attack_is_caught_and_blamed(attack, attacker):
    pipe, _ = _run(['defense.verify="duplicate"', f'attack.forward="{attack}"',
                    "attack.rate=1.0", f"attack.stages=[{attacker}]", "attack.strength=0.5"])
    alerts = pipe.defense.drain()
    assert {(a.step, a.micro) for a in alerts} == {(s, m) for s in range(3) for m in range(2)}
    assert {a.suspect for a in alerts} == {attacker}
    assert {a.verifier for a in alerts} == {attacker + 1}


def test_detected_iterations_are_exactly_the_attacked_ones():
    pipe, _ = _run(['defense.verify="duplicate"', 'attack.forward="sign_flip"',
                    "attack.rate=0.5", "attack.seed=3"], steps=12)
    attacked = {s for s in range(12) if pipe.attack.malicious(s)}
    detected = {a.step for a in pipe.defense.drain()}
    assert 0 < len(attacked) < 12 and detected == attacked


@pytest.mark.slow
def test_distributed_run_detects_and_reports_alerts(tmp_path):
    args = [*BASE, "train.steps=2", "train.eval_batches=1", "train.progress=false",
            "data.seq_len=16", 'defense.verify="duplicate"', 'attack.forward="sign_flip"',
            "attack.rate=1.0", "attack.stages=[2]", 'pipeline.runtime="distributed"',
            f'train.out_dir="{tmp_path}"']
    out = subprocess.run([sys.executable, "-m", "phalanx.cli", "train", *args],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["alerts"] for r in recs] == [{"2": 2}, {"2": 2}]  # both micro-batches, stage 2


def test_forged_consistent_pair_is_caught_by_the_jumping_connection():
    """The attacker sends a'_out = stage(a'_in): recomputing from its claimed input a'_in would
    agree, but the verifier recomputes from the true input it got from the stage before."""
    from phalanx.threats.channel import forged_input

    pipe, _ = _run(['defense.verify="duplicate"', 'attack.forward="forged"', "attack.rate=1.0",
                    "attack.stages=[1]"], steps=2)
    alerts = pipe.defense.drain()
    assert {(a.step, a.micro, a.suspect) for a in alerts} == {
        (s, m, 1) for s in range(2) for m in range(2)}
    # what the attacker sent is stage 1's own output for its forged input a'_in (a consistent
    # pair): before any step, the first frame equals stage1(a'_in) recomputed here
    fresh, _ = _run(['defense.verify="duplicate"', 'attack.forward="forged"', "attack.rate=1.0",
                     "attack.stages=[1]"], steps=0)
    stage1 = fresh.runtime.workers[1].stage
    a_in = forged_input(torch.zeros(2, 16, 64), fresh.attack.noise(0, 1, 0, backward=False))
    with torch.no_grad():
        expected = stage1.forward(a_in)
    sent = []
    link = fresh.runtime.workers[1].channels[2]
    inner_send = link.inner.send
    link.inner.send = lambda f: (sent.append(f.tensor.clone()), inner_send(f))
    fresh.runtime.train_step(0, BATCH)
    assert torch.equal(sent[0], expected)
