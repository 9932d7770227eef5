"""Signed receipts: two validly signed contents for one message name their signer, and nothing
a reporter makes up names anybody but the reporter."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from phalanx.defense.receipts import (
    PER_MICRO,
    WORDS,
    Book,
    Notary,
    Receipt,
    equivocators,
    pack,
)
from phalanx.secure.signing import LocalKeys
from phalanx.wire import Frame, Kind
from phalanx.wire.frame import encode_header

KEYS = LocalKeys(5)
NOTARY = Notary(KEYS.session, KEYS.public)


def _signed(kind: Kind, src: int, dst: int, tensor: torch.Tensor, step: int = 0, micro: int = 0,
            tag: int = 0) -> Frame:
    """The frame as a receiver whose link verified it holds it."""
    frame = Frame(kind=kind, step=step, micro=micro, src=src, dst=dst, tensor=tensor, flags=tag)
    payload = tensor.contiguous().numpy().tobytes()
    header = encode_header(frame, len(payload))
    frame.header, frame.digest = header, hashlib.sha256(payload).digest()
    frame.signature = KEYS.sealer(src, dst).sign(header, payload)
    return frame


def _receipt(frame: Frame) -> Receipt:
    return Receipt(frame.header, frame.digest, frame.signature)


def _report(*frames: Frame, slots: int = 6) -> torch.Tensor:
    return pack([_receipt(f) for f in frames], slots)


X = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))


def test_a_receipt_survives_its_trip_through_report_words():
    r = _receipt(_signed(Kind.ACTIVATION, 1, 2, X))
    words = pack([r], 2).reshape(2, WORDS)
    assert Receipt.from_words(words[0]) == r and Receipt.from_words(words[1]) is None


@pytest.mark.parametrize(("index", "value"), [
    (5, math.nan), (5, 0.5), (5, -1.0), (5, 2.0 ** 32), (0, 2.0), (0, math.inf)])
def test_report_words_that_are_not_a_receipt_are_refused(index, value):
    words = pack([_receipt(_signed(Kind.ACTIVATION, 1, 2, X))], 1)
    words[index] = value
    with pytest.raises(ValueError):
        Receipt.from_words(words)


def test_an_empty_slot_with_anything_in_it_is_refused():
    words = torch.zeros(WORDS, dtype=torch.float64)
    words[7] = 3.0
    with pytest.raises(ValueError):
        Receipt.from_words(words)


def test_two_signed_contents_for_one_message_name_their_signer():
    """Stage 1 sends stage 2 one output and stage 3 (over the jump) another: each receiver
    reports what it got, and the pair of signatures is the proof."""
    slots = {2: _report(_signed(Kind.ACTIVATION, 1, 2, -X)),
             3: _report(_signed(Kind.JUMP, 1, 3, X))}
    found = equivocators(slots, 0, 0, NOTARY)
    assert found.equivocators == {1} and not found.forgers


def test_a_conflict_one_receiver_saw_alone_names_the_signer():
    """Stage 1 sends stage 3 two different frames for one micro-batch: stage 3's book keeps both
    and the pair proves it, whatever anybody else reports."""
    book = Book(2)
    book.record(_signed(Kind.JUMP, 1, 3, X))
    book.record(_signed(Kind.JUMP, 1, 3, X * 2))
    found = equivocators({3: pack(book.drain(0, 0), book.slots)}, 0, 0, NOTARY)
    assert found.equivocators == {1}


def test_the_same_content_to_every_receiver_proves_nothing():
    slots = {2: _report(_signed(Kind.ACTIVATION, 1, 2, X)),
             3: _report(_signed(Kind.JUMP, 1, 3, X))}
    assert equivocators(slots, 0, 0, NOTARY) == equivocators({}, 0, 0, NOTARY)


def test_a_receipt_nobody_signed_names_its_reporter_and_never_the_sender():
    """Stage 2 changes the digest of what stage 1 sent it, to frame stage 1 as an equivocator:
    its signature does not verify, so stage 2 is named and stage 1 is not."""
    forged = _receipt(_signed(Kind.ACTIVATION, 1, 2, X))
    forged = Receipt(forged.header, bytes(32), forged.signature)
    slots = {2: pack([forged], 2), 3: _report(_signed(Kind.JUMP, 1, 3, X))}
    found = equivocators(slots, 0, 0, NOTARY)
    assert found.forgers == {2} and not found.equivocators


def test_a_receipt_addressed_to_another_stage_names_its_reporter():
    """A validly signed receipt of a frame to stage 3, reported by stage 2: an honest stage only
    keeps what it received, so stage 2 is lying (and the signer is not named)."""
    slots = {2: _report(_signed(Kind.JUMP, 1, 3, -X)), 3: _report(_signed(Kind.JUMP, 1, 3, X))}
    found = equivocators(slots, 0, 0, NOTARY)
    assert found.forgers == {2} and not found.equivocators


def test_a_receipt_of_what_carries_no_output_names_its_reporter():
    slots = {2: _report(_signed(Kind.GRADIENT, 3, 2, X))}
    assert equivocators(slots, 0, 0, NOTARY).forgers == {2}


@pytest.mark.parametrize(("step", "tag"), [(1, 0), (0, 1)])
def test_receipts_of_another_step_or_attempt_prove_nothing(step, tag):
    """A redo recomputes a stage's output from a repaired input: a different content, validly
    signed, for the same micro-batch of another attempt is no equivocation."""
    slots = {2: _report(_signed(Kind.ACTIVATION, 1, 2, X, step=step, tag=tag)),
             3: _report(_signed(Kind.JUMP, 1, 3, -X))}
    assert equivocators(slots, 0, 0, NOTARY) == equivocators({}, 0, 0, NOTARY)


def test_garbage_in_a_report_names_its_reporter():
    words = torch.full((2 * WORDS,), 0.25, dtype=torch.float64)
    assert equivocators({2: words, 3: _report()}, 0, 0, NOTARY).forgers == {2}


def test_a_stage_without_a_pinned_key_cannot_be_named():
    """Receipts claimed for a stage that has no key (out of the run) verify for nobody: their
    reporters are named, not the stage."""
    slots = {2: _report(_signed(Kind.ACTIVATION, 1, 2, X)),
             3: _report(_signed(Kind.JUMP, 1, 3, -X))}
    found = equivocators(slots, 0, 0, Notary(KEYS.session, lambda s: None))
    assert found.forgers == {2, 3} and not found.equivocators


def test_a_book_is_bounded_whatever_a_sender_floods_it_with():
    book = Book(2)  # (before the first attempt: the first attempt of any step is kept)
    for step in range(50):
        for micro in range(2):
            book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=step, micro=micro))
    book.record(_signed(Kind.ACTIVATION, 1, 2, X, micro=99))  # no such micro-batch: not kept
    assert len(book.kept) == 3 * PER_MICRO * 2
    assert len(book.drain(0, 0)) <= book.slots


def test_a_book_keeps_this_attempt_and_the_next_and_nothing_ahead():
    now = [(3, 0)]
    book = Book(1, lambda: now[0])
    book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=3, tag=0))
    book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=4, tag=1))  # a faster sender's next
    book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=3, tag=5))  # attempts ahead: junk
    book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=900, tag=1))
    assert len(book.drain(3, 0)) == 1
    now[0] = (4, 1)
    assert len(book.drain(4, 1)) == 1 and not book.kept


def test_frames_for_attempts_ahead_cannot_crowd_out_the_receipt_that_proves():
    """Stage 1 floods stage 2 with signed frames for future steps before sending its real
    (flipped) activation: the book still keeps the real one, so the proof stands."""
    book = Book(2, lambda: (0, 0))
    for step in range(1, 200):
        for micro in range(2):
            book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=step, micro=micro, tag=1))
            book.record(_signed(Kind.ACTIVATION, 1, 2, X, step=step, micro=micro, tag=7))
    book.record(_signed(Kind.ACTIVATION, 1, 2, -X))
    slots = {2: pack(book.drain(0, 0), book.slots), 3: _report(_signed(Kind.JUMP, 1, 3, X))}
    assert equivocators(slots, 0, 0, NOTARY).equivocators == {1}


def test_an_unsigned_frame_is_not_kept():
    book = Book(1)
    book.record(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=1, dst=2, tensor=X))
    assert not book.kept


def test_more_retries_than_attempt_tags_tell_apart_is_a_config_error():
    from phalanx.defense.config import MAX_RETRIES, DefenseConfig
    from phalanx.errors import ConfigError

    DefenseConfig(verify="duplicate", max_retries=MAX_RETRIES).validate(4)
    with pytest.raises(ConfigError, match="more than 30"):
        DefenseConfig(verify="duplicate", max_retries=MAX_RETRIES + 1).validate(4)


def test_a_full_window_of_early_and_junk_frames_leaves_room_for_every_current_receipt():
    """Stage 1 sends frames for both attempts that may follow, the other three senders their
    next attempt's early, and only then all four send this attempt's: every one is kept."""
    book = Book(2, lambda: (0, 0))
    for micro in range(2):
        for step in (0, 1):
            book.record(_signed(Kind.ACTIVATION, 1, 4, X, step=step, micro=micro, tag=1))
        for src in (0, 2, 3):
            book.record(_signed(Kind.JUMP, src, 4, X, step=1, micro=micro, tag=1))
    for micro in range(2):
        for src in range(4):
            book.record(_signed(Kind.JUMP, src, 4, X, micro=micro))
    assert len(book.drain(0, 0)) == 8


# -- gradient receipts: the proof behind a backward accusation ------------------------------

def _disputes(*frames: Frame, reporter: int = 1, step: int = 0, tag: int = 0):  # noqa: ANN202
    from phalanx.defense.backproof import disputes

    return disputes(_report(*frames), reporter, step, tag, NOTARY)


def test_a_gradient_and_evidence_that_differ_are_the_pair_that_backs_an_accusation():
    from phalanx.defense.backproof import backed
    from phalanx.defense.plan import Plan

    found = _disputes(_signed(Kind.GRADIENT, 2, 1, -X), _signed(Kind.JUMP_GRAD, 3, 1, X))
    assert found.pairs == {frozenset({(2, Kind.GRADIENT), (3, Kind.JUMP_GRAD)})}
    assert not found.forged and not found.equivocators
    # 1 checks 2's gradient against 3's evidence: both its accusations are backed
    assert backed(1, 2, Plan(), {1: found}) and backed(1, 3, Plan(), {1: found})
    assert not backed(1, 2, Plan(), {1: _disputes(_signed(Kind.GRADIENT, 2, 1, X),
                                                  _signed(Kind.JUMP_GRAD, 3, 1, X))})


@pytest.mark.parametrize("second", [
    lambda: _signed(Kind.JUMP_GRAD, 3, 1, X),  # the same bytes: nothing disagreed
    lambda: _signed(Kind.JUMP_GRAD, 3, 1, -X, micro=1),  # of another micro-batch
    lambda: _signed(Kind.JUMP_GRAD, 3, 1, -X, step=1),  # of another step
    lambda: _signed(Kind.JUMP_GRAD, 3, 1, -X, tag=1),  # of another attempt
    lambda: _signed(Kind.GRADIENT, 2, 1, -X)])  # the same sender twice
def test_receipts_that_do_not_show_two_senders_disagreeing_now_prove_no_dispute(second):
    assert not _disputes(_signed(Kind.GRADIENT, 2, 1, X), second()).pairs


def test_a_sender_that_signs_two_gradients_of_one_kind_for_a_micro_batch_is_named():
    """Honest code sends one (the checked link drops a second): the two signatures are the
    sender's own proof, and an accusation of it stands on them."""
    from phalanx.defense.backproof import backed
    from phalanx.defense.plan import Plan

    found = _disputes(_signed(Kind.GRADIENT, 2, 1, X), _signed(Kind.GRADIENT, 2, 1, -X),
                      _signed(Kind.JUMP_GRAD, 3, 1, X))
    assert found.equivocators == {2} and not found.pairs and not found.forged
    assert backed(1, 2, Plan(), {1: found})


