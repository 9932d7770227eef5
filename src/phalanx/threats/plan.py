"""Which stages attack in which iteration: a pure function of (seed, step), so every process of
a distributed run, and a re-run, agrees without talking."""

from __future__ import annotations

import torch

from phalanx.threats.config import AttackConfig


class AttackPlan:
    """The attacked iterations and malicious stages of one run."""

    def __init__(self, cfg: AttackConfig, num_stages: int) -> None:
        cfg.validate(num_stages)
        self.cfg = cfg
        self.num_stages = num_stages
        self.attempt = 0  # a redone iteration draws afresh whether it is attacked

    def _rng(self, step: int, salt: int, attempt: int | None = None) -> torch.Generator:
        attempt = self.attempt if attempt is None else attempt
        seed = ((self.cfg.seed * 1_000_003 + step) * 7 + salt) * 31 + attempt
        return torch.Generator().manual_seed(seed)

    def malicious(self, step: int) -> frozenset[int]:
        """The stages that corrupt what they send in iteration ``step`` (empty if none)."""
        cfg = self.cfg
        if not cfg.active:
            return frozenset()
        if float(torch.rand(1, generator=self._rng(step, 1))) >= cfg.rate:
            return frozenset()
        if cfg.stages:
            return frozenset(cfg.stages)
        middle = self.num_stages - 2  # one attacker per iteration: a redo may meet it again
        pick = torch.randint(middle, (1,), generator=self._rng(step, 2, attempt=0))
        return frozenset({1 + int(pick)})

    def noise(self, step: int, stage: int, micro: int, backward: bool) -> torch.Generator:
        """The generator of the noise a stage adds to one message (reproducible)."""
        return self._rng(step, 1000 + 4 * (stage * 65_536 + micro) + (2 if backward else 3))
