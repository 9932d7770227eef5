"""In-process channels for the simulator and tests: byte strings through queues.

Frames are fully encoded and decoded, so the simulator exercises the same validation as the
distributed runtime.
"""

from __future__ import annotations

import queue

from phalanx.comm.channel import Channel, ChannelClosed, queue_get
from phalanx.wire import DEFAULT_LIMITS, Frame, Limits, decode, encode

_CLOSED = b""


class LocalChannel(Channel):
    """One end of an in-process link."""

    def __init__(
        self, me: int, peer: int, outbox: queue.Queue, inbox: queue.Queue, limits: Limits
    ) -> None:
        super().__init__(me, peer, limits)
        self._outbox = outbox
        self._inbox = inbox

    def _transmit(self, frame: Frame) -> int:
        data = encode(frame)
        self._outbox.put(data)
        return len(data)

    def _receive(self, timeout: float | None) -> Frame:
        data = queue_get(self._inbox, timeout, self.peer)
        if data is _CLOSED:
            raise ChannelClosed(f"stage {self.peer} closed the link")
        self.bytes_received += len(data)
        return decode(data, self.limits)

    def inject(self, data: bytes) -> None:
        """Deliver raw bytes to this end as if the peer had sent them (tests, fault injection)."""
        self._inbox.put(data)

    def close(self) -> None:
        self._outbox.put(_CLOSED)


class LocalFabric:
    """All links between ``n`` in-process stages (a full mesh of queues)."""

    def __init__(self, n: int, limits: Limits = DEFAULT_LIMITS) -> None:
        self.n = n
        self.limits = limits
        self._queues = {(a, b): queue.Queue() for a in range(n) for b in range(n) if a != b}

    def channel(self, me: int, peer: int) -> LocalChannel:
        """The end of the link ``me``–``peer`` held by ``me``."""
        return LocalChannel(
            me, peer, self._queues[(me, peer)], self._queues[(peer, me)], self.limits
        )

    def channels(self, me: int) -> dict[int, LocalChannel]:
        """Every link of stage ``me``, keyed by peer."""
        return {p: self.channel(me, p) for p in range(self.n) if p != me}
