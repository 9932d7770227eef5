"""Channel wrappers of the duplicated block: the jumping connection out, side inboxes in.

Frames of the defense (``JUMP``, ``JUMP_GRAD``), like the engine's, carry the attempt number in
their ``flags`` (the worker's tag): an attempt that is redone reuses its (step, micro-batch)
numbers, and what was sent for a discarded attempt must not be taken for the redo. The tag is
as untrusted as the rest of the frame: a wrong one only makes the frame wait unused (bounded)
until it is purged.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from phalanx.comm.channel import Channel, ChannelTimeout
from phalanx.comm.wrap import ChannelWrapper
from phalanx.pipeline.stash import TAGS
from phalanx.wire import Frame, FrameError, Kind

log = logging.getLogger(__name__)

Key = tuple[int, int]  # (step, micro)
HELD = 4096  # side frames a link may hold for later; beyond, its sender is flooding
PASSING, PASSING_BYTES = 1024, 256 << 20  # other frames waiting for the worker on one link


class Outbound(ChannelWrapper):
    """A stage's link to its next stage: every activation is also copied, as ``JUMP`` tagged
    with the attempt, to the stages ``jump_to()`` names (the jumping connection)."""

    def __init__(self, inner: Channel, jumps: dict[int, Channel],
                 jump_to: Callable[[], list[int]], tag: Callable[[], int]) -> None:
        super().__init__(inner)
        self.jumps, self.jump_to, self.tag = jumps, jump_to, tag

    def send(self, frame: Frame) -> None:
        self.inner.send(frame)
        if frame.kind is Kind.ACTIVATION:
            for target in self.jump_to():
                self.jumps[target].send(replace(frame, kind=Kind.JUMP, dst=target,
                                                flags=self.tag()))


class Inbox(ChannelWrapper):
    """Diverts frames of one ``kind`` into a table keyed by (step, micro, attempt tag); every
    other frame passes through to the worker in arrival order."""

    def __init__(self, inner: Channel, kind: Kind, tag: Callable[[], int]) -> None:
        super().__init__(inner)
        self.kind, self.tag = kind, tag
        self.held: dict[tuple[int, int, int], Frame] = {}
        self._passing: deque[Frame] = deque()
        self._passing_bytes = 0
        self.dropped = 0
        # what to do with a frame this link refused (the worker counts it against the peer)
        self.refuse: Callable[[int, Exception], None] = lambda peer, exc: log.warning(
            "stage %d dropped a frame from stage %d: %s", self.me, peer, exc)

    def _file(self, frame: Frame) -> None:
        if frame.kind is not self.kind:
            size = frame.tensor.numel() * frame.tensor.element_size()
            if len(self._passing) >= PASSING or self._passing_bytes + size > PASSING_BYTES:
                self.refuse(self.peer, FrameError(
                    f"{frame.kind.name} frame while {len(self._passing)} frames "
                    f"({self._passing_bytes} bytes) wait unread on this link"))
                return
            self._passing.append(frame)
            self._passing_bytes += size
            return
        if len(self.held) >= HELD:
            self.dropped += 1
            log.warning("stage %d dropped a %s frame from stage %d: %d are waiting already",
                        self.me, self.kind.name, self.peer, len(self.held))
            return
        self.held[(frame.step, frame.micro, frame.flags % TAGS)] = frame

    def recv(self, timeout: float | None = None) -> Frame:
        while not self._passing:
            self._file(self.inner.recv(timeout))
        return self._pop()

    def poll(self) -> Frame | None:
        self._drain()
        return self._pop() if self._passing else None

    def _pop(self) -> Frame:
        frame = self._passing.popleft()
        self._passing_bytes -= frame.tensor.numel() * frame.tensor.element_size()
        return frame

    def _drain(self) -> None:
        """File what has arrived; a frame the link refuses is counted against its peer."""
        while True:
            try:
                frame = self.inner.poll()
            except FrameError as exc:
                self.refuse(self.peer, exc)
                continue
            if frame is None:
                return
            self._file(frame)

    def _purge(self, key: Key) -> None:
        """Forget frames of earlier steps and of attempts other than this one and the next."""
        now = self.tag()
        keep = {now, (now + 1) % TAGS}
        self.held = {k: f for k, f in self.held.items()
                     if k[0] > key[0] or (k[0] == key[0] and k[2] in keep)}

    def ready(self, key: Key, keep: bool = False) -> Frame | None:
        """The diverted frame of ``key`` in this attempt if it has arrived (never blocks);
        ``keep`` leaves it for a later take."""
        self._drain()
        full = (*key, self.tag())
        return self.held.get(full) if keep else self.held.pop(full, None)

    def take(self, key: Key, timeout: float | None, keep: bool = False) -> Frame:
        """The diverted frame of ``key`` in this attempt, waiting at most ``timeout`` seconds;
        ``keep`` leaves it for a later take."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._purge(key)
        while True:
            full = (*key, self.tag())
            if full not in self.held:
                self._drain()  # what has arrived already
            if full in self.held:
                return self.held[full] if keep else self.held.pop(full)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"stage {self.me} waited {timeout} s for the "
                                     f"{self.kind.name} frame of micro-batch {key[1]} (step "
                                     f"{key[0]}) from stage {self.peer}")
            try:
                self._file(self.inner.recv(left))
            except FrameError as exc:
                self.refuse(self.peer, exc)
