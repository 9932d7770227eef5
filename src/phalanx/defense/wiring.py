"""Wiring of the duplicated block into a run: which wrapper goes on which link of which stage.

For every stage s of a run with a duplicated block (checked stages are the middle ones):

- link s -> s + 1: :class:`Outbound` (marks activations that come from a bypass or a repaired
  input; jumps to s + 2 when s + 1 is checked, and to s + 3 while s + 1 is quarantined) and
  :class:`GradCheck` (gradients coming back);
- link s -> s - 1: :class:`Outbound` (marks gradients that come from a bypass);
- links from s - 2 and s - 3: :class:`Inbox` es of jumped activations, and link from s - 1: a
  :class:`FlagTap` and an :class:`Inbox` of repaired inputs, when s verifies s - 1
  (:class:`Verifier`);
- link from s + 2: an :class:`Inbox` of replica gradients, the evidence of :class:`GradCheck`,
  when s checks the gradient of s + 1.

:meth:`Duplicate.attach` then plugs the stage's alerts into the worker's report, the coordinator
into stage 0 and the standing quarantine into every verifier.
"""

from __future__ import annotations

from phalanx.comm.channel import Channel
from phalanx.defense.config import DefenseConfig
from phalanx.defense.coordinator import Coordinator
from phalanx.defense.duplicate import Checks, Verifier, checked
from phalanx.defense.gradcheck import GradCheck
from phalanx.defense.links import FlagTap, Inbox, Outbound
from phalanx.errors import PhalanxError
from phalanx.models.stages import StageModule
from phalanx.pipeline.verdict import Verdict
from phalanx.pipeline.worker import StageWorker
from phalanx.wire import FLAG_REPAIRED, FLAG_SKIP, Kind


class Duplicate:
    """The duplicated block, jumping connection and coordinator for the stages of a process."""

    def __init__(self, cfg: DefenseConfig, num_stages: int, timeout: float | None) -> None:
        self.cfg, self.n, self.timeout = cfg, num_stages, timeout
        self.checks: dict[int, Checks] = {}
        self.verifiers: dict[int, Verifier] = {}
        self.gradchecks: dict[int, GradCheck] = {}
        self.standing: set[int] = set()  # quarantined stages, as the last verdict said
        self.coordinator = Coordinator(cfg, num_stages)

    def jump_targets(self, s: int) -> list[int]:
        """Where stage s's output is jumped: to s + 2, the verifier of s + 1; while s + 1 is
        quarantined (bypassed), also to s + 3, the verifier of s + 2, which now takes its input
        from s."""
        mid = checked(self.n)
        targets = [s + 2] if s + 1 in mid else []
        if s + 1 in self.standing and s + 2 in mid:
            targets.append(s + 3)
        return targets

    def wrap(self, stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        s, out, mid = stage.index, dict(channels), checked(self.n)
        checks = self.checks.setdefault(s, Checks())
        if s + 1 < self.n:  # forward out, gradients in
            jumps = {t: channels[t] for t in (s + 2, s + 3) if t < self.n}
            marks = {FLAG_SKIP: checks.marked, FLAG_REPAIRED: checks.repaired}
            out[s + 1] = Outbound(channels[s + 1], Kind.ACTIVATION, marks, jumps,
                                  lambda: self.jump_targets(s))
            evidence = None
            if s + 1 in mid:
                evidence = out[s + 2] = Inbox(channels[s + 2], Kind.JUMP_GRAD)
            out[s + 1] = self.gradchecks[s] = GradCheck(out[s + 1], evidence, self.cfg, checks,
                                                         self.standing, self.timeout)
        if s > 0:  # activations in, gradients out
            out[s - 1] = Outbound(out[s - 1], Kind.GRADIENT, {FLAG_SKIP: checks.marked})
        if s - 1 in mid:
            jumps_in = {src: Inbox(out[src], Kind.JUMP) for src in (s - 2, s - 3) if src >= 0}
            out.update(jumps_in)
            tap = FlagTap(out[s - 1])
            repairs = out[s - 1] = Inbox(tap, Kind.JUMP)  # inputs stage s - 1 had repaired
            self.verifiers[s] = Verifier(stage, jumps_in, tap, jumps_in[s - 2], self.cfg, checks,
                                         self.standing, self.timeout, repairs, out.get(s + 1))
        return out

    def attach(self, worker: StageWorker) -> None:
        """Report this stage's alerts with its norm; stage 0 runs the coordinator."""
        checks = self.checks.setdefault(worker.me, Checks())
        worker.alert_counts = lambda: checks.counts(self.n)
        worker.verdict_hooks.append(lambda v, s=worker.me: self._adopt(s, v))
        if worker.me == 0:
            worker.coordinator = self.coordinator

    def restore(self, quarantined: list) -> None:
        """Resume with the quarantine a checkpoint recorded."""
        if not isinstance(quarantined, list) or not all(
                isinstance(q, int) and 0 < q < self.n - 1 for q in quarantined):
            raise PhalanxError(f"the checkpoint's quarantine {quarantined!r} is not a list of "
                               f"middle stages of a {self.n}-stage pipeline")
        self.standing.clear()
        self.standing.update(quarantined)
        self.coordinator.quarantined = set(quarantined)

    def _adopt(self, stage: int, verdict: Verdict) -> None:
        """The iteration is over for ``stage``: take the standing quarantine, and forget this
        iteration's bypasses (a restart redoes the same step number from a clean slate)."""
        self.standing.clear()
        self.standing.update(verdict.quarantined)
        checks = self.checks[stage]
        checks.marked.clear()
        checks.bypassed.clear()
        checks.repaired.clear()
        if stage in self.verifiers:
            self.verifiers[stage].skip_step = -1
        if stage in self.gradchecks:
            self.gradchecks[stage].drop_step = -1
