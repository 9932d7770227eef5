"""The central server of paper 1: alerts in, blame, reputations, recovery decisions out.

It runs where stage 0 runs (the trusted data owner) and sees, each iteration, how many alerts
every verifier raised against every suspect. An alert from the forward check at stage s + 1 or
from the backward check at stage s - 1 both concern what stage s sent, recomputed by the replica
of s at stage s + 1 from the true input that the jumping connection brought from stage s - 1 (so
stage s - 1 is out of the picture, even against a forged input/output pair). The alert therefore
implicates s or, if the replica holder lied, s + 1; the coordinator names s, the stage whose
message contradicts the recomputation, and keeps per-stage reputations and a blame history.

Decisions:

- ``skip`` (skip layer): stages s - 1, s and s + 1 keep their weights this iteration (the paper
  freezes the bypassed stages and the one before; the trusted last stage, which ran its own
  layers on the true input, still steps), and their replicas with them.
- ``repair`` (beyond the paper): the replica's output or gradient replaced the bad message, so
  the iteration is the honest one and nobody is frozen.
- ``restart``: the whole iteration is discarded and redone.
- Quarantine (``quarantine_after = k``): a stage blamed in k of the last 2k iterations is
  bypassed from then on: stage q + 1 takes its input from stage q - 1 over the jumping
  connection; stage q and its replica stay frozen until it is replaced. A stage next to a
  quarantined one is not quarantined (the jumping connection reaches two stages, not three);
  it keeps being skipped per iteration instead.
"""

from __future__ import annotations

from collections import deque

import torch

from phalanx.defense.config import DefenseConfig
from phalanx.pipeline.verdict import Verdict


class Coordinator:
    """Blame, reputation and recovery decisions for a pipeline of ``num_stages`` stages."""

    def __init__(self, cfg: DefenseConfig, num_stages: int, ema: float = 0.9) -> None:
        self.cfg, self.n, self.ema = cfg, num_stages, ema
        self.reputation = [1.0] * num_stages  # EMA of "not blamed" per iteration
        self.blame_count = [0] * num_stages
        self.alerts_seen = 0
        self.quarantined: set[int] = set()
        window = 2 * cfg.quarantine_after
        self.history: deque[frozenset[int]] = deque(maxlen=max(window, 1))

    def blame(self, alerts: torch.Tensor) -> frozenset[int]:
        """The culprits named by ``alerts[verifier, suspect]``: the suspects, except where the
        verifier or the replica holder is already quarantined (its word no longer counts).

        Row v is what stage v reported, and stage v checks only its neighbours (the forward
        check at s + 1, the backward check at s - 1). An accusation of any other stage is one
        that honest code never makes, so it names the accuser (a middle stage: the two ends are
        the data owner's), not the accused."""
        named = set()
        for v, s in torch.nonzero(alerts > 0).tolist():
            if abs(v - s) != 1 or not 0 < s < self.n - 1:
                if 0 < v < self.n - 1:
                    named.add(v)
                continue
            if {v, s, s + 1} & self.quarantined:
                continue
            named.add(s)
        return frozenset(named)

    def frozen_for(self, culprits: frozenset[int]) -> set[int]:
        """The stages whose update waits: bypassed ones and the one before each."""
        frozen: set[int] = set()
        for s in culprits:
            frozen |= {s - 1, s}
            if s + 1 < self.n - 1:
                frozen.add(s + 1)
        return frozen

    def decide(self, step: int, alerts: torch.Tensor) -> Verdict:
        self.alerts_seen += int(alerts.sum())
        culprits = self.blame(alerts)
        for s in range(self.n):
            hit = s in culprits
            self.blame_count[s] += hit
            self.reputation[s] = self.ema * self.reputation[s] + (1 - self.ema) * (not hit)
        self.history.append(culprits)
        frozen: set[int] = set()
        discard = False
        if culprits and self.cfg.recovery == "skip":
            frozen = self.frozen_for(culprits)
        elif culprits and self.cfg.recovery == "restart":
            discard = True
        k = self.cfg.quarantine_after
        if k:
            for s in sorted(culprits):
                recent = sum(s in h for h in self.history)
                if recent >= k and not {s - 1, s + 1} & self.quarantined:
                    self.quarantined.add(s)
        frozen |= self.quarantined
        return Verdict(frozen=frozenset(frozen), quarantined=frozenset(self.quarantined),
                       discard=discard, blamed=culprits)
