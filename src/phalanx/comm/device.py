"""Received tensors placed on the stage's device, whatever device the transport used."""

from __future__ import annotations

from dataclasses import replace

import torch

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.wire import Frame, Kind

DATA_KINDS = frozenset({Kind.ACTIVATION, Kind.GRADIENT, Kind.LABELS, Kind.TIED_GRAD,
                        Kind.TIED_WEIGHT, Kind.JUMP, Kind.JUMP_GRAD})
"""Frames whose tensors a stage computes with; control values (norms, reports, verdicts,
control messages) stay in host memory, where they are read."""


class OnDevice(ChannelWrapper):
    """The innermost wrapper of a stage's link: pipeline data arrives on ``device``, so the
    engine, the defense and the attacks never move a tensor themselves."""

    def __init__(self, inner: Channel, device: torch.device) -> None:
        super().__init__(inner)
        self.device = device

    def _place(self, frame: Frame | None) -> Frame | None:
        if frame is None or frame.kind not in DATA_KINDS or frame.tensor.device == self.device:
            return frame
        return replace(frame, tensor=frame.tensor.to(self.device))

    def recv(self, timeout: float | None = None) -> Frame:
        return self._place(self.inner.recv(timeout))

    def poll(self) -> Frame | None:
        return self._place(self.inner.poll())


def on_device(channels: dict[int, Channel], device: torch.device) -> dict[int, Channel]:
    """``channels`` delivering pipeline data on ``device`` (unchanged on the CPU)."""
    if device.type == "cpu":
        return channels
    return {p: OnDevice(ch, device) for p, ch in channels.items()}
