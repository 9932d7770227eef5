"""The second replica (``defense.second=replica``): a colluding adjacent pair — s forges, s + 1,
its first verifier, stays silent — is caught by stage s + 2 in every attacked iteration and the
forger alone blamed; repair then trains the undefended clean model; the second replica stays in
lockstep through bypasses and repairs; it costs nothing to an honest run's training; checks
that cannot work are config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from phalanx.config import load_config
from phalanx.defense.plan import Decision
from phalanx.errors import ConfigError
from phalanx.train import Config
from phalanx.train.attempts import attempts
from phalanx.train.setup import build_pipeline

BASE = ['model.name="tiny"', "pipeline.stages=4", "pipeline.micro_batches=2",
        "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0"]
SECOND = ['defense.verify="duplicate"', 'defense.second="replica"']
COLLUDE = ['attack.adaptive="collude"', "attack.rate=1.0", "attack.stages=[1,2]"]
BATCH = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
STEPS = 3


def _pipe(extra: list[str]):  # noqa: ANN202
    return build_pipeline(load_config(Config, None, [*BASE, *extra]), STEPS + 2)


def _blamed(res) -> frozenset[int]:  # noqa: ANN001
    return Decision.decode(res.verdict.payload, res.reports.shape[0]).blamed


def _alerts(res) -> dict[int, int]:  # noqa: ANN001
    return {i: int(c) for i, c in enumerate(res.reports[:, :4].sum(0).tolist()) if c}


def _weights(pipe) -> dict:  # noqa: ANN001
    return {(w.me, k): p.detach().clone() for w in pipe.runtime.workers
            for k, p in w.stage.named_parameters() if not k.startswith(("shadow.", "second."))}


def _in_lockstep(pipe) -> bool:  # noqa: ANN001
    """Stage 3's second replica equals stage 1, bit for bit."""
    ws = {w.me: w.stage for w in pipe.runtime.workers}
    original = dict(ws[1].named_parameters())
    return all(torch.equal(p, original[k]) for k, p in ws[3].second.named_parameters())


@pytest.mark.parametrize("recovery", ["repair", "restart"])
def test_a_colluding_pair_is_caught_every_time_and_the_run_is_the_clean_run(recovery):
    alone = _pipe(['defense.verify="duplicate"', f'defense.recovery="{recovery}"', *COLLUDE])
    pipe = _pipe([*SECOND, f'defense.recovery="{recovery}"', *COLLUDE])
    clean = _pipe([])
    for step in range(STEPS):
        assert _alerts(attempts(alone.runtime, alone.attack, step, BATCH, 3)[0][0]) == {}
        runs = attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3)
        assert _alerts(runs[0][0]) == {1: 2} and _blamed(runs[0][0]) == {1}
        assert all(_blamed(r) <= {1} for r, _ in runs)  # never an honest stage
        kept = [r for r, _ in runs if not r.verdict.discard]
        ref = clean.runtime.train_step(step, BATCH)
        if recovery == "repair":  # restart: the attacker strikes again every attempt
            assert len(kept) == 1 and kept[0].loss == ref.loss
    if recovery == "repair":
        ours, theirs = _weights(pipe), _weights(clean)
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    else:  # every attempt attacked: every iteration dropped, nothing stepped
        assert all(torch.equal(p, q) for p, q in zip(_weights(pipe).values(),
                                                     _weights(_pipe([])).values(), strict=True))
    assert _in_lockstep(pipe)


def test_the_second_replica_stays_in_lockstep_through_bypasses_and_repairs():
    """Stage 2 attacked (skip: bypassed in the redo, stage 3's first replica routes stage 1's
    output) then stage 1 (bypassed: the second replica is frozen with it); no honest stage is
    ever blamed."""
    for attacker in (2, 1):
        pipe = _pipe([*SECOND, 'attack.forward="sign_flip"', "attack.rate=1.0",
                      f"attack.stages=[{attacker}]"])
        for step in range(STEPS):
            runs = attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3)
            assert [_blamed(r) for r, _ in runs] == [{attacker}, set()]
        assert _in_lockstep(pipe)


