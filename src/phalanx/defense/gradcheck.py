"""The backward half of the duplicated block, at stage b, on its link from stage c = b + 1.

Stage c + 1 holds the replica of c and sends, for every training micro-batch, the replica's
gradient with respect to c's true input (``JUMP_GRAD``). :class:`GradCheck` wraps stage b's link
from c so that before the worker sees a gradient from c it is compared with that recomputation
(an alert against c on a mismatch). What the plan of the attempt says, and only that, changes
where b's gradient comes from:

- c bypassed: from stage c + 1, which computed on b's output (checked in turn against the
  replica of c + 1 at stage c + 2);
- c repaired: the replica's gradient, from stage c + 1;
- otherwise: from c, checked.

A gradient is also checked against the activation b sent for the same micro-batch: one of
another shape or dtype is an alert against its sender, and so is evidence that is not a finite
tensor of that shape (an alert against the replica holder). A gradient that fails its check is
replaced by the replica's (``mend``; a malformed replacement for a repaired c by c's own; zeros
where there is no valid one), so that the stages before b, whose checks compare with replicas
that saw the honest gradient, do not raise alerts of their own against honest stages: the
attempt is discarded anyway. Without recovery
(``mend=False``) the poison goes on, as the attack made it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.defense.compare import Checks
from phalanx.defense.config import DefenseConfig
from phalanx.defense.links import Inbox, Key
from phalanx.defense.plan import Plan
from phalanx.pipeline.stash import TAGS
from phalanx.wire import Frame, Kind

log = logging.getLogger(__name__)

SENT = 4096  # activations whose shape is remembered (a few iterations' worth)


class GradCheck(ChannelWrapper):
    """Stage b's link to the checked stage c = b + 1; ``side[k]`` is the inbox of
    ``JUMP_GRAD`` frames from stage k (c + 1, and c + 2 when c + 1 is checked)."""

    def __init__(self, inner: Channel, side: dict[int, Inbox], cfg: DefenseConfig,
                 checks: Checks, plan: Callable[[], Plan], num_stages: int,
                 timeout: float | None, tag: Callable[[], int] = lambda: 0, mend: bool = True,
                 feed: Callable[[Key, torch.Tensor], None] | None = None) -> None:
        super().__init__(inner)
        self.mend, self.feed = mend, feed  # feed: b's shadow, while b is bypassed
        self.b, self.c, self.n = inner.me, inner.me + 1, num_stages
        self.side, self.cfg, self.checks, self.plan = side, cfg, checks, plan
        self.timeout, self.tag = timeout, tag
        self.sent: dict[Key, tuple[torch.Size, torch.dtype]] = {}
        self.checked: set[tuple[int, int, int]] = set()  # (step, micro, attempt) let through
        self._waiting: Frame | None = None

    def send(self, frame: Frame) -> None:
        if frame.kind is Kind.ACTIVATION:
            if len(self.sent) >= SENT:
                self.sent = {k: v for k, v in self.sent.items() if k[0] >= frame.step}
            self.sent[(frame.step, frame.micro)] = (frame.tensor.shape, frame.tensor.dtype)
        self.inner.send(frame)

    def sources(self, plan: Plan) -> list[int]:
        """The stages whose ``JUMP_GRAD`` this link's gradient of a micro-batch needs."""
        c = self.c
        if self.b in plan.bypassed:  # no evidence comes here; c's gradient for b's shadow does
            return [c] if self.feed is not None else []
        if c == self.n - 1:
            return []
        return [c + 1, c + 2] if c in plan.bypassed and c + 1 < self.n - 1 else [c + 1]

    def _ours(self, frame: Frame) -> bool:
        """Whether ``frame`` is a gradient for an activation b sent (any other is the
        worker's to refuse)."""
        return frame.kind is Kind.GRADIENT and (frame.step, frame.micro) in self.sent

    def _stray(self, frame: Frame) -> bool:
        """A gradient of another attempt than this one (honest c answers this attempt's
        activation only), or a second one for a micro-batch already let through: dropped,
        never used unchecked (two signed ones of different contents prove equivocation)."""
        mark = (frame.step, frame.micro, frame.flags % TAGS)
        if mark[2] != self.tag() or mark in self.checked:
            log.warning("stage %d dropped a second or stray gradient of step %d, micro-batch "
                        "%d, attempt %d from stage %d", self.b, *mark, frame.src)
            return True
        if len(self.checked) >= SENT:
            self.checked = {m for m in self.checked if m[0] >= frame.step}
        self.checked.add(mark)
        return False

    def recv(self, timeout: float | None = None) -> Frame:
        deadline = None if timeout is None else time.monotonic() + timeout
        frame, self._waiting = self._waiting, None  # (poll let a waiting one through already)
        while frame is None:
            frame = self.inner.recv(
                None if deadline is None else max(0.0, deadline - time.monotonic()))
            if not self._ours(frame):
                return frame  # (a gradient for nothing b sent: the worker refuses it)
            if self._stray(frame):
                frame = None
        key, plan = (frame.step, frame.micro), self.plan()
        side = {k: self.side[k].take(key, timeout) for k in self.sources(plan)}
        return self._check(frame, side, plan)

    def poll(self) -> Frame | None:
        while self._waiting is None:
            frame = self.inner.poll()
            if frame is None or not self._ours(frame):
                return frame
            if not self._stray(frame):
                self._waiting = frame
        key, plan = (self._waiting.step, self._waiting.micro), self.plan()
        srcs = self.sources(plan)
        if any(self.side[k].ready(key, keep=True) is None for k in srcs):
            return None
        side = {k: self.side[k].ready(key) for k in srcs}
        frame, self._waiting = self._waiting, None
        return self._check(frame, side, plan)

    def _fits(self, t: torch.Tensor, key: Key) -> bool:
        shape, dtype = self.sent.get(key, (None, None))
        return t.shape == shape and t.dtype == dtype and bool(torch.isfinite(t).all())

    def _check(self, grad: Frame, side: dict[int, Frame], plan: Plan) -> Frame:
        key, c = (grad.step, grad.micro), self.c
        if self.b in plan.bypassed:
            if c in side:
                self.feed(key, side[c].tensor)
            return grad
        if not side:
            return grad
        shape, dtype = self.sent.get(key, (grad.tensor.shape, grad.tensor.dtype))
        zeros = torch.zeros(shape, dtype=dtype)
        if c in plan.out:  # bypassed: c + 1's input gradient; repaired: the replica's
            used = side[c + 1].tensor
            if not self._fits(used, key):
                self._alert(key, c + 1, plan)
                # repaired, c still sends its own: what the replicas before b saw, if honest
                own = c in plan.repaired and self._fits(grad.tensor, key)
                return replace(grad, tensor=grad.tensor if own else zeros)
            if c + 2 in side and c + 2 not in plan.out:  # c + 1 computed on b's output
                if not self._compare(side[c + 2].tensor, used, key, c + 1, plan) and self.mend:
                    ev = side[c + 2].tensor
                    return replace(grad, tensor=ev if self._fits(ev, key) else zeros)
            return replace(grad, tensor=used)
        evidence = side[c + 1].tensor
        mended = evidence if self._fits(evidence, key) else zeros
        if grad.tensor.shape != shape or grad.tensor.dtype != dtype:
            self._alert(key, c, plan)
            return replace(grad, tensor=mended)
        believed = c + 1 not in plan.out or c + 1 in plan.heard
        if believed and not self._compare(evidence, grad.tensor, key, c, plan):
            return replace(grad, tensor=mended) if self.mend else grad
        return grad

    def _compare(self, evidence: torch.Tensor, claimed: torch.Tensor, key: Key, suspect: int,
                 plan: Plan) -> bool:
        """Check ``claimed`` (from ``suspect``) against the replica's ``evidence`` (from
        ``suspect + 1``): evidence that is no gradient of the right shape is the replica
        holder's fault, a mismatch the suspect's. Whether the claim stands."""
        if not self._fits(evidence, key):
            self._alert(key, suspect + 1, plan)
            return True  # unchecked, not refuted
        if not self.checks.compare(evidence, claimed, "backward", suspect):
            self._alert(key, suspect, plan)
            return False
        return True

    def _alert(self, key: Key, suspect: int, plan: Plan) -> None:
        if 0 < suspect < self.n - 1 and suspect not in plan.out:  # nobody checks those
            self.checks.alert(key, self.b, suspect)
