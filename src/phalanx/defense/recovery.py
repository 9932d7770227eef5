"""Recovery strategies: what the coordinator does with an attempt in which it named culprits.

Detection happens while an iteration runs; a decision that every stage can trust exists only
once stage 0 has gathered the alerts, after the backward pass. So recovery acts on the attempt
as a whole: the attempt is kept, or discarded and redone along routes the verdict sets
(:class:`~phalanx.defense.plan.Plan`). A suspect's own frames never choose a route.

- ``none``: alert only; the attempt is kept, poison and all.
- ``restart``: redo the attempt as it was (the attacker may strike again; bounded by
  ``defense.max_retries``).
- ``skip`` (skip layer, paper 1): redo it with the culprits bypassed, as in stochastic depth;
  they and their replicas keep their weights.
- ``repair``: redo it with each culprit's messages replaced by its replica's, so the iteration
  is the honest one to the bit and every stage steps.

Where the culprits cannot be left out (two next to each other, or next to a quarantined stage),
skip and repair redo the attempt as restart does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from phalanx.defense.plan import Plan


@dataclass(frozen=True)
class Response:
    """Whether to discard the attempt, and the plan of the redo if so."""

    discard: bool
    redo: Plan


class Recovery(ABC):
    """One recovery strategy."""

    name: ClassVar[str]
    mends: ClassVar[bool] = True  # a poisoned gradient caught on its way is replaced

    @abstractmethod
    def respond(self, culprits: frozenset[int], named: frozenset[int], base: Plan, n: int
                ) -> Response:
        """The response to an attempt that named ``culprits`` (``named``: all that this
        iteration's attempts named so far); ``base`` is the plan of a fresh attempt (the
        quarantine)."""


class NoRecovery(Recovery):
    name, mends = "none", False  # the attack's effect, measured

    def respond(self, culprits: frozenset[int], named: frozenset[int], base: Plan, n: int
                ) -> Response:
        return Response(discard=False, redo=base)


class Restart(Recovery):
    name = "restart"

    def respond(self, culprits: frozenset[int], named: frozenset[int], base: Plan, n: int
                ) -> Response:
        return Response(discard=bool(culprits), redo=base)


class LeaveOut(Recovery):
    """Skip and repair: redo with the culprits out of the data path."""

    repaired: ClassVar[bool]

    def respond(self, culprits: frozenset[int], named: frozenset[int], base: Plan, n: int
                ) -> Response:
        if not culprits:
            return Response(discard=False, redo=base)
        return Response(discard=True, redo=base.with_out(named, self.repaired, n) or base)


class Skip(LeaveOut):
    name, repaired = "skip", False


class Repair(LeaveOut):
    name, repaired = "repair", True


STRATEGIES: dict[str, type[Recovery]] = {r.name: r for r in (NoRecovery, Restart, Skip, Repair)}


def strategy(name: str) -> Recovery:
    """The strategy called ``name`` (one of :data:`STRATEGIES`)."""
    return STRATEGIES[name]()
