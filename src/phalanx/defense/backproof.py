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
PER_MICRO = 3  # gradients a stage receives of a micro-batch: the gradient, and two JUMP_GRADs


def backward(frame: Frame) -> bool:
    """Whether a received frame is a gradient whose receipt the stage keeps."""
    return frame.kind in BACKWARD


def senders(r: int, x: int, plan: Plan) -> tuple[int, int]:
    """The two stages whose messages must disagree when r, as a backward checker, accuses x:
    x (the gradient) and x + 1 (the evidence) where r is the stage x computes on; else x is
    the replica holder of x - 1, whose gradient r checks against x's evidence."""
    return (x, x + 1) if r == plan.pred(x) else (x - 1, x)


@dataclass(frozen=True)
class Disputes:
    """What one report's gradient receipts prove: the pairs of senders whose signed messages
    for one micro-batch of the attempt differ, and whether the report held a receipt its
    reporter cannot honestly hold (unparsable, not addressed to it, not a gradient, or not
    signed by its sender)."""

    pairs: frozenset[tuple[int, int]] = frozenset()
    forged: bool = False


def disputes(words: torch.Tensor, reporter: int, step: int, tag: int,
             notary: Notary) -> Disputes:
    """Judge the gradient receipts of ``reporter``'s report for attempt ``tag`` of ``step``."""
    held: dict[int, dict[int, tuple]] = {}  # micro -> sender -> content
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
        if (h.dst != reporter or h.kind not in BACKWARD or len(r.digest) != DIGEST
                or len(r.signature) != SIGNATURE or not notary.signed(r, h.src)):
            return Disputes(forged=True)
        if h.step == step and h.flags % TAGS == tag:
            held.setdefault(h.micro, {}).setdefault(h.src, (r.digest, h.dtype, h.shape))
    pairs = set()
    for contents in held.values():
        for a, b in combinations(sorted(contents), 2):
            if contents[a] != contents[b]:
                pairs.add((a, b))
    return Disputes(frozenset(pairs))


def backed(r: int, x: int, plan: Plan, found: Mapping[int, Disputes]) -> bool:
    """Whether r's backward accusation of x comes with its proof."""
    return senders(r, x, plan) in found[r].pairs
