"""Comparing a claimed message with its recomputation, and one stage's tally of the checks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from phalanx.defense.tolerance import CHECKS, Tolerances, comparable, deviation


@dataclass
class Alert:
    """A check that failed at stage ``verifier``: ``suspect`` sent something wrong."""

    step: int
    micro: int
    verifier: int
    suspect: int


@dataclass
class Checks:
    """One stage's verification tally: the alerts of the current attempt, the number of
    comparisons made and, by (check, suspect), the largest deviation (in RMS units,
    :func:`~phalanx.defense.tolerance.deviation`) among those that agreed."""

    tolerances: Tolerances = field(default_factory=Tolerances)
    alerts: list[Alert] = field(default_factory=list)
    checked: int = 0
    deviations: dict[tuple[str, int], float] = field(default_factory=dict)
    blind: bool = False  # a micro-batch of this attempt had no true input to check with

    def compare(self, recomputed: torch.Tensor, claimed: torch.Tensor, check: str,
                suspect: int) -> bool:
        """Count one ``check`` of ``suspect``'s message; whether ``claimed`` agrees with its
        recomputation."""
        self.checked += 1
        ok = self.tolerances.of(check, suspect).agrees(recomputed, claimed)
        if ok and comparable(recomputed, claimed):
            self.record(check, suspect, deviation(recomputed, claimed))
        return ok

    def compare_scalars(self, recomputed: float, claimed: float, check: str, suspect: int
                        ) -> bool:
        """The same for two numbers (a stage's squared norm and its replica's)."""
        ok = self.tolerances.of(check, suspect).scalars_agree(recomputed, claimed)
        if ok and math.isfinite(recomputed):
            self.record(check, suspect, abs(recomputed - claimed) / (abs(recomputed) or 1.0))
        return ok

    def record(self, check: str, suspect: int, dev: float) -> None:
        key = (check, suspect)
        self.deviations[key] = max(self.deviations.get(key, 0.0), dev)

    def deviation_rows(self, n: int) -> torch.Tensor:
        """The largest agreeing deviation by check (rows, :data:`CHECKS`) and suspect."""
        out = torch.zeros(len(CHECKS), n, dtype=torch.float64)
        for (check, s), dev in self.deviations.items():
            if 0 <= s < n:
                out[CHECKS.index(check), s] = dev
        return out

    def alert(self, key: tuple[int, int], verifier: int, suspect: int) -> None:
        self.alerts.append(Alert(step=key[0], micro=key[1], verifier=verifier, suspect=suspect))

    def counts(self, n: int) -> torch.Tensor:
        """Alerts by suspect, as an (n,) vector; clears them."""
        c = torch.zeros(n, dtype=torch.float64)
        for a in self.alerts:
            c[a.suspect] += 1
        self.alerts.clear()
        return c
