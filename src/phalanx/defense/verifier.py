"""The forward half of the duplicated block (paper 1), at stage v = s + 1.

Stage v keeps a *shadow* copy of stage s (:mod:`phalanx.defense.replica`), stepped in lockstep
with it. The stage that s computes on jumps its output to v too
(:class:`~phalanx.defense.links.Outbound`). Before stage v runs a micro-batch, :class:`Verifier`
(a forward pre-hook) recomputes stage s's output from that true input and compares it with what
stage s claims; a forged input/output pair cannot pass, since the input comes from elsewhere.
Evaluation passes are checked the same way.

The routes of the attempt come from the coordinator's plan (:mod:`phalanx.defense.plan`), never
from a frame:

- s in the plan as it stands: check; the shadow's output is tied to the claim (:func:`tie`) so
  the gradient stage v sends upstream also trains the shadow, and the shadow's gradient with
  respect to the true input goes to the stage s computes on, as evidence (``JUMP_GRAD``);
- s bypassed: the true input replaces the claim (:func:`route`), and its gradient goes to the
  stage before s (which uses it in place of what s sends);
- s repaired: the shadow's output replaces the claim (:func:`repair`), is sent on to stage
  v + 1 (which checks v on it), and the shadow's input gradient replaces what s sends upstream.

While v itself is bypassed nothing flows back through its own output, so its shadow learns
from the gradient stage v + 1 sends it (:meth:`Verifier.learn`): the shadow stays in lockstep,
and its evidence for the backward check of s stays true.

:class:`Guard` checks the activations s sends before the engine sees them: one not shaped like
its true input is an alert against s, and stage v goes on with the replica's output instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.defense.compare import Checks
from phalanx.defense.config import DefenseConfig
from phalanx.defense.graph import repair, route, tie
from phalanx.defense.links import Inbox, Key
from phalanx.defense.plan import Plan
from phalanx.defense.second import SecondReplica
from phalanx.models.stages import StageModule
from phalanx.wire import Frame, Kind

log = logging.getLogger(__name__)


def well_formed(t: torch.Tensor, hidden: int, dtype: torch.dtype) -> bool:
    """A hidden state: (batch, seq, hidden) of the run's dtype, finite."""
    return (t.dim() == 3 and t.shape[-1] == hidden and t.dtype == dtype
            and bool(torch.isfinite(t).all()))