def test_a_stray_gradient_of_another_kind_does_not_stand_in_for_the_one_checked():
    """A sender's honest bytes as a JUMP_GRAD, then the flipped GRADIENT the check used: the
    pair is the GRADIENT's, whatever came first."""
    from phalanx.defense.backproof import backed
    from phalanx.defense.plan import Plan

    found = _disputes(_signed(Kind.JUMP_GRAD, 2, 1, X), _signed(Kind.GRADIENT, 2, 1, -X),
                      _signed(Kind.JUMP_GRAD, 3, 1, X))
    assert backed(1, 2, Plan(), {1: found}) and not found.equivocators


@pytest.mark.parametrize("forged", [
    lambda: _signed(Kind.JUMP_GRAD, 3, 2, -X),  # addressed to another stage
    lambda: _signed(Kind.ACTIVATION, 0, 1, -X),  # no gradient
    lambda: _signed(Kind.GRADIENT, 3, 1, -X),  # a GRADIENT comes from the next stage only
    lambda: replace_signature(_signed(Kind.JUMP_GRAD, 3, 1, -X))])  # nobody signed it
def test_a_gradient_receipt_the_reporter_cannot_hold_names_it(forged):
    found = _disputes(_signed(Kind.GRADIENT, 2, 1, X), forged())
    assert found.forged and not found.pairs


