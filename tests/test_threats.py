"""Poisoning attacks: the maths by hand, the attack plan, config checks, and the channel wrapper
acting on a real pipeline only when and where it should."""

from __future__ import annotations

import copy

import pytest
import torch

from phalanx.defense.config import DefenseConfig
from phalanx.errors import ConfigError
from phalanx.models import ModelConfig, load_model, partition
from phalanx.pipeline import LocalRuntime, OptimConfig, PipelineConfig
from phalanx.threats import AttackConfig, AttackPlan, PoisonChannel, perturb
from phalanx.threats.channel import poison

X = torch.tensor([[1.0, -2.0], [3.0, 0.5]])


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_attack_maths_by_hand():
    assert torch.equal(perturb("forward", "sign_flip", X, _g(), 1.0), -X)
    assert torch.equal(perturb("forward", "scale", X, _g(), -3.0), -3.0 * X)
    assert torch.equal(perturb("forward", "zero", X, _g(), 1.0), torch.zeros(2, 2))
    u = perturb("forward", "uniform", X, _g(), 1.0)
    assert u.shape == X.shape and bool(((u >= 0) & (u < 1)).all())
    noise = perturb("forward", "gaussian", X, _g(1), 0.5) - X
    assert torch.allclose(noise, 0.5 * torch.randn(2, 2, generator=_g(1)))
    rep = perturb("backward", "gaussian", X, _g(2), 1.0)
    assert torch.equal(rep, torch.randn(2, 2, generator=_g(2)))  # replacement, not addition
    big = torch.randn(200, 300, generator=_g(3)) * 4 + 7
    stats = perturb("forward", "gaussian_stats", big, _g(4), 1.0)
    assert abs(float(stats.mean()) - 7) < 0.1 and abs(float(stats.std()) - 4) < 0.1
    with pytest.raises(KeyError, match="unknown backward attack"):
        perturb("backward", "zero", X, _g(), 1.0)


def test_plan_rates_and_stages():
    never = AttackPlan(AttackConfig(forward="sign_flip", rate=0.0), 6)
    always = AttackPlan(AttackConfig(forward="sign_flip", rate=1.0), 6)
    assert all(not never.malicious(s) for s in range(100))
    picks = [always.malicious(s) for s in range(400)]
    assert all(len(p) == 1 and 0 < next(iter(p)) < 5 for p in picks)  # one middle stage
    assert {next(iter(p)) for p in picks} == {1, 2, 3, 4}  # every middle stage gets picked
    p = AttackPlan(AttackConfig(backward="gaussian", rate=0.3, seed=5), 6)
    hits = sum(bool(p.malicious(s)) for s in range(2000))
    assert 0.26 < hits / 2000 < 0.34
    again = AttackPlan(AttackConfig(backward="gaussian", rate=0.3, seed=5), 6)
    assert [p.malicious(s) for s in range(50)] == [again.malicious(s) for s in range(50)]
    fixed = AttackPlan(AttackConfig(forward="zero", rate=1.0, stages=[2, 3]), 6)
    assert fixed.malicious(7) == {2, 3}


@pytest.mark.parametrize(
    ("cfg", "stages", "message"),
    [
        (AttackConfig(forward="sign_flip", rate=0.5, stages=[0]), 6, "not middle stages"),
        (AttackConfig(forward="sign_flip", rate=0.5, stages=[5]), 6, "not middle stages"),
        (AttackConfig(forward="sign_flip", rate=1.5), 6, "must be in \\[0, 1\\]"),
        (AttackConfig(forward="sign_flip", rate=0.5), 2, "at least 3 stages"),
        (AttackConfig(forward="melt"), 6, "unknown"),
        (AttackConfig(backward="zero"), 6, "unknown"),
        (AttackConfig(forward="scale", rate=0.5), 6, "change nothing"),
    ],
)
def test_contradictory_settings(cfg, stages, message):
    with pytest.raises(ConfigError, match=message):
        AttackPlan(cfg, stages)


