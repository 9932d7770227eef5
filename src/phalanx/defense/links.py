"""Channel wrappers of the duplicated block: the jumping connection out, side inboxes in."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace

from phalanx.comm.channel import Channel, ChannelTimeout
from phalanx.comm.wrap import ChannelWrapper
from phalanx.wire import Frame, Kind

Key = tuple[int, int]  # (step, micro)


class Outbound(ChannelWrapper):
    """A stage's link to a neighbour: a frame of ``kind`` whose (step, micro) is in
    ``marks[flag]`` gets that flag (``FLAG_SKIP``: it comes from a bypass; ``FLAG_REPAIRED``:
    from a repaired input); every activation is also copied, as ``JUMP``, to the stages
    ``jump_to()`` names (the jumping connection)."""

    def __init__(self, inner: Channel, kind: Kind, marks: dict[int, set[Key]],
                 jumps: dict[int, Channel] | None = None,
                 jump_to: Callable[[], list[int]] | None = None) -> None:
        super().__init__(inner)
        self.kind, self.marks = kind, marks
        self.jumps, self.jump_to = jumps or {}, jump_to or (lambda: [])

    def send(self, frame: Frame) -> None:
        if frame.kind is self.kind:
            key = (frame.step, frame.micro)
            flags = sum(flag for flag, keys in self.marks.items() if key in keys)
            if flags:
                frame = replace(frame, flags=frame.flags | flags)
        self.inner.send(frame)
        if frame.kind is Kind.ACTIVATION:
            for target in self.jump_to():
                self.jumps[target].send(replace(frame, kind=Kind.JUMP, dst=target))


class Inbox(ChannelWrapper):
    """Diverts frames of one ``kind`` into a table keyed by (step, micro); every other frame
    passes through to the worker in arrival order."""

    def __init__(self, inner: Channel, kind: Kind) -> None:
        super().__init__(inner)
        self.kind = kind
        self.held: dict[Key, Frame] = {}
        self._passing: deque[Frame] = deque()

    def _file(self, frame: Frame) -> None:
        if frame.kind is self.kind:
            self.held[(frame.step, frame.micro)] = frame
        else:
            self._passing.append(frame)

    def recv(self, timeout: float | None = None) -> Frame:
        while not self._passing:
            self._file(self.inner.recv(timeout))
        return self._passing.popleft()

    def poll(self) -> Frame | None:
        self._drain()
        return self._passing.popleft() if self._passing else None

    def _drain(self) -> None:
        while (frame := self.inner.poll()) is not None:
            self._file(frame)

    def ready(self, key: Key) -> Frame | None:
        """The diverted frame of ``key`` if it has arrived (never blocks)."""
        self._drain()
        return self.held.pop(key, None)

    def take(self, key: Key | None, timeout: float | None) -> Frame:
        """The diverted frame of ``key`` (the oldest one when ``key`` is None), waiting at most
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if key is None and self.held:
                return self.held.pop(next(iter(self.held)))
            if key is not None and key in self.held:
                self.held = {k: f for k, f in self.held.items() if k[0] >= key[0]}
                return self.held.pop(key)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise ChannelTimeout(f"stage {self.me} waited {timeout} s for a "
                                     f"{self.kind.name} frame from stage {self.peer}")
            self._file(self.inner.recv(left))


class FlagTap(ChannelWrapper):
    """Remembers the flags of the activations arriving on a link, by (step, micro)."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner)
        self.flags: dict[Key, int] = {}

    def _seen(self, frame: Frame | None) -> Frame | None:
        if frame is not None and frame.kind is Kind.ACTIVATION:
            if len(self.flags) > 4096:
                newest = max(k[0] for k in self.flags)
                self.flags = {k: f for k, f in self.flags.items() if k[0] >= newest}
            self.flags[(frame.step, frame.micro)] = frame.flags
        return frame

    def recv(self, timeout: float | None = None) -> Frame:
        return self._seen(self.inner.recv(timeout))

    def poll(self) -> Frame | None:
        return self._seen(self.inner.poll())
