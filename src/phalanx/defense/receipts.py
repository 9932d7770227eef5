"""Signed receipts: the coordinator's proof that a stage equivocated.

Every copy of a stage's output that another stage receives — its ``ACTIVATION``, and the
``JUMP`` copies sent over the jumping connection to stages two or more ahead — is signed by the
sender (the secure transport; in the simulator, throwaway keys). An honest stage sends one
tensor per (step, micro-batch, attempt) to all of them. So two validly signed receipts of
different contents (digest, dtype or shape) for the same (sender, step, micro-batch, attempt)
are the sender's own proof that it equivocated, whoever reports them: nobody else can sign for
it.

Each stage keeps, in a :class:`Book`, the receipt (raw header, payload digest, signature) of
every such frame it receives, and sends those of the attempt being judged in its report
(:func:`pack`). The coordinator groups them (:func:`equivocators`): where a group holds two
contents, it checks the signatures against the sender's pinned key; two valid ones name the
sender, and a receipt whose signature does not verify names its reporter (an honest stage only
keeps frames whose signature its link verified). Receipts of other attempts are ignored: within
one step an attempt number repeats only after :data:`~phalanx.pipeline.stash.TAGS` attempts,
more than a step can have (``defense.max_retries`` is bounded for this).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from cryptography.hazmat.primitives.asymmetric import ed25519

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.pipeline.stash import TAGS
from phalanx.secure.signing import SIGNATURE, verify_evidence
from phalanx.wire import HEADER_SIZE, Frame, FrameError, Header, Kind, decode_header

log = logging.getLogger(__name__)

DIGEST = 32
BYTES = HEADER_SIZE + DIGEST + SIGNATURE
WORDS = 1 + BYTES // 4  # a presence flag, then the bytes as little-endian uint32 words
PER_MICRO = 4  # what a stage receives of a micro-batch: its input, and up to three jumps


def carries_output(kind: Kind, src: int, dst: int) -> bool:
    """Whether a frame is a copy of its sender's own output (what must be the same for all its
    receivers): an activation, or a jump to a stage two or more ahead (a jump to the next
    stage carries what its sender computed with a replica, not its own output)."""
    return kind is Kind.ACTIVATION or (kind is Kind.JUMP and dst >= src + 2)


@dataclass(frozen=True)
class Receipt:
    """A received frame's raw header, its payload's SHA-256 and the sender's signature."""

    header: bytes
    digest: bytes
    signature: bytes

    def words(self) -> torch.Tensor:
        raw = torch.frombuffer(bytearray(self.header + self.digest + self.signature),
                               dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
        return torch.cat([torch.ones(1, dtype=torch.float64), raw.to(torch.float64)])

    @classmethod
    def from_words(cls, t: torch.Tensor) -> Receipt | None:
        """The receipt of a report slot, ``None`` for an empty one; raises ``ValueError`` for
        anything that is not one."""
        if t.shape != (WORDS,) or not bool(torch.isfinite(t).all()):
            raise ValueError("a receipt slot must be finite words")
        if float(t[0]) == 0.0:
            if bool((t != 0).any()):
                raise ValueError("an empty receipt slot must be zeros")
            return None
        body = t[1:]
        if (float(t[0]) != 1.0 or bool(((body < 0) | (body > 0xFFFFFFFF)
                                         | (body != body.round())).any())):
            raise ValueError("a receipt's words must be whole 32-bit numbers")
        raw = body.to(torch.int64).to(torch.int32).numpy().tobytes()
        return cls(raw[:HEADER_SIZE], raw[HEADER_SIZE:HEADER_SIZE + DIGEST],
                   raw[HEADER_SIZE + DIGEST:])


class Book:
    """The receipts one stage keeps: of this attempt, and of the next (frames of a faster
    stage arrive early), one per (step, attempt, sender, micro-batch, kind) for micro-batches
    below ``max_micro`` — and, once per attempt, a second of different content for the same key
    (the sender equivocated to this stage alone: the pair is the proof). Only frames of the
    attempt ``now()`` and the one after it are kept, so a sender cannot crowd out the receipts
    that matter with frames for attempts ahead. What an attempt can hold fits in its report's
    ``slots``."""

    def __init__(self, max_micro: int,
                 now: Callable[[], tuple[int, int] | None] = lambda: None,
                 per_micro: int = PER_MICRO) -> None:
        self.max_micro, self.per_micro = max_micro, per_micro
        self.now = now  # the receiving stage's (step, attempt); None before its first
        self.slots = per_micro * max_micro + 2
        self.kept: dict[tuple[int, int, int, int, Kind], tuple[Receipt, tuple]] = {}
        self.pairs: dict[tuple[int, int], list[Receipt]] = {}  # (step, attempt): a conflict

    def record(self, frame: Frame) -> None:
        attempt = (frame.step, frame.flags % TAGS)
        if (not frame.signature or not 0 <= frame.micro < self.max_micro
                or not self._expected(attempt)):
            return  # (a frame for an attempt far ahead is junk: it must not fill the book)
        key = (*attempt, frame.src, frame.micro, frame.kind)
        receipt = Receipt(frame.header, frame.digest, frame.signature)
        content = (frame.digest, frame.tensor.dtype, tuple(frame.tensor.shape))
        if key in self.kept:
            first, seen = self.kept[key]
            if seen != content and attempt not in self.pairs:
                self.pairs[attempt] = [first, receipt]
            return
        if len(self.kept) >= 3 * self.per_micro * self.max_micro:  # (never: 3 attempts)
            log.warning("stage %d kept no receipt of a %s frame from stage %d: %d are kept",
                        frame.dst, frame.kind.name, frame.src, len(self.kept))
            return
        self.kept[key] = (receipt, content)

    def _expected(self, attempt: tuple[int, int]) -> bool:
        """Whether frames of ``attempt`` (step, tag) can arrive now: this one's and the next's
        (a redo of this step, or the next step; before the first, the first of any step)."""
        now = self.now()
        if now is None:
            return attempt[1] == 0
        return attempt == now or attempt in _following(*now)

    def drain(self, step: int, tag: int) -> list[Receipt]:
        """The receipts of attempt ``tag`` of ``step``, a conflict first (forgotten with
        every earlier one; the next attempt's are kept)."""
        mine = [*self.pairs.get((step, tag), []),
                *(r for k, (r, _) in self.kept.items() if k[:2] == (step, tag))]
        keep = _following(step, tag)
        self.kept = {k: v for k, v in self.kept.items() if k[:2] in keep}
        self.pairs = {k: v for k, v in self.pairs.items() if k in keep}
        return mine[:self.slots]


def _following(step: int, tag: int) -> set[tuple[int, int]]:
    """The attempts that can follow attempt ``tag`` of ``step``."""
    nxt = (tag + 1) % TAGS
    return {(step, nxt), (step + 1, nxt)}



def output_of(kind: Kind) -> Callable[[Frame], bool]:
    """Frames of ``kind`` that carry their sender's output (what a link's receipts are of)."""
    return lambda f: f.kind is kind and carries_output(f.kind, f.src, f.dst)


class Receipted(ChannelWrapper):
    """A raw link whose received frames that ``keeps`` are entered in the stage's
    :class:`Book`: the frame that carries its sender's output (:func:`output_of`), or the
    gradients checked against each other (:mod:`phalanx.defense.backproof`)."""

    def __init__(self, inner: Channel, book: Book, keeps: Callable[[Frame], bool]) -> None:
        super().__init__(inner)
        self.book, self.keeps = book, keeps

    def _seen(self, frame: Frame | None) -> Frame | None:
        if frame is not None and self.keeps(frame):
            self.book.record(frame)
        return frame

    def recv(self, timeout: float | None = None) -> Frame:
        return self._seen(self.inner.recv(timeout))  # type: ignore[return-value]

    def poll(self) -> Frame | None:
        return self._seen(self.inner.poll())


def pack(receipts: list[Receipt], slots: int) -> torch.Tensor:
    """``slots`` report slots of ``WORDS`` words: the receipts, then empty ones."""
    out = torch.zeros(slots, WORDS, dtype=torch.float64)
    for i, r in enumerate(receipts[:slots]):
        out[i] = r.words()
    return out.reshape(-1)


@dataclass(frozen=True)
class Notary:
    """What the coordinator checks receipts with: the run's session id and each stage's pinned
    public key (``None`` for a stage without one)."""

    session: bytes
    key_of: Callable[[int], ed25519.Ed25519PublicKey | None]

    def signed(self, r: Receipt, src: int) -> bool:
        key = self.key_of(src)
        return key is not None and verify_evidence(key, self.session, r.header, r.digest,
                                                   r.signature)


@dataclass(frozen=True)
class Findings:
    """What one attempt's receipts prove: the stages that signed two contents for one message,
    the stages that reported a receipt nobody signed, and the stages that signed an output of
    another shape or dtype than the micro-batch's (:data:`Expected`)."""

    equivocators: frozenset[int] = frozenset()
    forgers: frozenset[int] = frozenset()
    malformed: frozenset[int] = frozenset()


Expected = Callable[[int], tuple[tuple[int, ...], torch.dtype] | None]
"""The (shape, dtype) every stage's output of micro-batch m has in this attempt (the data
owner's (batch, seq), the model's width and the run's dtype); ``None`` outside the schedule."""


def _parsed(r: Receipt, reporter: int) -> Header | None:
    """The receipt's header if it is one an honest ``reporter`` keeps, else ``None``."""
    try:
        h = decode_header(r.header)
    except FrameError:
        return None
    if (h.dst != reporter or not carries_output(h.kind, h.src, h.dst) or len(r.digest) != DIGEST
            or len(r.signature) != SIGNATURE):
        return None
    return h


def equivocators(slots: dict[int, torch.Tensor], step: int, tag: int, notary: Notary,
                 expected: Expected = lambda m: None) -> Findings:
    """Judge the receipts each stage reported (its report's receipt words) for attempt ``tag``
    of ``step``, by the rules of the module docstring; a validly signed output whose header
    is not ``expected`` names its signer (honest stages send every output in the micro-batch's
    shape: their receivers' checks replace what is not), one whose signature fails its
    reporter."""
    forgers: set[int] = set()
    malformed: set[int] = set()
    groups: dict[tuple[int, int], dict[tuple, list[tuple[int, Receipt]]]] = {}
    for reporter, words in slots.items():
        try:
            receipts = [Receipt.from_words(w) for w in words.reshape(-1, WORDS)]
        except ValueError:
            forgers.add(reporter)
            continue
        for r in receipts:
            if r is None:
                continue
            h = _parsed(r, reporter)
            if h is None:
                forgers.add(reporter)
                continue
            if h.step != step or h.flags % TAGS != tag:
                continue  # of another attempt: proves nothing about this one
            want = expected(h.micro)
            if want is not None and (h.shape, h.dtype) != want:
                if notary.signed(r, h.src):
                    malformed.add(h.src)
                else:
                    forgers.add(reporter)
            content = (r.digest, h.dtype, h.shape)
            groups.setdefault((h.src, h.micro), {}).setdefault(content, []).append((reporter, r))
    liars: set[int] = set()
    for (src, _), contents in groups.items():
        if len(contents) < 2:
            continue
        valid = 0
        for held in contents.values():
            good = [notary.signed(r, src) for _, r in held]
            forgers |= {rep for (rep, _), ok in zip(held, good, strict=True) if not ok}
            valid += any(good)
        if valid >= 2:
            liars.add(src)
    return Findings(frozenset(liars), frozenset(forgers), frozenset(malformed))
