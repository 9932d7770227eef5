"""The channel abstraction: a link from this stage to one peer, carrying validated frames.

The base class owns what every transport must do the same way: stamp outgoing frames with the
link's addresses and a per-link sequence number, and check both on every incoming frame, so a
replayed, reordered or misaddressed frame is refused whatever the transport.
"""

from __future__ import annotations

import queue
from abc import ABC, abstractmethod
from typing import Any, Protocol

from phalanx.wire import DEFAULT_LIMITS, Frame, FrameError, Header, Limits


class ChannelError(RuntimeError):
    """The link cannot deliver (the peer is gone or the transport failed)."""


class ChannelClosed(ChannelError):
    """The peer closed the link or exited."""


class ChannelTimeout(ChannelError):
    """No frame arrived before the deadline."""


class Channel(ABC):
    """A bidirectional link between stage ``me`` and stage ``peer``."""

    def __init__(self, me: int, peer: int, limits: Limits = DEFAULT_LIMITS) -> None:
        self.me = me
        self.peer = peer
        self.limits = limits
        self._send_seq = 0
        self._recv_seq = 0
        self._undecoded = 0  # frames refused before their sequence number could be read
        self.bytes_sent = 0
        self.bytes_received = 0

    def send(self, frame: Frame) -> None:
        """Send ``frame`` to the peer; the channel sets its addresses and sequence number."""
        frame.src, frame.dst = self.me, self.peer
        self._send_seq += 1
        frame.seq = self._send_seq
        self.bytes_sent += self._transmit(frame)

    def recv(self, timeout: float | None = None) -> Frame:
        """Next frame from the peer; raises :class:`ChannelTimeout` after ``timeout`` seconds."""
        try:
            frame = self._receive(timeout)
        except FrameError:
            self._undecoded += 1  # it held a sequence number we will never see
            raise
        self._check(frame)
        return frame

    def poll(self) -> Frame | None:
        """The next frame if one has already arrived, else ``None``."""
        try:
            return self.recv(timeout=0.0)
        except ChannelTimeout:
            return None

    def flush(self) -> None:
        """Wait until every frame sent so far has left this process."""

    def close(self) -> None:
        """Release the link's resources."""

    def _check(self, frame: Frame) -> None:
        self._check_header(frame)
        if not self._recv_seq < frame.seq <= self._recv_seq + 1 + self._undecoded:
            raise FrameError(
                f"frame from stage {self.peer} has sequence number {frame.seq}, expected "
                f"{self._recv_seq + 1} (replayed, reordered or lost)"
            )
        self._recv_seq, self._undecoded = frame.seq, 0

    def _check_header(self, header: Header | Frame) -> None:
        """The address check (early: on the header, before a payload buffer is allocated)."""
        if header.src != self.peer or header.dst != self.me:
            raise FrameError(
                f"frame addressed {header.src}->{header.dst} arrived on link {self.peer}->{self.me}"
            )

    @abstractmethod
    def _transmit(self, frame: Frame) -> int:
        """Put the frame on the transport; returns the number of bytes sent."""

    @abstractmethod
    def _receive(self, timeout: float | None) -> Frame:
        """Take the next frame off the transport, decoded and validated as a frame."""



class Sealer(Protocol):
    """Signs what a link sends and verifies what it receives (one link's keys)."""

    def signs(self, kind: Any) -> bool:
        """Whether frames of ``kind`` are signed."""
        ...

    def sign(self, header: bytes, payload: memoryview | bytes) -> bytes:
        """The signature of a frame."""
        ...

    def verify(self, header: bytes, payload: memoryview | bytes, signature: bytes) -> bytes:
        """The payload's digest; raises :class:`~phalanx.wire.FrameError` if the signature
        does not verify."""
        ...


def queue_get(q: queue.Queue, timeout: float | None, peer: int) -> Any:
    """Next item of ``q`` within ``timeout`` seconds (0: only if already there), else
    :class:`ChannelTimeout` naming the silent peer."""
    try:
        if timeout is not None and timeout <= 0:
            return q.get_nowait()
        return q.get(timeout=timeout)
    except queue.Empty:
        raise ChannelTimeout(f"no frame from stage {peer} within {timeout} s") from None
