"""Schedules as data and the optimizer's pure functions, against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.pipeline.optim import clip_coefficient, lr_factor, param_groups
from phalanx.pipeline.schedule import Action, Op, gpipe, one_f_one_b, train_actions


def _ops(actions):  # noqa: ANN001, ANN202
    return [repr(a) for a in actions]


def test_gpipe_order():
    assert _ops(gpipe(0, 2, 3)) == ["F0", "F1", "F2", "B2", "B1", "B0"]


def test_1f1b_by_hand():
    # 4 stages, 4 micro-batches: stage 0 warms up with 3 forwards, the last stage alternates.
    assert _ops(one_f_one_b(0, 4, 4)) == ["F0", "F1", "F2", "F3", "B0", "B1", "B2", "B3"]
    assert _ops(one_f_one_b(2, 4, 4)) == ["F0", "F1", "B0", "F2", "B1", "F3", "B2", "B3"]
    assert _ops(one_f_one_b(3, 4, 4)) == ["F0", "B0", "F1", "B1", "F2", "B2", "F3", "B3"]


@pytest.mark.parametrize("n,m", [(1, 1), (2, 3), (4, 4), (4, 8), (6, 2)])
def test_1f1b_invariants(n, m):
    for s in range(n):
        acts = one_f_one_b(s, n, m)
        expected = [f"F{i}" for i in range(m)] + [f"B{i}" for i in range(m)]
        assert sorted(_ops(acts)) == sorted(expected)
        in_flight, peak = 0, 0
        for a in acts:
            in_flight += 1 if a.op is Op.FORWARD else -1
            peak = max(peak, in_flight)
            if a.op is Op.BACKWARD:
                assert Action(Op.FORWARD, a.micro) in acts[: acts.index(a)]
        assert peak <= min(n - s, m)  # the memory bound of 1F1B


def test_train_actions_reduction():
    first = train_actions("1f1b", 0, 3, 2, tied=True)
    middle = train_actions("1f1b", 1, 3, 2, tied=True)
    last = train_actions("1f1b", 2, 3, 2, tied=True)
    # stage 0 owns the tied embedding: adds the last stage's gradient, steps, sends the weights
    assert _ops(first)[-5:] == ["recv_tied", "gather_norm", "step", "send_weights",
                                "gather_report"]
    # other stages report before their step, so stage 0 never waits for their optimizer
    assert _ops(middle)[-4:] == ["send_norm", "recv_norm", "send_report", "step"]
    assert _ops(last)[-5:] == ["send_tied", "send_norm", "recv_norm", "send_report", "step"]
    assert "step" not in _ops(train_actions("gpipe", 1, 3, 2, tied=True, step=False))
    untied = train_actions("1f1b", 0, 3, 2, tied=False)
    assert "recv_tied" not in _ops(untied) and "send_weights" not in _ops(untied)


def test_lr_factor_by_hand():
    assert lr_factor(0, 10, 4, "linear") == 0.25
    assert lr_factor(3, 10, 4, "linear") == 1.0
    assert lr_factor(4, 10, 4, "linear") == 1.0
    assert lr_factor(7, 10, 4, "linear") == pytest.approx(0.5)
    assert lr_factor(7, 10, 4, "cosine") == pytest.approx(0.5)
    assert lr_factor(5, 10, 4, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 6)))
    assert lr_factor(9, 10, 0, "constant") == 1.0
    assert lr_factor(10, 10, 0, "linear", floor=0.1) == pytest.approx(0.1)


def test_clip_coefficient_matches_torch():
    g = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]  # global norm 13
    assert clip_coefficient(13.0, 1.0) == pytest.approx(1 / 13, rel=1e-6)
    assert clip_coefficient(13.0, 20.0) == 1.0
    assert clip_coefficient(13.0, 0.0) == 1.0
    assert clip_coefficient(float("nan"), 1.0) == 1.0
    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in g]
    for p, t in zip(params, g, strict=True):
        p.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    assert torch.allclose(params[0].grad, g[0] * clip_coefficient(13.0, 1.0))


def test_param_groups_decay_matrices_only():
    lin = torch.nn.Linear(3, 2)
    groups = param_groups(lin.named_parameters(), 0.01)
    assert groups[0]["params"] == [lin.weight] and groups[0]["weight_decay"] == 0.01
    assert groups[1]["params"] == [lin.bias] and groups[1]["weight_decay"] == 0.0
