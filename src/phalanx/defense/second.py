"""The second, independent check of a stage (``defense.second = "replica"``): stage w = s + 2
holds a second replica of stage s, so that a colluding adjacent pair — s forges, s + 1 (its
first verifier) stays silent — is still caught.

Stage w already recomputes stage s + 1 from s's output (its first replica's true input). The
second replica recomputes that output itself, from s's own true input, which the stage s
computes on jumps to w as well; a claim that differs is an alert against s. Its output is tied
(:func:`~phalanx.defense.graph.tie`) to the true input the first replica computes on, so the
gradient that reaches s's output at w — what an honest s + 1 sends s — trains it too, without
trusting s + 1: the second replica stays in lockstep with s as the first does.

The check runs whenever s is in the path (while s is bypassed it is frozen, and so is its second
replica). s's input comes from the stage s computes on, jumped to w; while s - 1 is repaired, s
computes its own input (its replica of s - 1), sends it to s + 1 to be checked on, and s + 1
forwards it to w (a stage that steps must never leave its second replica behind). While s is
repaired, the output w hears is the one s + 1 computed with its replica: a mismatch is then an
alert against s + 1.

What it does not cover: a gradient that s poisons with s + 1 sending matching false evidence
(the backward check has one replica only), and a colluding triple s, s + 1, s + 2.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from phalanx.defense.compare import Checks
from phalanx.defense.graph import tie
from phalanx.defense.links import Inbox, Key
from phalanx.defense.plan import Plan
from phalanx.defense.replica import second_checked
from phalanx.models.stages import StageModule


def checks_at(w: int, num_stages: int) -> bool:
    """Whether stage ``w`` holds a second replica (of stage w - 2)."""
    return w - 2 in second_checked(num_stages)


def jump_targets(p: int, plan: Plan, num_stages: int) -> list[int]:
    """Where stage p's output goes for second checks: to s + 2 for every second-checked s that
    computes on it while the check runs."""
    return [s + 2 for s in second_checked(num_stages)
            if plan.pred(s) == p and s not in plan.bypassed and s - 1 not in plan.repaired]


def forwards(v: int, plan: Plan, num_stages: int) -> bool:
    """Whether stage v passes on, to v + 1, the input its predecessor s = v - 1 computed with
    its replica of s - 1 (s - 1 repaired), for the second replica of s at v + 1."""
    return v - 1 in second_checked(num_stages) and v - 2 in plan.repaired


class SecondReplica:
    """Stage w's second replica of stage s = w - 2 and its check."""

    def __init__(self, stage: StageModule, inboxes: dict[int, Inbox], checks: Checks,
                 well_formed: Callable[[torch.Tensor], bool], timeout: float | None) -> None:
        self.module = stage.second
        self.w, self.s = stage.index, stage.index - 2
        self.inboxes, self.checks, self.timeout = inboxes, checks, timeout
        self.well_formed = well_formed

    def vouch(self, key: Key, heard: torch.Tensor, plan: Plan, train: bool) -> torch.Tensor:
        """``heard`` (s's output, as stage w has it), checked against the second replica's
        recomputation and tied to it when training."""
        s = self.s
        if s in plan.bypassed:
            return heard
        forwarded = s - 1 in plan.repaired
        p = self.w - 1 if forwarded else plan.pred(s)
        x = self.inboxes[p].take(key, self.timeout).tensor
        if not self.well_formed(x) or x.shape[:2] != heard.shape[:2]:
            if 0 < p and not forwarded:  # a malformed jumped copy: its sender's (stage 0 is
                # trusted; a forwarded one s made, and s + 1 has alerted already)
                self.checks.alert(key, self.w, p)
            return heard
        with torch.set_grad_enabled(train):
            z = self.module(x.detach())
        suspect = s + 1 if s in plan.repaired else s
        if not self.checks.compare(z.detach(), heard.detach(), "forward", suspect):
            self.checks.alert(key, self.w, suspect)
        return tie(heard, z) if train else heard
