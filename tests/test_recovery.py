"""Recovery: an attempt with culprits is redone along the coordinator's plan. Skip computes
exactly the model without the culprit, freezes the right updates and keeps replicas in
lockstep; repair trains the clean model to the bit; restart redoes iterations; quarantine
bypasses a repeat offender; the distributed runtime does all of it as the simulator does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phalanx.config import load_config
from phalanx.defense.plan import Decision
from phalanx.models.stages import lm_loss
from phalanx.train import Config, Trainer
from phalanx.train.attempts import attempts
from phalanx.train.setup import build_pipeline

BASE = ['model.name="tiny"', "pipeline.stages=4", "pipeline.micro_batches=2",
        "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        'defense.verify="duplicate"']
BATCH = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))


def _pipe(extra: list[str], steps: int = 8):  # noqa: ANN202
    return build_pipeline(load_config(Config, None, [*BASE, *extra]), steps)


def _reduced(pipe, route: list[int]):  # noqa: ANN001, ANN202
    """Loss of the model made of the stages in ``route`` only (the others as identities), with
    the pipeline's current weights; the mean over micro-batches, as an iteration's loss."""
    stages = [pipe.runtime.workers[i].stage for i in route]
    losses = []
    for mb in BATCH.chunk(2):
        h = mb
        for st in stages:
            h = st.forward(h)  # forward(): no verification hook runs
        losses.append(lm_loss(h, mb))
    return torch.stack(losses).mean()


def _params(pipe, stage: int) -> dict[str, torch.Tensor]:  # noqa: ANN001
    st = pipe.runtime.workers[stage].stage
    return {k: p.detach().clone() for k, p in st.named_parameters() if not k.startswith("shadow.")}


def _in_lockstep(pipe) -> bool:  # noqa: ANN001
    ws = pipe.runtime.workers
    return all(torch.equal(p, _params(pipe, v - 1)[k])
               for v in (2, 3) for k, p in ws[v].stage.shadow.named_parameters())


def _kept(pipe, step: int, optimize: bool = True):  # noqa: ANN001, ANN202
    """The attempts of iteration ``step`` (the kept one last), as the trainer runs them."""
    return attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3, optimize=optimize)


def _decision(pipe, res) -> Decision:  # noqa: ANN001
    return Decision.decode(res.verdict.payload, pipe.runtime.num_stages)


def test_skip_redoes_the_iteration_without_the_culprit_and_freezes_it_alone():
    pipe = _pipe(['attack.forward="sign_flip"', "attack.rate=1.0", "attack.stages=[1]"])
    expected = _reduced(pipe, [0, 2, 3])  # the attacker bypassed, its verifier at work
    before = {s: _params(pipe, s) for s in range(4)}
    (first, _), (kept, _) = _kept(pipe, 0)
    assert _decision(pipe, first).blamed == {1} and first.verdict.discard
    assert _decision(pipe, first).plan.bypassed == {1}
    assert kept.loss == pytest.approx(expected.item(), rel=1e-6)
    assert not kept.verdict.discard and kept.verdict.frozen == {1}
    after = {s: _params(pipe, s) for s in range(4)}
    assert all(torch.equal(before[1][k], after[1][k]) for k in before[1])  # the culprit's
    for s in (0, 2, 3):  # every other stage learns
        assert any(not torch.equal(before[s][k], after[s][k]) for k in before[s])
    assert _in_lockstep(pipe)


@pytest.mark.parametrize("attacker", [1, 2])
def test_skip_gradient_reaches_earlier_stages_as_in_the_reduced_model(attacker):
    pipe = _pipe(['attack.forward="sign_flip"', "attack.rate=1.0", f"attack.stages=[{attacker}]"])
    ref = _pipe([])  # the same weights, no attack: differentiate the reduced model by hand
    _reduced(ref, [s for s in range(4) if s != attacker]).backward()
    _kept(pipe, 0, optimize=False)
    for stage in {0, 1} - {attacker}:
        got = dict(pipe.runtime.workers[stage].stage.named_parameters())
        for name, p in ref.runtime.workers[stage].stage.named_parameters():
            if "embed" not in name and not name.startswith("shadow."):  # tied: summed elsewhere
                torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7)


def test_trusted_last_stage_runs_its_layers_on_the_true_input():
    pipe = _pipe(['attack.forward="gaussian"', "attack.rate=1.0", "attack.stages=[2]"])
    expected = _reduced(pipe, [0, 1, 3])
    *_, (kept, _) = _kept(pipe, 0)
    assert kept.loss == pytest.approx(expected.item(), rel=1e-6)
    assert kept.verdict.frozen == {2}
    assert _in_lockstep(pipe)


def test_skip_keeps_every_trace_of_a_poisoned_gradient_out():
    pipe = _pipe(['attack.backward="gaussian"', "attack.rate=1.0", "attack.stages=[2]"])
    ref = _pipe([])
    _reduced(ref, [0, 1, 3]).backward()
    _kept(pipe, 0, optimize=False)
    for stage in (0, 1):  # what stages 0 and 1 keep is the reduced model's gradient, no N(0, 1)
        got = dict(pipe.runtime.workers[stage].stage.named_parameters())
        for name, p in ref.runtime.workers[stage].stage.named_parameters():
            if "embed" not in name and not name.startswith("shadow."):
                torch.testing.assert_close(got[name].grad, p.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("attack", ['attack.forward="sign_flip"', 'attack.backward="gaussian"',
                                    'attack.forward="forged"'])
def test_replicas_stay_in_lockstep_through_random_attacks(attack):
    """The first attempt of each iteration names exactly its attackers; a redo names no honest
    stage (an attacker left out by it attacks in vain); the replicas never drift."""
    pipe = _pipe([attack, "attack.rate=0.5", "attack.seed=1"], steps=6)
    named = []
    for s in range(6):
        runs = _kept(pipe, s)
        assert _decision(pipe, runs[0][0]).blamed == runs[0][1]
        assert all(_decision(pipe, res).blamed <= bad for res, bad in runs)
        named.append(bool(runs[0][1]))
    assert any(named) and not all(named)
    assert _in_lockstep(pipe)


@pytest.mark.parametrize("attack", [
    ['attack.forward="sign_flip"', "attack.stages=[1]"],
    ['attack.forward="forged"', "attack.stages=[2]"],
    ['attack.backward="gaussian"', "attack.stages=[1]"],
    ['attack.backward="scale"', "attack.strength=-3", "attack.stages=[2]"],
    ['attack.forward="gaussian"', 'attack.backward="sign_flip"', "attack.rate=0.5"],
])
def test_repair_recovery_trains_exactly_the_clean_model(attack):
    """The redo replaces the culprit's messages by its replica's, so the attacked run is the
    clean run, to the bit, and the attacker is named. The clean run has no defense at all (a
    defended reference would share any flaw of the defense)."""
    pipe = _pipe(['defense.recovery="repair"', "attack.rate=1.0", *attack], steps=4)
    clean = _pipe(['defense.verify="none"'], steps=4)
    runs = [_kept(pipe, s) for s in range(4)]
    ref = [clean.runtime.train_step(s, BATCH) for s in range(4)]
    assert [r[-1][0].loss for r in runs] == [r.loss for r in ref]
    assert [_decision(pipe, r[0][0]).blamed for r in runs] == [r[0][1] for r in runs]
    assert any(len(r) > 1 for r in runs) and not any(r[-1][0].verdict.frozen for r in runs)
    for s in range(4):
        assert all(torch.equal(p, _params(clean, s)[k]) for k, p in _params(pipe, s).items())
    assert _in_lockstep(pipe)


def test_quarantine_bypasses_a_repeat_offender():
    pipe = _pipe(['attack.forward="scale"', "attack.strength=4", "attack.rate=1.0",
                  "attack.stages=[1]", "defense.quarantine_after=2"])
    quarantined = [_decision(pipe, _kept(pipe, s)[-1][0]).quarantined for s in range(2)]
    assert quarantined == [set(), {1}]
    frozen = _params(pipe, 1)
    pipe.runtime.sync_replicas(2)  # the last stage's copy of the tied embedding, up to date
    expected = _reduced(pipe, [0, 2, 3])  # stage 2 now takes its input from stage 0
    (res, _), = _kept(pipe, 2)  # one attempt: the attacker's messages are no longer used
    assert res.loss == pytest.approx(expected.item(), rel=1e-6)
    assert float(pipe.defense.alerts(res).sum()) == 0 and res.verdict.frozen == {1}
    assert all(torch.equal(frozen[k], v) for k, v in _params(pipe, 1).items())
    shadow = pipe.runtime.workers[3].stage.shadow  # 2's replica at 3 follows 2
    assert all(torch.equal(p, _params(pipe, 2)[k]) for k, p in shadow.named_parameters())


TINY = ['model.name="tiny"', "data.seq_len=16", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=1", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=0",
        "pipeline.stages=4", "train.steps=6"]


def _train(out: Path, extra: list[str]) -> list[dict]:
    trainer = Trainer(load_config(Config, None, [*TINY, f'train.out_dir="{out}"', *extra]))
    try:
        trainer.run()
    finally:
        trainer.close()
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_restart_redoes_attacked_iterations_until_clean(tmp_path):
    attacked = _train(tmp_path / "r", ['attack.forward="sign_flip"', "attack.rate=0.5",
                                       'defense.verify="duplicate"', 'defense.recovery="restart"',
                                       "defense.max_retries=20"])
    clean = _train(tmp_path / "c", [])
    assert any("redone" in r for r in attacked)  # some iterations were attacked and redone
    for r in attacked:
        assert r["malicious"] == [] and r["blamed"] == []  # what counted was a clean attempt
        assert all(t["discarded"] and t["blamed"] == t["malicious"] for t in r.get("redone", []))
    # discarded attempts leave no trace: the run is the clean run
    assert [r["loss"] for r in attacked] == [r["loss"] for r in clean]


@pytest.mark.slow
@pytest.mark.parametrize("recovery", ["repair"])  # skip: the local runtime's tests
def test_recovery_is_the_same_in_both_runtimes(tmp_path, recovery):
    args = ['attack.forward="sign_flip"', 'attack.backward="gaussian"', "attack.rate=0.6",
            "attack.seed=2", 'defense.verify="duplicate"', f'defense.recovery="{recovery}"',
            "train.steps=4"]
    local = _train(tmp_path / "l", args)
    out = subprocess.run(
        [sys.executable, "-m", "phalanx.cli", "train", *TINY, *args,
         'pipeline.runtime="distributed"', f'train.out_dir="{tmp_path / "d"}"'],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    dist = [json.loads(r) for r in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    keys = ("malicious", "alerts", "blamed", "frozen", "discarded")
    tries = {name: [{k: t.get(k) for k in keys} for r in recs for t in [*r.get("redone", []), r]]
             for name, recs in (("local", local), ("dist", dist))}
    assert tries["dist"] == tries["local"]  # every attempt, redone ones included
    assert [r["loss"] for r in dist] == pytest.approx([r["loss"] for r in local], rel=1e-5)
    assert any(t["blamed"] for t in tries["local"])
    assert all(set(t["blamed"]) <= set(t["malicious"]) for t in tries["local"])
