"""Duplicated block with jumping connection (paper 1), forward check.

Stage v = i + 1 keeps a *shadow* copy of stage i, registered as its ``shadow`` submodule so the
stage's own AdamW steps it in lockstep with the original (same initial weights, same upstream
gradient, same clipping coefficient). Stage i - 1 sends its output both to stage i and, over the
jumping connection, to stage v (:class:`JumpSender`). Before stage v runs a micro-batch, a
forward pre-hook recomputes stage i's output from that true input and compares it with what
stage i claims (:func:`agrees`); a forged input/output pair cannot pass, since the input comes
from stage i - 1. The hook ties the shadow's output to the claimed activation with
:class:`_Tie`, so the gradient stage v sends upstream also trains the shadow, in the same
backward pass, and the stage's own output is bitwise unchanged.

Everything is a wrapper: channels (sender, receiver) and a hook on the stage module; the engine
knows nothing of it.
"""

from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, replace

import torch
from torch import nn

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.models.stages import StageModule
from phalanx.wire import Frame, Kind


def agrees(recomputed: torch.Tensor, claimed: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether a claimed activation matches its recomputation: ``rtol = atol = 0`` is the
    bitwise check; otherwise ``max|a - b| <= atol + rtol * max|b|``. NaN/Inf never agrees."""
    if claimed.shape != recomputed.shape or not bool(torch.isfinite(claimed).all()):
        return False
    if rtol == 0 and atol == 0:
        return torch.equal(recomputed, claimed)
    diff = float((recomputed - claimed).abs().max()) if claimed.numel() else 0.0
    return diff <= atol + rtol * float(recomputed.abs().max())


class JumpSender(ChannelWrapper):
    """Stage i - 1's link to stage i: every activation also goes to stage i + 1."""

    def __init__(self, inner: Channel, jump: Channel) -> None:
        super().__init__(inner)
        self.jump = jump

    def send(self, frame: Frame) -> None:
        self.inner.send(frame)
        if frame.kind is Kind.ACTIVATION:
            self.jump.send(replace(frame, kind=Kind.JUMP))


class JumpInbox(ChannelWrapper):
    """Stage v's link from stage v - 2: jumped activations go to a queue of their own, so the
    worker never sees them."""

    def __init__(self, inner: Channel) -> None:
        super().__init__(inner)
        self.jumped: deque[Frame] = deque()

    def recv(self, timeout: float | None = None) -> Frame:
        while True:
            frame = self.inner.recv(timeout)
            if frame.kind is not Kind.JUMP:
                return frame
            self.jumped.append(frame)

    def poll(self) -> Frame | None:
        while (frame := self.inner.poll()) is not None:
            if frame.kind is not Kind.JUMP:
                return frame
            self.jumped.append(frame)
        return None

    def take(self, timeout: float | None) -> Frame:
        """The next jumped activation (they arrive in forward order)."""
        while not self.jumped:
            frame = self.inner.recv(timeout)
            if frame.kind is Kind.JUMP:
                self.jumped.append(frame)
            else:  # pragma: no cover - the worker reads other kinds before forwarding
                raise RuntimeError(f"unexpected {frame.kind.name} frame while waiting for a jump")
        return self.jumped.popleft()


class _Tie(torch.autograd.Function):
    """Identity on ``x`` whose gradient also flows into ``shadow_out``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, shadow_out: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        return grad, grad


@dataclass
class Alert:
    """A mismatch seen by a verifier: ``suspect`` sent something its recomputation contradicts."""

    step: int
    micro: int
    verifier: int
    suspect: int


class Verifier:
    """The forward pre-hook of stage v that checks stage v - 1 against its shadow."""

    def __init__(self, stage: StageModule, inbox: JumpInbox, rtol: float, atol: float,
                 timeout: float | None) -> None:
        self.stage, self.inbox = stage, inbox
        self.rtol, self.atol, self.timeout = rtol, atol, timeout
        self.alerts: list[Alert] = []
        self.checked = 0
        stage.register_forward_pre_hook(self.__call__)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        (claimed,) = args
        jumped = self.inbox.take(self.timeout)
        true_in = jumped.tensor
        with torch.set_grad_enabled(module.training):
            shadow_out = module.shadow(true_in)
        self.checked += 1
        if not agrees(shadow_out.detach(), claimed.detach(), self.rtol, self.atol):
            self.alerts.append(Alert(step=jumped.step, micro=jumped.micro,
                                     verifier=self.stage.index, suspect=self.stage.index - 1))
        if module.training and claimed.requires_grad:
            return (_Tie.apply(claimed, shadow_out),)
        return (claimed,)


def shadow_of(stage: StageModule) -> StageModule:
    """An independent copy of ``stage`` (weights, buffers), to be a verifier's shadow; a shadow
    the stage holds itself is not copied."""
    own = stage._modules.pop("shadow", None)
    try:
        return copy.deepcopy(stage)
    finally:
        if own is not None:
            stage.add_module("shadow", own)


@dataclass(kw_only=True)
class DefenseConfig:
    """Verification of the middle stages."""

    verify: str = "none"  # none | duplicate (duplicated block + jumping connection)
    rtol: float = 1e-4  # tolerance of the comparison; rtol = atol = 0 compares bitwise
    atol: float = 1e-6

    def validate(self, num_stages: int) -> None:
        from phalanx.errors import ConfigError

        if self.verify not in ("none", "duplicate"):
            raise ConfigError(f"defense.verify={self.verify!r} is unknown; use none or duplicate")
        if self.rtol < 0 or self.atol < 0:
            raise ConfigError("defense.rtol and defense.atol must be >= 0")
        if self.verify == "duplicate" and num_stages < 3:
            raise ConfigError(
                f"defense.verify=duplicate needs at least 3 stages (pipeline.stages={num_stages}): "
                "a middle stage to check, a next stage to check it, and a stage before it"
            )


def checked(num_stages: int) -> range:
    """The stages a duplicated block verifies: the middle ones (the ends are trusted)."""
    return range(1, num_stages - 1)


def add_shadow(verifier: StageModule, original: StageModule) -> None:
    """Give stage ``original.index + 1`` its shadow of ``original`` (before its optimizer is
    built, so the optimizer steps the shadow too)."""
    verifier.add_module("shadow", shadow_of(original))


class Duplicate:
    """Channel wiring of the duplicated block for every stage of a run."""

    def __init__(self, cfg: DefenseConfig, num_stages: int, timeout: float | None) -> None:
        self.cfg, self.n, self.timeout = cfg, num_stages, timeout
        self.verifiers: dict[int, Verifier] = {}

    def wrap(self, stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        """Jumping connection out of stage s (to s + 2) and the check at stage s (of s - 1)."""
        s, out = stage.index, dict(channels)
        if s + 1 in checked(self.n):
            out[s + 1] = JumpSender(channels[s + 1], channels[s + 2])
        if s - 1 in checked(self.n):
            inbox = JumpInbox(channels[s - 2])
            out[s - 2] = inbox
            self.verifiers[s] = Verifier(stage, inbox, self.cfg.rtol, self.cfg.atol, self.timeout)
        return out

    def drain(self) -> list[Alert]:
        """Alerts raised in this process since the last call."""
        alerts = [a for v in self.verifiers.values() for a in v.alerts]
        for v in self.verifiers.values():
            v.alerts.clear()
        return alerts
