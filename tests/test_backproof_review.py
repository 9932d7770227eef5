"""Regressions from an attacking review of the gradient receipts (``backproof``): a sender
that signs two messages for one micro-batch must not choose which one the coordinator believes.

Stage 2 first sends stage 1 its honest input gradient as a stray ``JUMP_GRAD`` (filed unused in
1's stash), then the flipped ``GRADIENT`` that 1 checks. Receipts were keyed without their kind,
so 1's report "showed" 2's gradient equal to 3's evidence: 1's right accusation had no proof
and named the honest checker, and 2 was never named. Receipts are now kept and compared by
kind, and two of one kind from one sender for one micro-batch name it. The same for the
evidence sender (stage 3 of six, malformed evidence after its honest bytes as a stray
``GRADIENT``). The last test is a gap in ``Coordinator.designated`` under repair: the stage
that takes the replica's gradient in place of a repaired stage's may accuse its sender, and
mends a malformed one with the repaired stage's own gradient."""

from __future__ import annotations

from dataclasses import replace

import pytest

from phalanx.defense.plan import Decision
from phalanx.train.attempts import attempts
from phalanx.wire import Kind
from tests.test_adaptive import BATCH, _blamed, _hostile, _pipe, _weights

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoy_then_flip(link, f):  # noqa: ANN001
    if f.kind is Kind.GRADIENT and link.peer == 1:
        link.inner.send(replace(f, kind=Kind.JUMP_GRAD))  # the honest bytes, signed, first
        f = replace(f, tensor=-f.tensor)
    link.inner.send(f)


def test_a_gradient_poisoner_that_first_signs_the_honest_gradient_is_still_named(monkeypatch):
    pipe = _hostile(monkeypatch, 2, _decoy_then_flip, ['defense.recovery="skip"'])
    runs = attempts(pipe.runtime, pipe.attack, 0, BATCH, max_retries=3)
    assert all(_blamed(r) <= {2} for r, _ in runs), [_blamed(r) for r, _ in runs]
    assert _blamed(runs[0][0]) == {2}


def test_without_recovery_the_decoy_changes_no_blame(monkeypatch):
    """Without recovery nothing is mended: the flipped gradient trains stage 1, whose own
    gradient then really differs from its replica's (stage 0 names 1 as well, as for a plain
    flip). The decoy must buy nothing: the poisoner is named, the blame is the plain flip's."""
    pipe = _hostile(monkeypatch, 2, _decoy_then_flip, ['defense.recovery="none"'])
    clean = _pipe(['defense.verify="none"'])
    res = pipe.runtime.train_step(0, BATCH)
    clean.runtime.train_step(0, BATCH)
    ours, theirs = _weights(pipe), _weights(clean)
    assert any(not (ours[k] == theirs[k]).all() for k in theirs)  # the flip did train
    plain = _hostile(monkeypatch, 2, _flip_only, ['defense.recovery="none"'])
    assert 2 in _blamed(res) and _blamed(res) == _blamed(plain.runtime.train_step(0, BATCH))


def test_a_poisoner_that_signs_the_honest_gradient_first_gets_its_honest_checker_quarantined(
        monkeypatch):
    pipe = _hostile(monkeypatch, 2, _decoy_then_flip,
                    ['defense.recovery="skip"', "defense.quarantine_after=1"])
    for step in range(2):
        attempts(pipe.runtime, pipe.attack, step, BATCH, max_retries=3)
    assert pipe.defense.standing <= {2}, pipe.defense.standing


def _decoy_then_empty_evidence(link, f):  # noqa: ANN001
    if f.kind is Kind.JUMP_GRAD and link.peer == 1:
        link.inner.send(replace(f, kind=Kind.GRADIENT))  # the honest evidence, signed, first
        f = replace(f, tensor=f.tensor[:0].clone())
    link.inner.send(f)


def test_an_evidence_sender_that_signs_the_honest_evidence_first_is_still_named(
        monkeypatch, six_layers):
    """The same with the evidence: stage 3 (replica of 2) sends stage 1 malformed evidence,
    after its honest bytes as a stray GRADIENT; 1's alert against 3 names 1."""
    six = [f'model.name="{six_layers}"', "pipeline.stages=6"]
    pipe = _hostile(monkeypatch, 3, _decoy_then_empty_evidence, six)
    runs = attempts(pipe.runtime, pipe.attack, 0, BATCH, max_retries=3)
    blamed = [Decision.decode(r.verdict.payload, 6).blamed for r, _ in runs]
    assert blamed[0] == {3} and all(b <= {3} for b in blamed), blamed


# controls: the same attacks without the honest first copy are named as the defense claims


def _flip_only(link, f):  # noqa: ANN001
    if f.kind is Kind.GRADIENT and link.peer == 1:
        f = replace(f, tensor=-f.tensor)
    link.inner.send(f)


def _empty_evidence_only(link, f):  # noqa: ANN001
    if f.kind is Kind.JUMP_GRAD and link.peer == 1:
        f = replace(f, tensor=f.tensor[:0].clone())
    link.inner.send(f)


def test_control_without_the_decoy_the_poisoner_is_named(monkeypatch):
    pipe = _hostile(monkeypatch, 2, _flip_only, ['defense.recovery="skip"'])
    runs = attempts(pipe.runtime, pipe.attack, 0, BATCH, max_retries=3)
    assert _blamed(runs[0][0]) == {2}


def test_control_without_the_decoy_the_evidence_sender_is_named(monkeypatch, six_layers):
    six = [f'model.name="{six_layers}"', "pipeline.stages=6"]
    pipe = _hostile(monkeypatch, 3, _empty_evidence_only, six)
    runs = attempts(pipe.runtime, pipe.attack, 0, BATCH, max_retries=3)
    assert Decision.decode(runs[0][0].verdict.payload, 6).blamed == {3}


def test_under_repair_an_honest_checker_that_flags_a_malformed_replacement_gradient_is_not_named(
        monkeypatch, six_layers):
    """A second gap (``Coordinator.designated``, not the receipts): while stage 2 is repaired,
    stage 1 takes the replica's gradient from stage 3 and alerts against 3 when it is
    malformed (``GradCheck._check``), but no role in ``designated`` covers that accusation, so
    the honest checker 1 is named. Stage 3 first gets 2 repaired by framing it forward (the
    documented frame_predecessor limit), then sends an empty replacement gradient."""
    def fn(link, f):  # noqa: ANN001
        tag = f.flags % 128
        if f.kind is Kind.NORM and tag == 0:
            t = f.tensor.clone()
            t[1 + 6 + 2] = 2.0  # two alerts against stage 2 (its forward check)
            f = replace(f, tensor=t)
        if f.kind is Kind.JUMP_GRAD and link.peer == 1 and tag == 1:  # 2 repaired
            f = replace(f, tensor=f.tensor[:0].clone())
        link.inner.send(f)

    six = [f'model.name="{six_layers}"', "pipeline.stages=6"]
    pipe = _hostile(monkeypatch, 3, fn, six)
    runs = attempts(pipe.runtime, pipe.attack, 0, BATCH, max_retries=3)
    blamed = [Decision.decode(r.verdict.payload, 6).blamed for r, _ in runs]
    assert blamed[0] == {2}  # (the documented limit of one replica)
    assert 1 not in blamed[1], blamed
