"""In-process channels for the simulator and tests: encoded frames through queues.

A frame travels as its encoded header (bytes) and a private copy of its payload (a flat uint8
tensor on the sender's device), and the receiver decodes both with the same validation as the
distributed runtime (header first, payload size against it). One copy per message, made on the
sender's device: no trip through host memory when the stages share a GPU.

With a :class:`~phalanx.comm.channel.Sealer` per link, frames are signed and verified as on the
secure transport (the payload passes through host memory to be hashed), so the defense can use
their signatures in the simulator too.
"""

from __future__ import annotations

import queue
from collections.abc import Callable

import torch

from phalanx.comm.channel import Channel, ChannelClosed, Sealer, queue_get
from phalanx.wire import DEFAULT_LIMITS, HEADER_SIZE, Frame, Limits, decode, decode_header
from phalanx.wire.frame import decode_payload, encode_header, payload_tensor

_CLOSED = b""


class LocalChannel(Channel):
    """One end of an in-process link."""

    def __init__(
        self, me: int, peer: int, outbox: queue.Queue, inbox: queue.Queue, limits: Limits,
        sealer: Sealer | None = None,
    ) -> None:
        super().__init__(me, peer, limits)
        self._outbox = outbox
        self._inbox = inbox
        self.sealer = sealer

    def _transmit(self, frame: Frame) -> int:
        payload = payload_tensor(frame.tensor).clone()  # the sender may reuse its tensor
        header = encode_header(frame, payload.numel())
        signature = b""
        if self.sealer is not None and self.sealer.signs(frame.kind):
            signature = self.sealer.sign(header, _host(payload))
        self._outbox.put((header, payload, signature))
        return HEADER_SIZE + payload.numel() + len(signature)

    def _receive(self, timeout: float | None) -> Frame:
        item = queue_get(self._inbox, timeout, self.peer)
        if item is _CLOSED:
            raise ChannelClosed(f"stage {self.peer} closed the link")
        if isinstance(item, bytes):  # raw bytes injected by a test or a fault injector
            self.bytes_received += len(item)
            return decode(item, self.limits)
        header_bytes, payload, signature = item
        header = decode_header(header_bytes, self.limits)
        self.bytes_received += HEADER_SIZE + header.nbytes + len(signature)
        frame = decode_payload(header, payload)
        if self.sealer is not None and self.sealer.signs(header.kind):
            frame.digest = self.sealer.verify(header_bytes, _host(payload), signature)
            frame.signature, frame.header = signature, header_bytes
        return frame

    def inject(self, data: bytes) -> None:
        """Deliver raw bytes to this end as if the peer had sent them (tests, fault injection)."""
        self._inbox.put(bytes(data))

    def close(self) -> None:
        self._outbox.put(_CLOSED)


def _host(payload: torch.Tensor) -> memoryview | bytes:
    """A flat uint8 payload's bytes in host memory, to hash."""
    return memoryview(payload.cpu().numpy()) if payload.numel() else b""


class LocalFabric:
    """All links between ``n`` in-process stages (a full mesh of queues); ``sealer(me, peer)``
    signs what ``me`` sends ``peer`` and verifies what it receives from it."""

    def __init__(self, n: int, limits: Limits = DEFAULT_LIMITS,
                 sealer: Callable[[int, int], Sealer] | None = None) -> None:
        self.n = n
        self.limits = limits
        self.sealer = sealer
        self._queues = {(a, b): queue.Queue() for a in range(n) for b in range(n) if a != b}

    def channel(self, me: int, peer: int) -> LocalChannel:
        """The end of the link ``me``–``peer`` held by ``me``."""
        return LocalChannel(
            me, peer, self._queues[(me, peer)], self._queues[(peer, me)], self.limits,
            self.sealer(me, peer) if self.sealer is not None else None,
        )

    def channels(self, me: int) -> dict[int, LocalChannel]:
        """Every link of stage ``me``, keyed by peer."""
        return {p: self.channel(me, p) for p in range(self.n) if p != me}
