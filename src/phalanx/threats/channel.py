"""PoisonChannel: a malicious stage's outgoing link, corrupting activations or gradients."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from phalanx.comm.channel import Channel
from phalanx.comm.wrap import ChannelWrapper
from phalanx.threats.attacks import perturb
from phalanx.threats.plan import AttackPlan
from phalanx.wire import Frame, Kind


def forged_input(like: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The forged-pair attacker's arbitrary input a'_in: noise shaped like a hidden state."""
    return torch.randn(like.shape, generator=g, dtype=like.dtype)


def forged_pair(module: nn.Module, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """a'_out = stage(a'_in): an output consistent with the forged input a'_in, so recomputing
    from the *claimed* input agrees; only the true input (jumping connection) exposes it.
    ``module.forward`` is called directly so no verification hook of this stage runs."""
    with torch.no_grad():
        return module.forward(forged_input(x, g).to(x.device)).to(x.dtype)


class PoisonChannel(ChannelWrapper):
    """Corrupts what stage ``inner.me`` sends on this link in the iterations where the plan makes
    it malicious: activations (forward attack) and gradients (backward attack). Attacks act only
    while ``module`` is training; evaluation traffic is left alone."""

    def __init__(self, inner: Channel, plan: AttackPlan, module: nn.Module) -> None:
        super().__init__(inner)
        self.plan = plan
        self.module = module
        self.corrupted = 0  # frames corrupted so far

    def outgoing(self, frame: Frame) -> Frame:
        cfg = self.plan.cfg
        if not self.module.training or self.me not in self.plan.malicious(frame.step):
            return frame
        if frame.kind is Kind.ACTIVATION and cfg.forward != "none":
            name, backward = cfg.forward, False
        elif frame.kind is Kind.GRADIENT and cfg.backward != "none":
            name, backward = cfg.backward, True
        else:
            return frame
        g = self.plan.noise(frame.step, self.me, frame.micro, backward)
        kind = "backward" if backward else "forward"
        self.corrupted += 1
        if name == "forged" and not backward:
            return replace(frame, tensor=forged_pair(self.module, frame.tensor, g))
        return replace(frame, tensor=perturb(kind, name, frame.tensor, g, cfg.strength))


def poison(channels: dict[int, Channel], plan: AttackPlan, module: nn.Module
           ) -> dict[int, Channel]:
    """Wrap a stage's links to its pipeline neighbours; other links (to the data owner,
    reports, control) are left as they are."""
    me = getattr(module, "index", None)
    out: dict[int, Channel] = {}
    for peer, ch in channels.items():
        out[peer] = PoisonChannel(ch, plan, module) if me is not None and abs(peer - me) == 1 \
            else ch
    return out
