"""Duplicated block + jumping connection: exact lockstep on honest runs, every forward and
backward attack caught at the iteration it happens, the attacker named, in both runtimes."""

from __future__ import annotations

import pytest
import torch

from phalanx.config import load_config
from phalanx.defense.plan import Decision
from phalanx.train import Config
from phalanx.train.attempts import attempts
from phalanx.train.setup import build_pipeline

BASE = ['model.name="tiny"', "pipeline.stages=4", "pipeline.micro_batches=2",
        "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0"]
BATCH = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))


def _run(extra: list[str], steps: int = 3):  # noqa: ANN202
    """The pipeline and, per iteration, its first attempt (the one the attack hits)."""
    pipe = build_pipeline(load_config(Config, None, [*BASE, *extra]), steps + 2)
    return pipe, [attempts(pipe.runtime, pipe.attack, s, BATCH, 3)[0][0] for s in range(steps)]


def _blamed(pipe, res) -> frozenset[int]:  # noqa: ANN001
    return Decision.decode(res.verdict.payload, pipe.runtime.num_stages).blamed


def _alerts(results) -> list[dict[int, int]]:  # noqa: ANN001
    """Per iteration: alerts by suspect."""
    return [{i: int(c) for i, c in enumerate(r.reports[:, :4].sum(0).tolist()) if c}
            for r in results]


def test_honest_run_is_unchanged_raises_nothing_and_shadows_stay_in_lockstep():
    defended, d_losses = _run(['defense.verify="duplicate"', "defense.rtol=0", "defense.atol=0"])
    _, c_losses = _run([])
    assert [r.loss for r in d_losses] == [r.loss for r in c_losses]  # training is untouched
    assert _alerts(d_losses) == [{}, {}, {}]
    # forward checks at stages 2, 3 and backward checks at stages 0, 1: 2 micro-batches x 3 steps
    assert {s: c.checked for s, c in defended.defense.checks.items()} == {0: 6, 1: 6, 2: 6, 3: 6}
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
    pipe, res = _run(['defense.verify="duplicate"', 'defense.recovery="none"',
                      f'attack.forward="{attack}"', "attack.rate=1.0",
                      f"attack.stages=[{attacker}]", "attack.strength=0.5"])
    assert _alerts(res) == [{attacker: 2}] * 3  # every micro-batch of every iteration
    assert all(r.reports[attacker + 1, attacker] == 2 for r in res)  # seen by the next stage
    assert all(_blamed(pipe, r) == {attacker} for r in res)


@pytest.mark.parametrize("attack", ["gaussian", "sign_flip", "scale"])
@pytest.mark.parametrize("attacker", [1, 2])
def test_every_backward_attack_is_caught_and_blamed(attack, attacker):
    extra = [f'attack.backward="{attack}"', "attack.rate=1.0", f"attack.stages=[{attacker}]",
             "attack.strength=0.5", 'defense.verify="duplicate"']
    _, res = _run([*extra, 'defense.recovery="none"'], steps=1)
    assert res[0].reports[attacker - 1, attacker] == 2  # both micro-batches, by the stage before
    # with recovery, a caught gradient is replaced by the replica's on its way, so the stages
    # before raise no alert of their own and no honest stage is named
    pipe, res = _run([*extra, 'defense.recovery="skip"'])
    assert _alerts(res) == [{attacker: 2}] * 3
    assert all(_blamed(pipe, r) == {attacker} for r in res)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_detected_iterations_are_exactly_the_attacked_ones(direction):
    attack = "sign_flip"
    pipe, res = _run(['defense.verify="duplicate"', f'attack.{direction}="{attack}"',
                      "attack.rate=0.5", "attack.seed=3"], steps=12)
    attacked = {s: pipe.attack.malicious(s) for s in range(12) if pipe.attack.malicious(s)}
    detected = {s: _blamed(pipe, r) for s, r in enumerate(res) if _blamed(pipe, r)}
    assert 0 < len(attacked) < 12 and detected == attacked


def test_forged_consistent_pair_is_caught_by_the_jumping_connection():
    """The attacker sends a'_out = stage(a'_in): recomputing from its claimed input a'_in would
    agree, but the verifier recomputes from the true input it got from the stage before."""
    from phalanx.threats.channel import forged_input

    pipe, res = _run(['defense.verify="duplicate"', 'defense.recovery="none"',
                      'attack.forward="forged"', "attack.rate=1.0", "attack.stages=[1]"], steps=2)
    assert _alerts(res) == [{1: 2}, {1: 2}]
    # what the attacker sent is stage 1's own output for its forged input a'_in (a consistent
    # pair): before any step, the first frame equals stage1(a'_in) recomputed here
    fresh, _ = _run(['defense.verify="duplicate"', 'defense.recovery="none"',
                     'attack.forward="forged"', "attack.rate=1.0", "attack.stages=[1]"], steps=0)
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


def test_bf16_autocast_keeps_replicas_bitwise_and_attacks_caught():
    """Under mixed precision a replica computes exactly as its original (same ops, same
    device): the bitwise comparison raises nothing on an honest run and still names the
    attacker; repair still gives the clean run's losses."""
    bf16 = ['pipeline.precision="bf16"', 'defense.verify="duplicate"', "defense.rtol=0",
            "defense.atol=0"]
    _, honest = _run(bf16)
    _, clean = _run(['pipeline.precision="bf16"'])
    assert [r.loss for r in honest] == [r.loss for r in clean]
    assert _alerts(honest) == [{}, {}, {}]
    attack = ['attack.forward="sign_flip"', "attack.rate=1.0", "attack.stages=[1]"]
    pipe = build_pipeline(load_config(Config, None, [*BASE, *bf16, *attack,
                                                     'defense.recovery="repair"']), 5)
    runs = [attempts(pipe.runtime, pipe.attack, s, BATCH, 3) for s in range(3)]
    assert _alerts([r[0][0] for r in runs]) == [{1: 2}] * 3
    assert [r[-1][0].loss for r in runs] == [r.loss for r in clean]
