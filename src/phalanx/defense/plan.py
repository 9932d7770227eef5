"""The routes of one attempt, as the coordinator's verdict set them.

Nothing a middle stage sends decides a route. Stage 0 (the trusted coordinator) names, in the
payload of each verdict, the stages that the next attempt leaves out of the data path:

- *bypassed* (skip recovery, quarantine): stage s still runs, but nobody uses what it sends;
  stage s + 1 takes stage s - 1's output over the jumping connection, and stage s - 1 takes the
  gradient of stage s + 1 over it;
- *repaired* (repair recovery): stage s's output is replaced by its replica's, computed at stage
  s + 1 from stage s - 1's output, and stage s - 1 takes the replica's gradient.

Every stage decodes the same payload, so every stage agrees on the routes of an attempt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phalanx.wire import FrameError


@dataclass(frozen=True)
class Plan:
    """Stages out of the data path in one attempt; the quarantined ones are among the
    bypassed."""

    bypassed: frozenset[int] = frozenset()
    repaired: frozenset[int] = frozenset()
    quarantined: frozenset[int] = frozenset()

    @property
    def out(self) -> frozenset[int]:
        """The stages whose messages are not used."""
        return self.bypassed | self.repaired

    @property
    def heard(self) -> frozenset[int]:
        """Stages out of the path whose word as verifiers still counts: those left out for
        this iteration only (a quarantined stage is not believed)."""
        return self.out - self.quarantined

    def pred(self, s: int) -> int:
        """The stage whose output stage s computes on."""
        return s - 2 if s - 1 in self.bypassed else s - 1

    def valid(self, n: int) -> bool:
        """Only middle stages, and no two of them next to each other (the jumping connection
        spans one stage; the replica of a stage left out is its next stage's)."""
        out = self.out
        return (not self.bypassed & self.repaired and self.quarantined <= self.bypassed
                and all(0 < s < n - 1 for s in out) and not any(s + 1 in out for s in out))

    def with_out(self, culprits: frozenset[int], repaired: bool, n: int) -> Plan | None:
        """This plan with ``culprits`` also left out (bypassed, or repaired), or ``None`` where
        that is not a valid plan."""
        extra = frozenset(culprits) - self.out
        if repaired:
            plan = Plan(bypassed=self.bypassed, repaired=self.repaired | extra,
                        quarantined=self.quarantined)
        else:
            plan = Plan(bypassed=self.bypassed | extra, repaired=self.repaired,
                        quarantined=self.quarantined)
        return plan if plan.valid(n) else None


GROUPS = 5  # masks in an encoded decision


@dataclass(frozen=True)
class Decision:
    """The defense's part of a verdict: the plan of the next attempt, the culprits named in
    this one, the standing quarantine, and the stages whose replica (the one they hold) keeps
    its weights this update."""

    plan: Plan = Plan()
    blamed: frozenset[int] = frozenset()
    quarantined: frozenset[int] = frozenset()
    replicas: frozenset[int] = frozenset()

    def encode(self, n: int) -> torch.Tensor:
        """As float64 masks [bypassed, repaired, blamed, quarantined, replicas], n each."""
        t = torch.zeros(GROUPS * n, dtype=torch.float64)
        groups = (self.plan.bypassed, self.plan.repaired, self.blamed, self.quarantined,
                  self.replicas)
        for k, group in enumerate(groups):
            for s in group:
                t[k * n + s] = 1.0
        return t

    @classmethod
    def decode(cls, t: torch.Tensor, n: int) -> Decision:
        """Parse :meth:`encode`; an empty payload is the neutral decision."""
        if t.numel() == 0:
            return cls()
        if t.shape != (GROUPS * n,) or not bool(((t == 0) | (t == 1)).all()):
            raise FrameError(f"a defense decision must be {GROUPS * n} zeros and ones, got "
                             f"{tuple(t.shape)}")
        masks = [frozenset(int(i) for i in torch.nonzero(t[k * n:(k + 1) * n]).reshape(-1))
                 for k in range(GROUPS)]
        plan = Plan(bypassed=masks[0], repaired=masks[1], quarantined=masks[3])
        if not plan.valid(n):
            raise FrameError(f"a defense decision with an impossible plan {plan}")
        return cls(plan=plan, blamed=masks[2], quarantined=masks[3], replicas=masks[4])
