"""Comparing a claimed message with its recomputation, and one stage's tally of the checks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from phalanx.defense.config import DefenseConfig


def agrees(recomputed: torch.Tensor, claimed: torch.Tensor, rtol: float, atol: float) -> bool:
    """Whether a claimed message matches its recomputation: ``rtol = atol = 0`` is the
    bitwise check; otherwise ``max|a - b| <= atol + rtol * max|b|``. NaN/Inf never agrees,
    nor do tensors of another shape or dtype."""
    if (claimed.shape != recomputed.shape or claimed.dtype != recomputed.dtype
            or not bool(torch.isfinite(claimed).all())):
        return False
    if rtol == 0 and atol == 0:
        return torch.equal(recomputed, claimed)
    diff = float((recomputed - claimed).abs().max()) if claimed.numel() else 0.0
    return diff <= atol + rtol * float(recomputed.abs().max())


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
    comparisons made and the largest relative difference among those that agreed."""

    alerts: list[Alert] = field(default_factory=list)
    checked: int = 0
    max_deviation: float = 0.0
    blind: bool = False  # a micro-batch of this attempt had no true input to check with

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

    def alert(self, key: tuple[int, int], verifier: int, suspect: int) -> None:
        self.alerts.append(Alert(step=key[0], micro=key[1], verifier=verifier, suspect=suspect))

    def counts(self, n: int) -> torch.Tensor:
        """Alerts by suspect, as an (n,) vector; clears them."""
        c = torch.zeros(n, dtype=torch.float64)
        for a in self.alerts:
            c[a.suspect] += 1
        self.alerts.clear()
        return c