def test_an_honest_run_with_a_second_replica_is_the_run_without_it():
    pipe, plain = _pipe(SECOND), _pipe([])
    for step in range(STEPS):
        res = pipe.runtime.train_step(step, BATCH)
        assert _alerts(res) == {} and res.loss == plain.runtime.train_step(step, BATCH).loss
    ours, theirs = _weights(pipe), _weights(plain)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs) and _in_lockstep(pipe)
    assert pipe.defense.checks[3].checked == 2 * 2 * STEPS  # first and second replica


@pytest.mark.slow
def test_a_colluding_pair_is_caught_in_the_distributed_runtime(tmp_path):
    args = [*BASE, *SECOND, *COLLUDE, "train.steps=2", "train.eval_batches=1",
            "train.progress=false", "data.seq_len=16", 'pipeline.runtime="distributed"',
            'defense.recovery="repair"', f'train.out_dir="{tmp_path}"']
    out = subprocess.run([sys.executable, "-m", "phalanx.cli", "train", *args],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["redone"][0]["blamed"] for r in recs] == [[1], [1]]
    assert [r["blamed"] for r in recs] == [[], []]  # the repaired redo is kept


@pytest.mark.parametrize(("extra", "message"), [
    (['defense.verify="duplicate"', 'defense.second="replica"', "pipeline.stages=3"],
     "needs at least 4 stages"),
    (['defense.second="replica"'], "set defense.verify=duplicate"),
    (['defense.verify="duplicate"', 'defense.second="auditor"'], "is unknown"),
])
def test_a_second_check_that_cannot_work_is_a_config_error(extra, message):
    cfg = load_config(Config, None, [*BASE, *extra])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_a_second_replica_with_too_few_stages_is_one_line_exit_2(tmp_path, cli):
    code, err = cli("train", *BASE, *SECOND, "pipeline.stages=3", f'train.out_dir="{tmp_path}"')
    assert code == 2 and err.strip().count("\n") == 0
    assert "defense.second=replica needs at least 4 stages" in err


def test_six_stages_repair_keeps_every_second_replica_in_lockstep(six_layers):
    """Stage 2 forges, stage 3 covers it up. The redo repairs stage 2, so stage 3 computes on
    its replica's output, which it must pass on (through stage 4) to the second replica of 3 at
    stage 5: every second replica stays in lockstep and the run is the clean run."""
    six = [f'model.name="{six_layers}"', "pipeline.stages=6"]
    collude = ['attack.adaptive="collude"', "attack.rate=1.0", "attack.stages=[2,3]"]
    pipe = _pipe([*six, *SECOND, 'defense.recovery="repair"', *collude])
    clean = _pipe(six)
    for step in range(STEPS):
        runs = attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3)
        assert [_blamed(r) for r, _ in runs] == [{2}, set()]
        assert runs[-1][0].loss == clean.runtime.train_step(step, BATCH).loss
    ws = {w.me: w.stage for w in pipe.runtime.workers}
    for holder in (3, 4, 5):
        original = dict(ws[holder - 2].named_parameters())
        assert all(torch.equal(p, original[k]) for k, p in ws[holder].second.named_parameters())
    ours, theirs = _weights(pipe), _weights(clean)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("tactic", ["flag_forge", "float16", "short", "nan_norm", "huge_norm",
                                    "forged_report", "false_alert", "drift"])
def test_an_attacker_using_every_field_is_caught_alone_and_the_second_replica_keeps_step(tactic):
    """With the second replica on, the stage it checks (1) attacks through flags, dtypes,
    shapes, norms, reports, accusations and sub-tolerance pushes: it alone is blamed, in every
    attempt it attacks, and the second replica at stage 3 stays bitwise in lockstep."""
    pipe = _pipe([*SECOND, 'defense.recovery="repair"', f'attack.adaptive="{tactic}"',
                  "attack.rate=1.0", "attack.stages=[1]"])
    for step in range(STEPS):
        runs = attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3)
        assert _blamed(runs[0][0]) == {1} and all(_blamed(r) <= {1} for r, _ in runs)
        assert not runs[-1][0].verdict.discard
    assert _in_lockstep(pipe)