class Verifier:
    """The forward pre-hook of stage v that checks stage s = v - 1 against its shadow."""

    def __init__(self, stage: StageModule, jumps: dict[int, Inbox], repairs: Inbox,
                 back: dict[int, Channel], ahead: Channel | None, cfg: DefenseConfig,
                 checks: Checks, plan: Callable[[], Plan], tag: Callable[[], int],
                 hidden: int, timeout: float | None) -> None:
        self.stage, self.v, self.s = stage, stage.index, stage.index - 1
        self.jumps, self.repairs, self.back, self.ahead = jumps, repairs, back, ahead
        self.cfg, self.checks, self.plan, self.tag = cfg, checks, plan, tag
        self.hidden, self.timeout = hidden, timeout
        self.dtype = next(stage.parameters()).dtype
        self.position: Callable[[], Key] = lambda: (0, 0)  # the worker's, once attached
        self.window: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (step, micro-batches)
        # (batch, seq) of a micro-batch: the labels' at the last stage, stage 0's announcement
        # at the others that have one (:mod:`phalanx.defense.shapes`); and whether it is here
        self.rows: Callable[[int], tuple[int, ...] | None] = lambda m: None
        self.ready: Callable[[int], bool] = lambda m: True
        self._pending: dict[Key, torch.Tensor] = {}  # shadow outputs waiting for a gradient
        self.replaced: set[Key] = set()  # malformed claims the guard replaced
        self.second: SecondReplica | None = None  # the second replica of s - 1, if held
        self.forwards: Callable[[Plan], bool] = lambda plan: False  # pass s's input on to v + 1
        stage.register_forward_pre_hook(self.before)

    def source(self, plan: Plan) -> tuple[int, Inbox]:
        """Who supplies stage s's true input, and where it arrives: the stage s computes on,
        over the jumping connection; stage s itself where it repaired its predecessor (it
        vouches for the replica's output it went on with)."""
        if self.s - 1 in plan.repaired:
            return self.s, self.repairs
        p = plan.pred(self.s)
        return p, self.jumps[p]

    def true_input(self, key: Key, keep: bool = False) -> torch.Tensor | None:
        """Stage s's true input for ``key``; ``None`` (and an alert against its sender) when it
        is not a well-formed hidden state."""
        sender, inbox = self.source(self.plan())
        x = inbox.take(key, self.timeout, keep=keep).tensor
        rows = self.rows(key[1])
        if well_formed(x, self.hidden, self.dtype) and rows in (None, tuple(x.shape[:2])):
            return x
        if not keep:
            self.checks.alert(key, self.v, sender)
        return None

    def before(self, module: nn.Module, args: tuple) -> tuple:
        (claimed,) = args
        key, plan = self.position(), self.plan()
        x = self.true_input(key)
        train = module.training
        if self.forwards(plan) and self.ahead is not None:  # for the second replica of s
            self.ahead.send(Frame(kind=Kind.JUMP, step=key[0], micro=key[1], src=self.v,
                                  dst=self.v + 1, flags=self.tag(),
                                  tensor=(x if x is not None else claimed).detach()))
        to = plan.pred(self.s)  # where gradients with respect to the true input go
        if self.s in plan.bypassed:
            x = torch.zeros_like(claimed) if x is None or x.shape != claimed.shape else x
            if not train:
                return (x,)
            t = x.detach().requires_grad_()
            # to the stage before s, which uses it; to s, whose shadow learns from it
            self._on(t, to, key)
            if self.s - 1 > 0:
                self._on(t, self.s, key)
            return (route(claimed, self._vouched(key, t, plan, train)),)
        if self.s in plan.repaired:
            x = torch.zeros_like(claimed) if x is None or x.shape != claimed.shape else x
            t = x.detach().requires_grad_(train)
            with torch.set_grad_enabled(train):
                y = module.shadow(self._vouched(key, t, plan, train))
            self._on(t, to, key)
            if self.ahead is not None:
                self.ahead.send(Frame(kind=Kind.JUMP, step=key[0], micro=key[1], src=self.v,
                                      dst=self.v + 1, tensor=y.detach(), flags=self.tag()))
            return (repair(claimed, y) if train else y,)
        if x is None or x.shape != claimed.shape:
            if x is not None:  # a claim the size of no true input: the suspect's
                self.checks.alert(key, self.v, self.s)
            self.checks.blind = True  # the replica learns nothing: it vouches for no norm
            if train:
                self._send_back(to, key, torch.empty(0))
            return args
        t = x.detach().requires_grad_(train)
        with torch.set_grad_enabled(train):
            shadow_out = module.shadow(self._vouched(key, t, plan, train))
        if key in self.replaced:  # go on with what s should have sent (the guard alerted)
            self.replaced.discard(key)
            self._on(t, to, key)
            return (repair(claimed, shadow_out) if train else shadow_out.detach(),)
        if not self.checks.compare(shadow_out.detach(), claimed.detach(), "forward", self.s):
            self.checks.alert(key, self.v, self.s)
        if not train:
            return args
        self._on(t, to, key)
        if self.v in plan.bypassed:  # nothing comes back through this stage's output
            if len(self._pending) > 4096:
                self._pending.clear()
            self._pending[key] = shadow_out
            return args
        return (tie(claimed, shadow_out),)

    def _vouched(self, key: Key, t: torch.Tensor, plan: Plan, train: bool) -> torch.Tensor:
        """Stage s's true input ``t``, checked by the second replica of s - 1 where this stage
        holds one (and tied to it, so that it learns)."""
        return t if self.second is None else self.second.vouch(key, t, plan, train)

    def learn(self, key: Key, grad: torch.Tensor) -> None:
        """While this stage is bypassed: the gradient stage v + 1 sent for the output of stage
        s, the shadow's output (what a tie would have brought back)."""
        out = self._pending.pop(key, None)
        if out is not None and grad.shape == out.shape and grad.dtype == out.dtype:
            torch.autograd.backward(out, grad)

    def _on(self, t: torch.Tensor, to: int, key: Key) -> None:
        """Send the gradient that reaches ``t`` to stage ``to``, when training."""
        if t.requires_grad:
            t.register_hook(lambda g: self._send_back(to, key, g))

    def _send_back(self, to: int, key: Key, tensor: torch.Tensor) -> None:
        self.back[to].send(Frame(kind=Kind.JUMP_GRAD, step=key[0], micro=key[1], src=self.v,
                                 dst=to, tensor=tensor.detach(), flags=self.tag()))


