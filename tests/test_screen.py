"""Screening statistics: the maths by hand, honest streams pass, attacks are flagged."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.defense import EMA, Screen, ScreenConfig, cosine
from phalanx.threats import perturb


def test_ema_by_hand():
    e = EMA(0.5)
    e.update(2.0)
    assert (e.mean, e.var) == (2.0, 0.0)
    e.update(4.0)  # a = 0.5: mean 3, var 0.5 * (0 + 0.5 * 4) = 1
    assert (e.mean, e.var) == (3.0, 1.0)
    e.update(3.0)  # diff 0: mean 3, var 0.5
    assert (e.mean, e.var) == (3.0, 0.5)
    assert e.z(3.0 + math.sqrt(0.5) * 2) == pytest.approx(2.0)


def test_cosine_by_hand():
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])) == 0.0
    assert cosine(torch.tensor([1.0, 1.0]), torch.tensor([-2.0, -2.0])) == pytest.approx(-1.0)
    assert cosine(torch.zeros(2), torch.ones(2)) == 0.0


def _honest(step: int) -> torch.Tensor:
    """Activation-like messages: a stable per-channel offset plus fresh noise."""
    g = torch.Generator().manual_seed(step)
    base = torch.linspace(-1, 2, 64)
    return base + 0.5 * torch.randn(4, 32, 64, generator=g)


def test_honest_stream_raises_no_alert_over_200_messages():
    s = Screen()
    assert all(not s.check(_honest(i)) for i in range(200))


@pytest.mark.parametrize(("attack", "strength", "reason"), [
    ("sign_flip", 1.0, "cosine"),
    ("scale", 10.0, "norm"),
    ("zero", 1.0, "norm"),
    ("gaussian", 5.0, "norm"),
])
def test_attacks_are_flagged_after_warmup(attack, strength, reason):
    s = Screen(ScreenConfig(warmup=8))
    for i in range(20):
        assert not s.check(_honest(i))
    bad = perturb("forward", attack, _honest(99), torch.Generator().manual_seed(0), strength)
    reasons = s.check(bad)
    assert reasons and any(reason in r for r in reasons)
    assert not s.check(_honest(100))  # the attack did not shift the running statistics


def test_non_finite_is_flagged_at_once():
    s = Screen()
    x = _honest(0)
    x[0, 0, 0] = float("nan")
    assert s.check(x) == ["non-finite values"]
    assert s.seen == 0