def test_a_jump_grad_comes_from_the_three_stages_after_the_reporter_only():
    near = [_signed(Kind.GRADIENT, 1, 0, X), _signed(Kind.JUMP_GRAD, 3, 0, -X)]
    assert not _disputes(*near, reporter=0).forged
    assert _disputes(*near, _signed(Kind.JUMP_GRAD, 4, 0, X), reporter=0).forged


def replace_signature(frame: Frame) -> Frame:
    frame.signature = bytes(len(frame.signature))
    return frame


# ---- a signed output of another shape than the micro-batch's is its sender's own proof ----

WANT = lambda m: ((2, 3, 4), torch.float32) if m == 0 else None  # noqa: E731


@pytest.mark.parametrize("bad", [X[:, 1:], X.double(), X.reshape(2, 4, 3)],
                         ids=["short", "float64", "reshaped"])
def test_a_signed_output_not_shaped_like_the_micro_batch_names_its_signer(bad):
    """Stage 2 sends its output a position short (or of another dtype, or shape) alike to its
    successor and over the jump: no two contents, but its own signed header is the proof."""
    slots = {3: _report(_signed(Kind.ACTIVATION, 2, 3, bad)),
             4: _report(_signed(Kind.JUMP, 2, 4, bad))}
    found = equivocators(slots, 0, 0, NOTARY, WANT)
    assert found.malformed == {2} and not found.forgers and not found.equivocators
    assert not equivocators(slots, 0, 0, NOTARY).malformed  # (the shape is what proves it)


def test_a_well_shaped_output_or_one_outside_the_schedule_proves_nothing():
    slots = {3: _report(_signed(Kind.ACTIVATION, 2, 3, X)),
             4: _report(_signed(Kind.JUMP, 2, 4, X[:, 1:], micro=1))}
    assert equivocators(slots, 0, 0, NOTARY, WANT) == equivocators({}, 0, 0, NOTARY)


def test_a_malformed_receipt_nobody_signed_names_its_reporter_not_the_sender():
    """Stage 3 makes up a short header for what stage 2 sent it, to have 2 named."""
    honest = _signed(Kind.ACTIVATION, 2, 3, X)
    fake = Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=2, dst=3, tensor=X[:, 1:])
    forged = Receipt(encode_header(fake, X[:, 1:].numel() * 4), honest.digest, honest.signature)
    found = equivocators({3: pack([forged], 2)}, 0, 0, NOTARY, WANT)
    assert found.forgers == {3} and not found.malformed