class Guard(ChannelWrapper):
    """Stage v's link from stage s: an activation that is not shaped like its true input (or
    not of the run's dtype, or not finite) is replaced by zeros of the true input's shape and
    raises an alert against s, unless the plan leaves s out (its messages are not used)."""

    def __init__(self, inner: Channel, verifier: Verifier) -> None:
        super().__init__(inner)
        self.verifier = verifier
        self._waiting: Frame | None = None

    def _checked(self, frame: Frame, true: torch.Tensor | None) -> Frame:
        """``frame``, or zeros in its place (a claim that is not a finite hidden state, or not
        of its true input's size where that settles it): shaped like the true input where
        that comes from the trusted stage 0 or where s is out of the path, or like the labels
        at the last stage (elsewhere a true input of another size may be the lie, and the
        verifier sorts it out)."""
        vf = self.verifier
        t = frame.tensor
        rows = vf.rows(frame.micro)  # the labels', or stage 0's announcement
        alone = well_formed(t, vf.hidden, vf.dtype) and rows in (None, tuple(t.shape[:2]))
        # the true input's shape decides where it comes from the trusted stage 0, or where the
        # plan leaves s out (what s sends is not used; its shape must not be either)
        trusted = true is not None and (vf.source(vf.plan())[0] == 0
                                        or frame.src in vf.plan().out)
        if alone and not (trusted and t.shape != true.shape):
            return frame
        if frame.src not in vf.plan().out:
            vf.checks.alert((frame.step, frame.micro), vf.v, vf.s)
            if true is not None:
                vf.replaced.add((frame.step, frame.micro))
        log.warning("stage %d replaced a malformed activation of %s %s from stage %d",
                    vf.v, tuple(t.shape), t.dtype, frame.src)
        shape = true.shape if true is not None else (*(rows or (0, 0)), vf.hidden)
        return Frame(kind=Kind.ACTIVATION, step=frame.step, micro=frame.micro, src=frame.src,
                     dst=frame.dst, tensor=torch.zeros(shape, dtype=vf.dtype), seq=frame.seq,
                     flags=frame.flags)

    def _due(self, frame: Frame) -> bool:
        """Whether ``frame`` is an activation of this iteration's schedule (any other is the
        worker's to refuse; waiting for its true input would block the link)."""
        step, micro = self.verifier.window()
        return frame.kind is Kind.ACTIVATION and frame.step == step and 0 <= frame.micro < micro

    def recv(self, timeout: float | None = None) -> Frame:
        frame = self.inner.recv(timeout)
        if not self._due(frame):
            return frame
        return self._checked(frame, self.verifier.true_input((frame.step, frame.micro),
                                                             keep=True))

    def poll(self) -> Frame | None:
        frame = self._waiting or self.inner.poll()
        self._waiting = None
        if frame is None or not self._due(frame):
            return frame
        vf = self.verifier
        _, inbox = vf.source(vf.plan())
        if (inbox.ready((frame.step, frame.micro), keep=True) is None
                or not vf.ready(frame.micro)):
            self._waiting = frame  # the simulator: wait for the true input and the shape
            return None
        return self._checked(frame, vf.true_input((frame.step, frame.micro), keep=True))
