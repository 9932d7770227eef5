"""The backward half of the duplicated block, at stage b = s - 1.

Stage s + 1 holds the replica of stage s and sends, for every training micro-batch, the
replica's gradient with respect to stage s's true input (``JUMP_GRAD``). :class:`GradCheck`
wraps stage b's link from stage s: before the worker sees a gradient from stage s it is compared
with that recomputation. On a mismatch (an alert against s) the worker gets zeros instead, for
the rest of the iteration (``skip``, ``restart``), or the replica's gradient (``repair``), so a
poisoned gradient never reaches stages < s. A
``JUMP_GRAD`` marked ``FLAG_SKIP`` means stages s and s + 1 were bypassed: its tensor replaces
the gradient from stage s. An empty one means there is nothing to compare (stage s was itself
bypassing its predecessor).
"""

from __future__ import annotations

from collections import deque
from dataclasses import replace

import torch

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.defense.config import DefenseConfig
from phalanx.defense.duplicate import Alert, Checks
from phalanx.defense.links import Inbox
from phalanx.wire import FLAG_SKIP, Frame, Kind


class GradCheck(ChannelWrapper):
    """Stage b's link from stage s = b + 1, checked against the replica at stage b + 2 when
    ``evidence`` is given (s is a checked stage); a gradient marked ``FLAG_SKIP`` (sent by a
    bypass) is taken as zeros and remembered, unchecked."""

    def __init__(self, inner: Channel, evidence: Inbox | None, cfg: DefenseConfig, checks: Checks,
                 standing: set[int], timeout: float | None) -> None:
        super().__init__(inner)
        self.evidence, self.cfg, self.checks = evidence, cfg, checks
        self.standing, self.timeout = standing, timeout
        self.drop_step = -1  # the iteration whose gradients from stage s are being dropped
        self._waiting: Frame | None = None
        self._ready: deque[Frame] = deque()

    def recv(self, timeout: float | None = None) -> Frame:
        if self._ready:
            return self._ready.popleft()
        frame = self._waiting or self.inner.recv(timeout)
        self._waiting = None
        if frame.kind is not Kind.GRADIENT:
            return frame
        jump = None
        if self.evidence is not None:
            jump = self.evidence.take((frame.step, frame.micro), timeout)
        return self._check(frame, jump)

    def poll(self) -> Frame | None:
        if self._ready:
            return self._ready.popleft()
        if self._waiting is None:
            frame = self.inner.poll()
            if frame is None or frame.kind is not Kind.GRADIENT:
                return frame
            self._waiting = frame
        jump = None
        if self.evidence is not None:
            jump = self.evidence.ready((self._waiting.step, self._waiting.micro))
            if jump is None:
                return None
        frame, self._waiting = self._waiting, None
        return self._check(frame, jump)

    def _check(self, grad: Frame, jump: Frame | None) -> Frame:
        s, key = grad.src, (grad.step, grad.micro)
        zeros = replace(grad, tensor=torch.zeros_like(grad.tensor))
        if grad.flags & FLAG_SKIP:  # from a bypass: zeros by construction, nothing to check
            self.checks.bypassed.add(key)
            return zeros
        if jump is None or {s - 1, s, s + 1} & self.standing:
            return grad  # unchecked stage, or this stage, the suspect or the evidence quarantined
        if jump.flags & FLAG_SKIP:  # stages s and s + 1 were bypassed: take the direct gradient
            if jump.tensor.shape == grad.tensor.shape and jump.tensor.dtype == grad.tensor.dtype:
                return replace(grad, tensor=jump.tensor)
            return zeros
        if jump.tensor.numel() == 0:
            return grad
        if self.drop_step == grad.step:
            return self._drop(zeros)
        if not self.checks.compare(jump.tensor, grad.tensor, self.cfg):
            self.checks.alerts.append(Alert(step=grad.step, micro=grad.micro,
                                            verifier=grad.dst, suspect=s))
            if self.cfg.recovery == "repair":  # the replica's gradient instead
                return replace(grad, tensor=jump.tensor)
            if self.cfg.recovery != "none":  # skip, or restart: the iteration is discarded
                self.drop_step = grad.step  # anyway, and nothing poisoned should reach further
                return self._drop(zeros)
        return grad

    def _drop(self, zeros: Frame) -> Frame:
        """A dropped gradient: zeros here, and what this stage sends upstream is marked."""
        key = (zeros.step, zeros.micro)
        self.checks.bypassed.add(key)
        self.checks.marked.add(key)
        return zeros
