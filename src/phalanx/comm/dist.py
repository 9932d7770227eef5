"""Channels over ``torch.distributed`` point-to-point (gloo on CPU, NCCL on GPU).

A frame travels as two messages on the same link: a fixed-size header, then (if non-empty) the
payload, whose size the receiver learns from the validated header before allocating anything.
Sends are asynchronous (``isend``) and completed by :meth:`DistChannel.flush`.

Receiving: gloo's point-to-point works report completion only through a blocking ``wait()``, and
a ``wait`` that times out leaves the link unusable (measured on torch 2.13). So each link has a
receiver thread that blocks in ``wait()`` and hands decoded frames to a queue; callers wait on the
queue under their own deadline, and a late frame simply stays queued, in order. A peer that exits
makes the blocking wait raise, which the channel reports as :class:`ChannelClosed`.
"""

from __future__ import annotations

import queue
import re
import threading

import torch
import torch.distributed as dist

from phalanx.comm.channel import Channel, ChannelClosed, queue_get
from phalanx.wire import (
    DEFAULT_LIMITS,
    HEADER_SIZE,
    Frame,
    FrameError,
    Kind,
    Limits,
    decode_header,
    decode_payload,
)
from phalanx.wire.frame import encode_header, payload_tensor

_BYE = Kind.CONTROL  # a CONTROL frame with micro == BYE_MICRO ends a link
BYE_MICRO = 0xFFFFFFFF
INBOX_FRAMES = 64  # frames a link holds before its receiver stops reading from the peer


def transport_reason(exc: BaseException) -> str:
    """The gist of a gloo/NCCL transport error ("Connection reset by peer"), without the
    source location and the boilerplate advice around it."""
    text = str(exc).split(" This is typically caused", 1)[0]
    text = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return re.sub(r"\s*\[[0-9.:]+\]:\d+", "", text).strip().rstrip(".") or type(exc).__name__


class DistChannel(Channel):
    """A link to ``peer`` over the default process group; ranks are stage indices."""

    def __init__(
        self, me: int, peer: int, limits: Limits = DEFAULT_LIMITS,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(me, peer, limits)
        self.device = device or torch.device("cpu")
        self._pending: list[tuple[dist.Work, torch.Tensor]] = []
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_FRAMES + 1)  # full: stop reading
        self._closed = False
        self._receiver = threading.Thread(target=self._receive_loop, daemon=True,
                                          name=f"phalanx-recv-{peer}->{me}")
        self._receiver.start()

    # -- sending ---------------------------------------------------------------------------
    def _transmit(self, frame: Frame) -> int:
        payload = payload_tensor(frame.tensor.to(self.device))
        header = torch.frombuffer(
            bytearray(encode_header(frame, payload.numel())), dtype=torch.uint8
        ).to(self.device)
        self._isend(header)
        if payload.numel():
            self._isend(payload)
        return HEADER_SIZE + payload.numel()

    def _isend(self, tensor: torch.Tensor) -> None:
        try:
            work = dist.isend(tensor, dst=self.peer)
        except RuntimeError as exc:
            raise ChannelClosed(f"cannot send to stage {self.peer}: {exc}") from exc
        self._pending.append((work, tensor))  # keeps the buffer alive until flushed

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for work, _ in pending:
            try:
                work.wait()
            except RuntimeError as exc:
                raise ChannelClosed(f"send to stage {self.peer} failed: {exc}") from exc

    # -- receiving -------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        """Runs in the receiver thread: read frames until the peer says goodbye or fails."""
        while True:
            try:
                hdr = self._recv_exact(HEADER_SIZE)
                header = decode_header(hdr.cpu().numpy().tobytes(), self.limits)
                self._check_header(header)
                payload = self._recv_exact(header.nbytes) if header.nbytes else \
                    torch.empty(0, dtype=torch.uint8)
                frame = decode_payload(header, payload.cpu())
            except FrameError as exc:
                # The byte stream can no longer be trusted to be in step: report and stop.
                self._inbox.put(exc)
                self._inbox.put(ChannelClosed(f"link from stage {self.peer} closed after a "
                                              "malformed frame"))
                return
            except RuntimeError as exc:
                self._inbox.put(ChannelClosed(f"link to stage {self.peer} failed: "
                                              f"{transport_reason(exc)}"))
                return
            if frame.kind is _BYE and frame.micro == BYE_MICRO:
                self._inbox.put(ChannelClosed(f"stage {self.peer} closed the link"))
                return
            self.bytes_received += HEADER_SIZE + header.nbytes
            self._inbox.put(frame)

    def _recv_exact(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        dist.irecv(buf, src=self.peer).wait()
        return buf

    def _receive(self, timeout: float | None) -> Frame:
        item = queue_get(self._inbox, timeout, self.peer)
        if isinstance(item, Exception):
            if isinstance(item, ChannelClosed):
                self._inbox.put(item)  # a closed link stays closed for later calls
            raise item
        return item

    def close(self, timeout: float = 30.0) -> None:
        """Say goodbye to the peer and wait (bounded) for its goodbye, so neither side is left
        blocked in a receive when the process group is destroyed."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(Frame(kind=_BYE, step=0, micro=BYE_MICRO, src=self.me, dst=self.peer,
                            tensor=torch.empty(0, dtype=torch.uint8)))
            self.flush()
        except ChannelClosed:
            pass
        self._receiver.join(timeout)


def dist_channels(
    me: int, world: int, limits: Limits = DEFAULT_LIMITS, device: torch.device | None = None
) -> dict[int, DistChannel]:
    """Every link of rank ``me`` in the default process group, keyed by peer rank."""
    return {p: DistChannel(me, p, limits, device) for p in range(world) if p != me}