@pytest.mark.parametrize(
    ("cfg", "stages", "message"),
    [
        (DefenseConfig(verify="duplicate"), 2, "at least 3 stages"),
        (DefenseConfig(verify="none", recovery="restart"), 6, "need alerts"),
        (DefenseConfig(verify="none", quarantine_after=2), 6, "need alerts"),
        (DefenseConfig(verify="duplicate", recovery="pray"), 6, "unknown"),
        (DefenseConfig(verify="duplicate", max_retries=-1), 6, ">= 0"),
    ],
)
def test_contradictory_defense_settings(cfg, stages, message):
    with pytest.raises(ConfigError, match=message):
        cfg.validate(stages)


def _pipeline(attack: AttackConfig | None):  # noqa: ANN202
    lm = load_model(ModelConfig(name="tiny"))
    stages = partition(copy.deepcopy(lm.model), lm.family, 4)
    plan = AttackPlan(attack, 4) if attack else None

    def wrap(stage, channels):  # noqa: ANN001, ANN202
        return poison(channels, plan, stage) if plan else channels

    return LocalRuntime(stages, PipelineConfig(stages=4, micro_batches=2), OptimConfig(), 4,
                        wrap=wrap)


BATCH = torch.randint(0, 257, (4, 16), generator=_g(9))


def test_forward_attack_corrupts_training_but_not_evaluation():
    clean = _pipeline(None)
    attacked = _pipeline(AttackConfig(forward="sign_flip", rate=1.0, stages=[2]))
    assert attacked.train_step(0, BATCH).loss != pytest.approx(clean.train_step(0, BATCH).loss)
    ch = attacked.workers[2].channels[3]
    assert isinstance(ch, PoisonChannel) and ch.corrupted == 2  # both micro-batches, forward
    assert attacked.workers[2].channels[1].corrupted == 0  # no backward attack configured
    clean2, attacked2 = _pipeline(None), _pipeline(AttackConfig(forward="sign_flip", rate=1.0))
    assert attacked2.evaluate([BATCH]) == clean2.evaluate([BATCH])  # attacks act while training


def test_backward_attack_leaves_the_loss_and_corrupts_upstream_gradients():
    clean = _pipeline(None)
    attacked = _pipeline(AttackConfig(backward="gaussian", rate=1.0, stages=[1]))
    a = attacked.train_step(0, BATCH, optimize=False)
    c = clean.train_step(0, BATCH, optimize=False)
    assert a.loss == c.loss  # the forward pass is honest
    g_a = attacked.workers[0].stage.embed.weight.grad
    g_c = clean.workers[0].stage.embed.weight.grad
    assert not torch.allclose(g_a, g_c)  # stage 0 received noise instead of its gradient
    w_a = attacked.workers[2].stage.blocks[0].mlp.up_proj.weight.grad
    w_c = clean.workers[2].stage.blocks[0].mlp.up_proj.weight.grad
    assert torch.equal(w_a, w_c)  # stages downstream of the attacker are untouched


def test_non_finite_gradients_skip_the_step_instead_of_poisoning_weights():
    """A NaN gradient sent upstream makes the global norm NaN: every stage skips that update,
    the weights stay finite, and training goes on."""
    rt = _pipeline(AttackConfig(backward="scale", strength=float("nan"), rate=1.0, stages=[2]))
    before = [p.detach().clone() for w in rt.workers for p in w.stage.parameters()]
    res = rt.train_step(0, BATCH)
    assert res.skipped and res.loss == res.loss  # the forward pass and loss were fine
    after = [p.detach() for w in rt.workers for p in w.stage.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
    assert all(w.optimizer.steps_done == 1 for w in rt.workers)  # the schedule moved on
    clean = _pipeline(None).train_step(0, BATCH)
    assert not clean.skipped
