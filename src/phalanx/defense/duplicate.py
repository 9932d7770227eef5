"""Duplicated block with jumping connection (paper 1): the forward check and skip routing.

Stage v = s + 1 keeps a *shadow* copy of stage s, registered as its ``shadow`` submodule so the
stage's own AdamW steps it in lockstep with the original (same initial weights, same upstream
gradient, same clipping coefficient, same frozen iterations). Stage s - 1 sends its output both
to stage s and, over the jumping connection, to stage v (:class:`~phalanx.defense.links.Outbound`).
Before stage v runs a micro-batch, :class:`Verifier` (a forward pre-hook) recomputes stage s's
output from that true input and compares it with what stage s claims (:func:`agrees`); a forged
input/output pair cannot pass, since the input comes from stage s - 1.

- Clean: the shadow's output is tied to the claimed activation (:func:`tie`) so the gradient
  stage v sends upstream also trains the shadow in the same backward pass, and the shadow's
  gradient with respect to the true input goes to stage s - 1 (``JUMP_GRAD``), which checks the
  gradient stage s sends (:mod:`phalanx.defense.gradcheck`).
- Alert, with skip-layer recovery: for the rest of the iteration stages s and v are bypassed.
  Stage v forwards the true input unchanged (it is a suspect too), or, when it is the trusted
  last stage, runs its own layers on it; its output is marked ``FLAG_SKIP``. In the backward
  pass the gradient of the true input goes straight to stage s - 1 (``JUMP_GRAD`` with
  ``FLAG_SKIP``), which uses it instead of what stage s sends (:func:`route`).

Everything is a wrapper: channels and hooks on the stage module; the engine knows nothing of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from phalanx.comm.channel import Channel
from phalanx.defense.config import DefenseConfig
from phalanx.defense.links import FlagTap, Inbox, Key
from phalanx.models.stages import StageModule
from phalanx.wire import FLAG_REPAIRED, FLAG_SKIP, Frame, Kind


def agrees(recomputed: torch.Tensor, claimed: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether a claimed activation matches its recomputation: ``rtol = atol = 0`` is the
    bitwise check; otherwise ``max|a - b| <= atol + rtol * max|b|``. NaN/Inf never agrees."""
    if claimed.shape != recomputed.shape or not bool(torch.isfinite(claimed).all()):
        return False
    if rtol == 0 and atol == 0:
        return torch.equal(recomputed, claimed)
    diff = float((recomputed - claimed).abs().max()) if claimed.numel() else 0.0
    return diff <= atol + rtol * float(recomputed.abs().max())


class _Join(torch.autograd.Function):
    """Joins the claimed input with the replica's side of the graph.

    The output has the values of ``other`` when ``use_other`` (else of ``claimed``); the
    gradient flows to ``other`` always and to ``claimed`` when ``to_claimed`` (else zeros).
    Tie (claimed, g to both): the replica learns in the same backward pass. Route (true input,
    zeros to the claim): a bypass. Repair (replica's output, g to both): the sender still steps
    in lockstep with its replica."""

    @staticmethod
    def forward(ctx, claimed: torch.Tensor, other: torch.Tensor, use_other: bool,  # noqa: ANN001
                to_claimed: bool) -> torch.Tensor:
        ctx.to_claimed = to_claimed
        return (other if use_other else claimed).clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:  # noqa: ANN001
        return (grad if ctx.to_claimed else torch.zeros_like(grad)), grad, None, None


def tie(claimed: torch.Tensor, shadow_out: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, shadow_out, False, True)


def route(claimed: torch.Tensor, true_in: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, true_in, True, False)


def repair(claimed: torch.Tensor, shadow_out: torch.Tensor) -> torch.Tensor:
    return _Join.apply(claimed, shadow_out, True, True)


@dataclass
class Alert:
    """A mismatch seen by a verifier: ``suspect`` sent something its recomputation contradicts."""

    step: int
    micro: int
    verifier: int
    suspect: int


@dataclass
class Checks:
    """One stage's verification state: the alerts and number of checks of the current
    iteration, the micro-batches whose outgoing messages come from a bypass (``marked``), and
    those whose incoming gradient came from one (``bypassed``: nothing to vouch for upstream)."""

    alerts: list[Alert] = field(default_factory=list)
    checked: int = 0
    marked: set[Key] = field(default_factory=set)
    bypassed: set[Key] = field(default_factory=set)
    repaired: set[Key] = field(default_factory=set)  # inputs replaced by the replica's output
    max_deviation: float = 0.0  # largest relative difference among agreeing comparisons

    def compare(self, recomputed: torch.Tensor, claimed: torch.Tensor, cfg: DefenseConfig
                ) -> bool:
        """Count one check; whether ``claimed`` agrees with its recomputation."""
        self.checked += 1
        ok = agrees(recomputed, claimed, cfg.rtol, cfg.atol)
        if ok and claimed.numel():
            scale = float(recomputed.abs().max()) or 1.0
            dev = float((recomputed - claimed).abs().max()) / scale
            self.max_deviation = max(self.max_deviation, dev)
        return ok

    def counts(self, n: int) -> torch.Tensor:
        """Alerts by suspect, as an (n,) vector; clears them."""
        c = torch.zeros(n, dtype=torch.float64)
        for a in self.alerts:
            c[a.suspect] += 1
        self.alerts.clear()
        return c


