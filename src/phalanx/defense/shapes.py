"""The data owner's word on each micro-batch's shape, for the middle stages that check.

In a decoder every stage's output has its input's (batch, seq): the data owner's. A middle
stage sees only what other middle stages send it, so without this it cannot tell a true input
of another length from a wrong claim (a stage that sends its output a position short *alike*
to its successor and over the jump had the honest stages after it named). Stage 0 announces
the (batch, seq) of every micro-batch it sends (:class:`Announce`, a ``SHAPE`` frame of two
int64 to each stage that verifies its predecessor) and those stages read it
(:class:`Shapes`): a hidden state of another shape is malformed wherever it arrives. The
announcement says nothing a stage does not see anyway (the activations' shapes); it carries
no token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.defense.links import Inbox
from phalanx.wire import Frame, Kind

log = logging.getLogger(__name__)


def announced_to(n: int) -> list[int]:
    """The stages told each micro-batch's shape: those that verify a middle stage, short of
    the last (which has the labels) and of stage 2 (whose checks start from stage 0)."""
    return list(range(3, n - 1))


class Announce(ChannelWrapper):
    """Stage 0's link to stage 1: each activation's (batch, seq) also goes, as ``SHAPE``
    tagged with the attempt, over ``links`` (to the stages :func:`announced_to` names)."""

    def __init__(self, inner: Channel, links: dict[int, Channel], tag: Callable[[], int]
                 ) -> None:
        super().__init__(inner)
        self.links, self.tag = links, tag

    def send(self, frame: Frame) -> None:
        if frame.kind is Kind.ACTIVATION and frame.tensor.dim() == 3:
            rows = torch.tensor(frame.tensor.shape[:2], dtype=torch.int64)
            for v, link in self.links.items():
                link.send(replace(frame, kind=Kind.SHAPE, dst=v, tensor=rows, flags=self.tag()))
        self.inner.send(frame)


class Shapes:
    """A middle stage's view of the announcements on its link from stage 0."""

    def __init__(self, inbox: Inbox, step: Callable[[], int], timeout: float | None) -> None:
        self.inbox, self.step, self.timeout = inbox, step, timeout

    def ready(self, m: int) -> bool:
        """Whether micro-batch ``m``'s announcement has arrived (never blocks)."""
        return self.inbox.ready((self.step(), m), keep=True) is not None

    def rows(self, m: int) -> tuple[int, ...] | None:
        """(batch, seq) of micro-batch ``m`` of this attempt, waiting for it (bounded); ``None``
        where what came is not two positive whole numbers (then nothing is checked against
        it, as before announcements)."""
        t = self.inbox.take((self.step(), m), self.timeout, keep=True).tensor
        if t.dtype != torch.int64 or t.shape != (2,) or not bool((t > 0).all()):
            log.warning("stage %d ignored a shape announcement of %s %s", self.inbox.me,
                        tuple(t.shape), t.dtype)
            return None
        return (int(t[0]), int(t[1]))
