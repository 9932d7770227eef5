"""Frames that arrived before the action that needs them, bounded per peer and in all.

Frames are keyed by (peer, kind, micro-batch, attempt tag), so the order of arrivals never
matters. A frame of an earlier step is stale and dropped; one tagged for an attempt other than
this one or the next, one too far ahead, or one beyond its sender's room is refused and counted
against its sender (a flooder cannot take the room the others' frames need).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from phalanx.wire import Frame, FrameError, Kind

log = logging.getLogger(__name__)

STASH_FRAMES = 4096  # frames that may wait for their action; beyond, a peer is flooding
PEER_FRAMES, PEER_BYTES = 1024, 1 << 30  # what one peer may have waiting
TAGS = 128  # attempt numbers a frame's flags tell apart

PER_MICRO = (Kind.ACTIVATION, Kind.GRADIENT, Kind.LABELS, Kind.JUMP, Kind.JUMP_GRAD)

Key = tuple[int, Kind, int, int]  # (peer, kind, micro, tag)


def describe(kind: Kind, micro: int) -> str:
    """A frame's kind and its ``micro`` field, named for what the field means for that kind: a
    micro-batch for pipeline data, a tag for control messages, nothing for per-step frames."""
    if kind in PER_MICRO:
        return f"{kind.name} of micro-batch {micro}"
    if kind is Kind.CONTROL:
        return f"CONTROL message {micro}"
    return kind.name


def size_of(frame: Frame) -> int:
    return frame.tensor.numel() * frame.tensor.element_size()


class Stash:
    """One stage's waiting frames; ``reject(peer, error)`` hears every refusal."""

    def __init__(self, me: int, reject: Callable[[int, Exception], None]) -> None:
        self.me, self.reject = me, reject
        self.frames: dict[Key, Frame] = {}
        self._backlog: dict[int, tuple[int, int]] = {}  # per peer: frames, bytes waiting

    def __contains__(self, key: Key) -> bool:
        return key in self.frames

    def __len__(self) -> int:
        return len(self.frames)

    def get(self, key: Key) -> Frame | None:
        return self.frames.get(key)

    def begin(self, step: int, tag: int) -> None:
        """A new attempt at ``step`` with ``tag``: keep only what may still be used."""
        tags = {tag, (tag + 1) % TAGS}
        self.frames = {k: f for k, f in self.frames.items() if f.step >= step and k[3] in tags}
        self._backlog = {}
        for f in self.frames.values():
            frames, size = self._backlog.get(f.src, (0, 0))
            self._backlog[f.src] = (frames + 1, size + size_of(f))

    def file(self, frame: Frame, step: int, tag: int) -> None:
        """Keep ``frame`` for later, or drop or refuse it (above)."""
        if frame.step < step:
            log.warning("stage %d dropped a stale %s frame of step %d from stage %d",
                        self.me, frame.kind.name, frame.step, frame.src)
            return
        theirs = frame.flags % TAGS
        if theirs not in (tag, (tag + 1) % TAGS):
            self.reject(frame.src, FrameError(
                f"{describe(frame.kind, frame.micro)} of step {frame.step} tagged for attempt "
                f"{theirs}, not this one ({tag}) or the next"))
            return
        key = (frame.src, frame.kind, frame.micro, theirs)
        frames, size = self._backlog.get(frame.src, (0, 0))
        old = self.frames.get(key)
        if old is not None:
            frames, size = frames - 1, size - size_of(old)
        full = (frames >= PEER_FRAMES or size + size_of(frame) > PEER_BYTES
                or (old is None and len(self.frames) >= STASH_FRAMES))
        if frame.step > step + 1 or full:
            self.reject(frame.src, FrameError(
                f"{describe(frame.kind, frame.micro)} of step {frame.step} while at step "
                f"{step} with {len(self.frames)} frames waiting ({frames} from stage "
                f"{frame.src}, {size} bytes): too far ahead"))
            return
        self.frames[key] = frame
        self._backlog[frame.src] = (frames + 1, size + size_of(frame))

    def pop(self, key: Key) -> Frame:
        frame = self.frames.pop(key)
        frames, size = self._backlog[key[0]]
        self._backlog[key[0]] = (frames - 1, size - size_of(frame))
        return frame
