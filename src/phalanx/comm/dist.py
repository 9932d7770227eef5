"""Channels over ``torch.distributed`` point-to-point (gloo on CPU, NCCL on GPU).

A frame travels as two messages on the same link: a fixed-size header, then (if non-empty) the
payload, whose size the receiver learns from the validated header before allocating anything.
Sends are asynchronous (``isend``); a receive posts an ``irecv`` and waits for it under the
caller's deadline. An abandoned receive is kept and resumed by the next ``recv``, so a late frame
is still read in order and the process group stays usable.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch
import torch.distributed as dist

from phalanx.comm.channel import Channel, ChannelClosed, ChannelError, ChannelTimeout
from phalanx.wire import HEADER_SIZE, Frame, Header, Limits, decode_header, decode_payload
from phalanx.wire.frame import encode_header, payload_tensor

_POLL_MIN_S = 5e-5
_POLL_MAX_S = 2e-3


class DistChannel(Channel):
    """A link to ``peer`` over the default process group; ranks are stage indices."""

    def __init__(
        self, me: int, peer: int, limits: Limits = Limits(), device: torch.device | None = None
    ) -> None:
        super().__init__(me, peer, limits)
        self.device = device or torch.device("cpu")
        self._blocking_wait = self.device.type != "cpu"  # NCCL works are waited on, not polled
        self._pending_sends: list[tuple[dist.Work, torch.Tensor]] = []
        self._hdr_buf: torch.Tensor | None = None
        self._hdr_work: dist.Work | None = None
        self._header: Header | None = None
        self._pay_buf: torch.Tensor | None = None
        self._pay_work: dist.Work | None = None

    # -- sending ---------------------------------------------------------------------------
    def _transmit(self, frame: Frame) -> int:
        payload = payload_tensor(frame.tensor.to(self.device))
        header = torch.frombuffer(
            bytearray(encode_header(frame, payload.numel())), dtype=torch.uint8
        ).to(self.device)
        self._isend(header)
        if payload.numel():
            self._isend(payload)
        self._pending_sends = [(w, t) for w, t in self._pending_sends if not w.is_completed()]
        return HEADER_SIZE + payload.numel()

    def _isend(self, tensor: torch.Tensor) -> None:
        try:
            work = dist.isend(tensor, dst=self.peer)
        except RuntimeError as exc:
            raise ChannelClosed(f"cannot send to stage {self.peer}: {exc}") from exc
        self._pending_sends.append((work, tensor))  # keep the buffer alive until sent

    def flush(self) -> None:
        for work, _ in self._pending_sends:
            try:
                work.wait()
            except RuntimeError as exc:
                raise ChannelClosed(f"send to stage {self.peer} failed: {exc}") from exc
        self._pending_sends.clear()

    # -- receiving -------------------------------------------------------------------------
    def _receive(self, timeout: float | None) -> Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._header is None:
            if self._hdr_work is None:
                self._hdr_buf = torch.empty(HEADER_SIZE, dtype=torch.uint8, device=self.device)
                self._hdr_work = self._irecv(self._hdr_buf)
            self._wait(self._hdr_work, deadline)
            self._hdr_work = None
            header = decode_header(self._hdr_buf.cpu().numpy().tobytes(), self.limits)
            self._check_header(header)
            self._header = header
        header = self._header
        if header.nbytes:
            if self._pay_work is None:
                self._pay_buf = torch.empty(header.nbytes, dtype=torch.uint8, device=self.device)
                self._pay_work = self._irecv(self._pay_buf)
            self._wait(self._pay_work, deadline)
            self._pay_work = None
            payload = self._pay_buf
        else:
            payload = torch.empty(0, dtype=torch.uint8)
        self._header = None
        self.bytes_received += HEADER_SIZE + header.nbytes
        frame = decode_payload(header, payload.cpu() if payload.is_cuda else payload)
        return frame

    def _irecv(self, buf: torch.Tensor) -> dist.Work:
        try:
            return dist.irecv(buf, src=self.peer)
        except RuntimeError as exc:
            raise ChannelClosed(f"cannot receive from stage {self.peer}: {exc}") from exc

    def _wait(self, work: dist.Work, deadline: float | None) -> None:
        try:
            if self._blocking_wait:
                if deadline is None:
                    work.wait()
                else:
                    work.wait(timeout=timedelta(seconds=max(deadline - time.monotonic(), 0.001)))
                return
            pause = _POLL_MIN_S
            while not work.is_completed():
                if deadline is not None and time.monotonic() >= deadline:
                    raise ChannelTimeout(f"no frame from stage {self.peer} before the deadline")
                time.sleep(pause)
                pause = min(pause * 2, _POLL_MAX_S)
            work.wait()  # surfaces a transport error, returns at once when completed
        except ChannelError:
            raise
        except RuntimeError as exc:
            raise ChannelClosed(f"link to stage {self.peer} failed: {exc}") from exc


def dist_channels(
    me: int, world: int, limits: Limits = Limits(), device: torch.device | None = None
) -> dict[int, DistChannel]:
    """Every link of rank ``me`` in the default process group, keyed by peer rank."""
    return {p: DistChannel(me, p, limits, device) for p in range(world) if p != me}
