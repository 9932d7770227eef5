"""A channel that wraps another: the seam where attacks and fault injection act on messages
without an ``if`` in the engine."""

from __future__ import annotations

from phalanx.comm.channel import Channel
from phalanx.wire import Frame


class ChannelWrapper(Channel):
    """Delegates to ``inner``; subclasses change outgoing frames in :meth:`outgoing`."""

    def __init__(self, inner: Channel) -> None:  # noqa: D107 - the inner link keeps the state
        self.inner = inner
        self.me, self.peer, self.limits = inner.me, inner.peer, inner.limits

    def outgoing(self, frame: Frame) -> Frame | None:
        """The frame to send instead of ``frame`` (``None`` drops it)."""
        return frame

    def send(self, frame: Frame) -> None:
        out = self.outgoing(frame)
        if out is not None:
            self.inner.send(out)

    def recv(self, timeout: float | None = None) -> Frame:
        return self.inner.recv(timeout)

    def poll(self) -> Frame | None:
        return self.inner.poll()

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:  # type: ignore[override]
        return self.inner.bytes_received

    def _transmit(self, frame: Frame) -> int:  # pragma: no cover - send() goes to inner
        raise NotImplementedError

    def _receive(self, timeout: float | None) -> Frame:  # pragma: no cover
        raise NotImplementedError
