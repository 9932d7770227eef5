"""The proof behind a backward accusation: the two signed gradients that disagreed.

Stage b checks the gradient it receives from the stage g after it in the path (a
``GRADIENT``; a ``JUMP_GRAD`` from b + 2 while b + 1 is bypassed) against the recomputation that
g + 1, which holds g's replica, sends it as evidence (``JUMP_GRAD``). Both are signed by their
senders. Each stage keeps, in a second :class:`~phalanx.defense.receipts.Book`, the receipt of
every gradient it receives, and reports them with the attempt. An accusation by b against g
(the gradient) or g + 1 (the evidence) counts only where b's report holds, for one micro-batch
of the attempt, validly signed receipts of g's and g + 1's messages with different contents
(digest, dtype or shape): an honest checker alerts only on a disagreement, so it always holds
one. Without it, the accusation names b.

What this settles: where honest stages compute bit for bit alike (the default bitwise
comparison, same hardware and software), an honest g and g + 1 send identical bytes, so a
checker that makes up a mismatch (the ``frame_successor`` attacker) has no pair and names
itself. What it does not: where honest recomputations differ in their last bits (tolerance
modes on mixed hardware), any two honest messages differ, and the pair proves only that they
were sent; and when g and g + 1 really disagree, which of the two lied (``false_evidence``:
one replica cannot tell, nor can anyone without g's weights). A malformed gradient or evidence
always differs from a well-formed other message, so an honest checker's alert on it is backed;
one that g and g + 1 both send byte for byte alike (a colluding pair) is not.

Receipts are kept and compared by kind: the check compares g's gradient (a ``GRADIENT`` from
b + 1, a ``JUMP_GRAD`` from b + 2 through a bypass) with g + 1's ``JUMP_GRAD``, and a stray
frame of another kind from the same sender (filed, never used) must not stand in for the one
the check used. Two validly signed receipts of one kind from one sender for one micro-batch of
the attempt (honest code sends one; the checked link drops a second) are its own proof:
it is named, and an accusation against it needs no other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations

import torch

from phalanx.defense.plan import Plan
from phalanx.defense.receipts import DIGEST, WORDS, Notary, Receipt
from phalanx.pipeline.stash import TAGS
from phalanx.secure.signing import SIGNATURE
from phalanx.wire import Frame, FrameError, Kind, decode_header

BACKWARD = frozenset({Kind.GRADIENT, Kind.JUMP_GRAD})
PER_MICRO = 4  # gradients a stage receives of a micro-batch: b + 1's (either kind), b + 2's
# and b + 3's JUMP_GRAD


def kinds_from(src: int, me: int) -> frozenset[Kind]:
    """The gradient kinds stage ``me`` can receive from stage ``src``: a ``GRADIENT`` only
    from the stage after it; ``JUMP_GRAD`` from the three after it."""
    return BACKWARD if src == me + 1 else frozenset({Kind.JUMP_GRAD}) if 1 < src - me <= 3 \
        else frozenset()


def backward(frame: Frame) -> bool:
    """Whether a received frame is a gradient whose receipt the stage keeps."""
    return frame.kind in kinds_from(frame.src, frame.dst)


def used_kind(r: int, g: int) -> Kind:
    """The kind of the gradient from g that checker r compares (through a bypass when g is
    not r's successor)."""
    return Kind.GRADIENT if g == r + 1 else Kind.JUMP_GRAD


def senders(r: int, x: int, plan: Plan) -> tuple[int, int]:
    """The two stages whose messages must disagree when r, as a backward checker, accuses x:
    x (the gradient) and x + 1 (the evidence) where r is the stage x computes on; else x is
    the replica holder of x - 1, whose gradient r checks against x's evidence."""
    return (x, x + 1) if r == plan.pred(x) else (x - 1, x)


Sent = tuple[int, Kind]  # (sender, kind)


@dataclass(frozen=True)
class Disputes:
    """What one report's gradient receipts prove: the pairs of (sender, kind) whose signed
    messages for one micro-batch of the attempt differ; the senders that signed two contents
    of one kind for one micro-batch; and whether the report held a receipt its reporter
    cannot honestly hold (unparsable, not addressed to it, of a kind its sender does not send
    it, or not signed by its sender)."""

    pairs: frozenset[frozenset[Sent]] = frozenset()
    equivocators: frozenset[int] = frozenset()
    forged: bool = False
    empty: frozenset[int] = frozenset()  # senders of an empty JUMP_GRAD (evidence) this attempt


def disputes(words: torch.Tensor, reporter: int, step: int, tag: int,
             notary: Notary) -> Disputes:
    """Judge the gradient receipts of ``reporter``'s report for attempt ``tag`` of ``step``."""
    held: dict[int, dict[Sent, tuple]] = {}  # micro -> (sender, kind) -> first content
    twice: set[int] = set()
    empty: set[int] = set()
    try:
        receipts = [Receipt.from_words(w) for w in words.reshape(-1, WORDS)]
    except ValueError:
        return Disputes(forged=True)
    for r in receipts:
        if r is None:
            continue
        try:
            h = decode_header(r.header)
        except FrameError:
            return Disputes(forged=True)
        if (h.dst != reporter or h.kind not in kinds_from(h.src, reporter)
                or len(r.digest) != DIGEST or len(r.signature) != SIGNATURE
                or not notary.signed(r, h.src)):
            return Disputes(forged=True)
        if h.step == step and h.flags % TAGS == tag:
            content = (r.digest, h.dtype, h.shape)
            if h.kind is Kind.JUMP_GRAD and 0 in h.shape:
                empty.add(h.src)
            first = held.setdefault(h.micro, {}).setdefault((h.src, h.kind), content)
            if first != content:
                twice.add(h.src)
    pairs = set()
    for contents in held.values():
        for a, b in combinations(contents, 2):
            if a[0] != b[0] and contents[a] != contents[b]:
                pairs.add(frozenset((a, b)))
    return Disputes(frozenset(pairs), frozenset(twice), empty=frozenset(empty))


def backed(r: int, x: int, plan: Plan, found: Mapping[int, Disputes]) -> bool:
    """Whether r's backward accusation of x comes with its proof: the gradient and the
    evidence it compared differ, or one of their senders signed two of its message."""
    g, e = senders(r, x, plan)
    d = found[r]
    return bool({g, e} & d.equivocators) or frozenset(
        ((g, used_kind(r, g)), (e, Kind.JUMP_GRAD))) in d.pairs


def disputed_repairs(plan: Plan, found: Mapping[int, Disputes]) -> frozenset[int]:
    """The stages whose gradients come from a repair in dispute: for each repaired stage c,
    where the report of the stage b = c - 1 before it (which takes c + 1's replica gradient in
    place of c's) holds c's gradient and c + 1's, validly signed and different, stages 0 to c.
    c and its replica disagree on c's input gradient: the replacement is false, or c's own
    (c lied, or stepped on a false gradient it took for its successor's: evidence mended in),
    and one replica cannot tell which; every stage before c learns from one of the two."""
    front: set[int] = set()
    for c in plan.repaired:
        d = found.get(c - 1)
        if d is not None and frozenset(((c, Kind.GRADIENT), (c + 1, Kind.JUMP_GRAD))) in d.pairs:
            front |= set(range(c + 1))
    return frozenset(front)
