"""Adaptive attackers: a malicious stage that uses every field of every message it sends.

:class:`AdaptiveChannel` wraps the raw links of a malicious stage, under everything else its
process runs (the defense's own wrappers included), so it sees and rewrites whatever the stage
sends: activations and their jumped copies, gradients, the replica's evidence and bypass
gradients, the norm frame (its squared norm, its refusals, its alerts, its replica's norm), its
statistics and every header field but the ones the transport authenticates. Each tactic is a
pure function of the frame (:data:`TACTICS`); ``attack.adaptive`` names one, and
``attack.rate`` / ``attack.stages`` / ``attack.seed`` / ``attack.strength`` say when, who and
how much, as for the naive attacks.

Tactics (what the attacker at stage s does in an attacked iteration):

- ``flag_forge``: sign-flips its activations, jumped copies and gradients and sets the high
  bit of their flags (flags once told the verifier "already bypassed, do not check"; now only
  their low bits tag the attempt, and nothing reads the rest).
- ``equivocate``: sends a sign-flipped activation to stage s + 1 and its honest output over the
  jumping connection (two different messages for one micro-batch; with signed links, the two
  receipts are the proof, :mod:`phalanx.defense.receipts`).
- ``false_evidence`` / ``empty_evidence`` / ``nan_evidence``: as the holder of stage s - 1's
  replica, sends flipped, empty or NaN ``JUMP_GRAD`` frames (evidence and bypass gradients).
- ``false_alert``: reports alerts against stages it has no role in checking (the trusted ends
  and itself); ``frame_predecessor``: against stage s - 1, which it does check (forward);
  ``frame_successor``: against stage s + 1, whose gradient it checks against s + 2's evidence
  (backward; where s + 1 is a middle stage).
- ``nan_norm`` / ``negative_norm`` / ``huge_norm``: a squared gradient norm of NaN, -1, 1e30.
- ``forged_report``: statistics claiming a loss of -333329.6 over NaN tokens, and NaN alert
  counts.
- ``eval_poison``: sign-flips its activations in evaluation passes only.
- ``drift``: adds ``strength`` x 1e-6 x RMS in a fixed direction to its activations and
  gradients (well below any float tolerance of the old max-entry test).
- ``float16`` / ``short``: activations to stage s + 1 as float16, or a position short
  (malformed but plausible frames; a float64 one would be over the byte limit of the run's
  activations, refused by the transport: a withheld message). The jumped copy stays honest,
  so where the verifier's true input comes from another middle stage, ``short`` is also an
  equivocation: attributable through signed receipts only.
- ``collude``: with two adjacent stages given, the first sign-flips its activations and the
  second (its only verifier) reports no alerts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.threats.plan import AttackPlan
from phalanx.wire import Frame, Kind

Ctx = tuple[int, int, bool, float]  # (this stage, number of stages, training, strength)
Tactic = Callable[[Frame, Ctx], Frame | None]


def _flip(frame: Frame) -> Frame:
    return replace(frame, tensor=-frame.tensor)


def _norm_part(frame: Frame, fn: Callable[[torch.Tensor], None]) -> Frame:
    """The norm frame with ``fn`` applied to a copy of its tensor."""
    t = frame.tensor.clone()
    fn(t)
    return replace(frame, tensor=t)


def flag_forge(f: Frame, ctx: Ctx) -> Frame:
    if not ctx[2]:
        return f
    if f.kind in (Kind.ACTIVATION, Kind.GRADIENT, Kind.JUMP):  # the high bit: once "skip"
        return replace(_flip(f), flags=f.flags | 0x80)
    return f  # (a wrong attempt tag, in the low bits, is a withheld message: refused, counted
    # against this stage, and the wait for the real one names it)


def equivocate(f: Frame, ctx: Ctx) -> Frame:
    return _flip(f) if f.kind is Kind.ACTIVATION and ctx[2] else f


def _evidence(change: Callable[[torch.Tensor], torch.Tensor]) -> Tactic:
    def tactic(f: Frame, ctx: Ctx) -> Frame:
        return replace(f, tensor=change(f.tensor)) if f.kind is Kind.JUMP_GRAD else f
    return tactic


def _alerts(targets: Callable[[int, int], list[int]]) -> Tactic:
    """Report two alerts against each of ``targets(me, n)``."""
    def tactic(f: Frame, ctx: Ctx) -> Frame:
        me, n = ctx[0], ctx[1]
        if f.kind is not Kind.NORM or f.tensor.numel() < 2 * n + 1:
            return f

        def accuse(t: torch.Tensor) -> None:
            for x in targets(me, n):
                t[1 + n + x] = 2.0
        return _norm_part(f, accuse)
    return tactic


def _norm(value: float) -> Tactic:
    def tactic(f: Frame, ctx: Ctx) -> Frame:
        if f.kind is not Kind.NORM:
            return f
        return _norm_part(f, lambda t: t.__setitem__(0, value))
    return tactic


def forged_report(f: Frame, ctx: Ctx) -> Frame:
    n = ctx[1]
    if f.kind is Kind.REPORT:
        return replace(f, tensor=torch.tensor([-333329.6, math.nan, 0.0, 0.0, math.nan],
                                              dtype=torch.float64))
    if f.kind is Kind.NORM and f.tensor.numel() >= 2 * n + 1:
        return _norm_part(f, lambda t: t[1 + n:1 + 2 * n].fill_(math.nan))
    return f


def eval_poison(f: Frame, ctx: Ctx) -> Frame:
    return _flip(f) if f.kind in (Kind.ACTIVATION, Kind.JUMP) and not ctx[2] else f


def drift(f: Frame, ctx: Ctx) -> Frame:
    if f.kind not in (Kind.ACTIVATION, Kind.JUMP, Kind.GRADIENT) or not ctx[2]:
        return f
    t = f.tensor
    rms = float(t.float().pow(2).mean().sqrt()) if t.numel() else 0.0
    g = torch.Generator().manual_seed(1234)  # one fixed direction, every time
    push = torch.randn(t.shape, generator=g).sign().to(t.dtype)
    return replace(f, tensor=t + ctx[3] * 1e-6 * rms * push)


def float16(f: Frame, ctx: Ctx) -> Frame:
    if f.kind is Kind.ACTIVATION and ctx[2]:
        return replace(f, tensor=f.tensor.half())  # (within the byte limit a float32 run sets)
    return f


def short(f: Frame, ctx: Ctx) -> Frame:
    if f.kind is Kind.ACTIVATION and ctx[2] and f.tensor.dim() == 3 and f.tensor.shape[1] > 1:
        return replace(f, tensor=f.tensor[:, :-1].clone())  # a position short
    return f


def _collude(f: Frame, ctx: Ctx, first: bool) -> Frame:
    if first:  # a consistent sign flip (to s + 1 and over the jump alike)
        return _flip(f) if f.kind in (Kind.ACTIVATION, Kind.JUMP) and ctx[2] else f
    n = ctx[1]  # its verifier: no alert
    if f.kind is Kind.NORM and f.tensor.numel() >= 2 * n + 1:
        return _norm_part(f, lambda t: t[1 + n:1 + 2 * n].zero_())
    return f


TACTICS: dict[str, Tactic] = {
    "flag_forge": flag_forge,
    "equivocate": equivocate,
    "false_evidence": _evidence(lambda t: -t),
    "empty_evidence": _evidence(lambda t: torch.empty(0, dtype=t.dtype)),
    "nan_evidence": _evidence(lambda t: torch.full_like(t, math.nan)),
    "false_alert": _alerts(lambda me, n: [0, n - 1, me]),
    "frame_predecessor": _alerts(lambda me, n: [me - 1]),
    "frame_successor": _alerts(lambda me, n: [me + 1] if me + 2 < n else []),
    "nan_norm": _norm(math.nan),
    "negative_norm": _norm(-1.0),
    "huge_norm": _norm(1e30),
    "forged_report": forged_report,
    "eval_poison": eval_poison,
    "drift": drift,
    "float16": float16,
    "short": short,
    "collude": lambda f, ctx: f,  # resolved per stage by adaptive()
}


class AdaptiveChannel(ChannelWrapper):
    """A malicious stage's raw link, rewritten by ``tactic`` in the iterations the plan makes
    it malicious."""

    def __init__(self, inner: Channel, plan: AttackPlan, module: nn.Module, num_stages: int,
                 tactic: Tactic) -> None:
        super().__init__(inner)
        self.plan, self.module, self.n, self.tactic = plan, module, num_stages, tactic
        self.corrupted = 0

    def outgoing(self, frame: Frame) -> Frame | None:
        if self.me not in self.plan.malicious(frame.step):
            return frame
        ctx = (self.me, self.n, self.module.training, self.plan.cfg.strength)
        out = self.tactic(frame, ctx)
        if out is not frame:
            self.corrupted += 1
        return out


def adaptive(channels: dict[int, Channel], plan: AttackPlan, module: nn.Module,
             num_stages: int) -> dict[int, Channel]:
    """Wrap every raw link of the stage ``module`` is with the configured tactic."""
    name = plan.cfg.adaptive
    tactic = TACTICS[name]
    if name == "collude":
        first = module.index == min(plan.cfg.stages)
        tactic = lambda f, ctx: _collude(f, ctx, first)  # noqa: E731
    return {peer: AdaptiveChannel(ch, plan, module, num_stages, tactic)
            for peer, ch in channels.items()}