class Verifier:
    """The forward pre-hook of stage v that checks stage s = v - 1 against its shadow."""

    def __init__(self, stage: StageModule, jumps: dict[int, Inbox], tap: FlagTap, back: Channel,
                 cfg: DefenseConfig, checks: Checks, standing: set[int],
                 timeout: float | None, repairs: Inbox | None = None,
                 ahead: Channel | None = None) -> None:
        self.stage, self.v, self.s = stage, stage.index, stage.index - 1
        self.jumps, self.tap, self.back = jumps, tap, back
        self.repairs, self.ahead = repairs, ahead  # repaired inputs: from s, to v + 1
        self.cfg, self.checks, self.standing, self.timeout = cfg, checks, standing, timeout
        self.skip_step = -1  # the iteration in which stages s and v are being bypassed
        self._identity = False
        self.bypass_self = not stage.is_last  # a suspect verifier skips itself too
        stage.register_forward_pre_hook(self.before)
        stage.register_forward_hook(self.after)

    def _true_input(self) -> Frame:
        """The jumped output of the stage before s; when that stage is quarantined, s took its
        input from the one before it, which then jumps here too."""
        jumped = self.jumps[self.s - 1].take(None, self.timeout)
        if self.s - 1 in self.standing and self.s - 2 in self.jumps:
            jumped = self.jumps[self.s - 2].take(None, self.timeout)
        return jumped

    def before(self, module: nn.Module, args: tuple) -> tuple:
        (claimed,) = args
        self._identity = False
        jumped = self._true_input()
        key = (jumped.step, jumped.micro)
        true_in = jumped.tensor
        valid = true_in.shape == claimed.shape and true_in.dtype == claimed.dtype
        if self.s in self.standing:  # quarantined: its output is never used
            if not module.training:
                return (true_in,) if valid else args
            return self._route(claimed, true_in, key, identity=False, mark=False)
        if not module.training:
            return args
        if self.skip_step == key[0]:
            return self._route(claimed, true_in, key, identity=self.bypass_self)
        flags = self.tap.flags.get(key, 0)
        if flags & FLAG_SKIP:  # stage s already bypassed its predecessor
            self._send_back(key, torch.empty(0), 0)  # nothing for stage s - 1 to compare
            return args
        if flags & FLAG_REPAIRED and self.repairs is not None:  # s computed on a repaired input
            true_in = self.repairs.take(key, self.timeout).tensor
            valid = true_in.shape == claimed.shape and true_in.dtype == claimed.dtype
        t = true_in.detach().requires_grad_() if valid else None
        shadow_out = module.shadow(t) if valid else None
        if not valid or not self.checks.compare(shadow_out.detach(), claimed.detach(), self.cfg):
            self.checks.alerts.append(Alert(step=key[0], micro=key[1], verifier=self.v,
                                            suspect=self.s))
            if valid and self.cfg.recovery == "skip":
                self.skip_step = key[0]
                return self._route(claimed, true_in, key, identity=self.bypass_self)
            if valid and self.cfg.recovery == "repair":
                return self._repair(claimed, t, shadow_out, key)
            if not valid:
                self._send_back(key, torch.empty(0), 0)
                return args
        t.register_hook(lambda g, key=key: self._evidence(key, g))
        return (tie(claimed, shadow_out),)

    def _repair(self, claimed: torch.Tensor, t: torch.Tensor, shadow_out: torch.Tensor,
                key: Key) -> tuple:
        """Go on with the replica's output instead of the claim; tell stage v + 1, which checks
        this stage, what its input was."""
        t.register_hook(lambda g: self._evidence(key, g))
        self.checks.repaired.add(key)
        if self.ahead is not None:
            self.ahead.send(Frame(kind=Kind.JUMP, step=key[0], micro=key[1], src=self.v,
                                  dst=self.v + 1, tensor=shadow_out.detach(),
                                  flags=FLAG_REPAIRED))
        return (repair(claimed, shadow_out),)

    def _evidence(self, key: Key, grad: torch.Tensor) -> None:
        """The replica's gradient for stage s - 1 to compare with, unless this stage's own
        gradient came from a bypass (then the replica saw zeros and vouches for nothing)."""
        self._send_back(key, torch.empty(0) if key in self.checks.bypassed else grad, 0)

    def after(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        """Stage v as the identity while it is bypassed (forward the true input)."""
        return args[0] if self._identity else output

    def _route(self, claimed: torch.Tensor, true_in: torch.Tensor, key: Key, identity: bool,
               mark: bool = True) -> tuple:
        """Use the true input instead of the claimed one; ``mark`` flags what this stage sends
        as coming from a bypass (not for a quarantine: the stage after checks this one)."""
        t = true_in.detach().requires_grad_()
        t.register_hook(lambda g: self._send_back(key, g, FLAG_SKIP))
        if mark:
            self.checks.marked.add(key)
        self._identity = identity
        return (route(claimed, t),)

    def _send_back(self, key: Key, tensor: torch.Tensor, flags: int) -> None:
        """To stage s - 1: the replica's gradient (to compare), or the bypass gradient (to use)."""
        self.back.send(Frame(kind=Kind.JUMP_GRAD, step=key[0], micro=key[1], src=self.v,
                             dst=self.s - 1, tensor=tensor.detach(), flags=flags))

def shadow_of(stage: StageModule) -> StageModule:
    """An independent copy of ``stage`` (weights, buffers), to be a verifier's shadow; a shadow
    the stage holds itself is not copied."""
    own = stage._modules.pop("shadow", None)
    try:
        return copy.deepcopy(stage)
    finally:
        if own is not None:
            stage.add_module("shadow", own)


def checked(num_stages: int) -> range:
    """The stages a duplicated block verifies: the middle ones (the ends are trusted)."""
    return range(1, num_stages - 1)


def add_shadow(verifier: StageModule, original: StageModule) -> None:
    """Give stage ``original.index + 1`` its shadow of ``original`` (before its optimizer is
    built, so the optimizer steps the shadow too)."""
    verifier.add_module("shadow", shadow_of(original))


