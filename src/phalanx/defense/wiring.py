"""Wiring of the duplicated block into a run: which wrapper goes on which link of which stage,
and the worker seams it fills.

For every stage s of a run with a duplicated block (checked stages are the middle ones):

- link s -> s + 1: :class:`Outbound` (jumps each activation to s + 2 when s + 1 is checked, and
  to s + 3 while s + 1 is bypassed) and, when s + 1 is checked, :class:`GradCheck` (gradients
  coming back) with inboxes of ``JUMP_GRAD`` from s + 2 and s + 3;
- when s verifies s - 1: inboxes of ``JUMP`` from s - 2 and s - 3, a :class:`Guard` and an inbox
  of repaired inputs on the link from s - 1, and the :class:`Verifier` hook;
- with second replicas (``defense.second=replica``), when s holds one of s - 2: inboxes of
  ``JUMP`` from s - 3 and s - 4 (s - 2's true input), checked in the verifier hook
  (:class:`~phalanx.defense.second.SecondReplica`); and the jumps out of every stage go to
  those second replicas too;
- with signed links (the secure transport; the simulator's throwaway keys), a
  :class:`~phalanx.defense.receipts.Receipted` on the links from s - 1 to s - 4 (the output of
  s - 1, the jumps of the others), and on those from s + 1 to s + 3 (the gradients it checks
  against each other, of the kinds each sends it, :mod:`~phalanx.defense.backproof`), whose
  receipts go in the stage's report.

:meth:`Duplicate.attach` plugs the stage's report (alerts, the replica's norm), the freezing of
its weights and replica, and the verdict's plan into the worker; stage 0 runs the coordinator.
"""

from __future__ import annotations

import torch

from phalanx.comm.channel import Channel
from phalanx.defense import backproof, second
from phalanx.defense.compare import Checks
from phalanx.defense.config import DefenseConfig
from phalanx.defense.coordinator import Coordinator, counts, report_size
from phalanx.defense.gradcheck import GradCheck
from phalanx.defense.links import Inbox, Outbound
from phalanx.defense.plan import Decision, Plan
from phalanx.defense.receipts import WORDS, Book, Notary, Receipted, output_of, pack
from phalanx.defense.replica import SECOND, checked, replicated, shadow_params, squared_norm
from phalanx.defense.shapes import Announce, Shapes, announced_to
from phalanx.defense.tolerance import CHECKS
from phalanx.defense.verifier import Guard, Verifier, well_formed
from phalanx.errors import PhalanxError
from phalanx.models.stages import StageModule
from phalanx.pipeline.stats import IterationResult
from phalanx.pipeline.verdict import Verdict
from phalanx.pipeline.worker import StageWorker
from phalanx.wire import Kind


def _inboxes(channels: dict[int, Channel]) -> list[Inbox]:
    """Every :class:`Inbox` in the wrapper chains of a stage's links."""
    found = []
    for ch in channels.values():
        while ch is not None:
            if isinstance(ch, Inbox):
                found.append(ch)
            ch = getattr(ch, "inner", None)
    return found


def hidden_size(stage: StageModule) -> int:
    conf = stage.config
    return int(getattr(conf, "hidden_size", None) or conf.n_embd)


def expected_output(worker: StageWorker, m: int) -> tuple[tuple[int, ...], torch.dtype] | None:
    """The (shape, dtype) of every stage's output of micro-batch ``m`` of stage 0's attempt:
    its token ids' (batch, seq), the model's width, the run's dtype."""
    if not 0 <= m < len(worker.inputs):
        return None
    return ((*worker.inputs[m].shape, hidden_size(worker.stage)), worker.dtype)


class Duplicate:
    """The duplicated block, jumping connection and coordinator for the stages of a process."""

    def __init__(self, cfg: DefenseConfig, num_stages: int, timeout: float | None,
                 max_micro: int = 1) -> None:
        self.cfg, self.n, self.timeout = cfg, num_stages, timeout
        self.max_micro = max_micro  # the most micro-batches a pass has (an evaluation's)
        self.books: dict[int, Book] = {}  # each stage's receipts, once links are signed
        self.backbooks: dict[int, Book] = {}  # and of the gradients it receives
        self.receipt_slots = self.back_slots = 0
        self.tolerances = cfg.tolerances(num_stages)
        self.second = cfg.second == "replica"
        self.checks: dict[int, Checks] = {}
        self.verifiers: dict[int, Verifier] = {}
        self.plan = Plan()  # the routes of the current attempt, from the last verdict
        self.decision = Decision()  # the last verdict's
        self.workers: dict[int, StageWorker] = {}  # the stages of this process, once attached
        self.inboxes: dict[int, list[Inbox]] = {}  # each stage's side inboxes
        self.shapes: dict[int, Shapes] = {}  # the data owner's shapes, where announced
        self.coordinator = Coordinator(cfg, num_stages)

    def notarize(self, notary: Notary) -> None:
        """The links are signed: stages report receipts, which the coordinator checks with
        ``notary`` (before :meth:`wrap`)."""
        self.receipt_slots, self.back_slots = self.slots()
        self.coordinator.notary, self.coordinator.receipt_slots = notary, self.receipt_slots
        self.coordinator.back_slots = self.back_slots

    def slots(self) -> tuple[int, int]:
        """Receipt slots of a report: of outputs, and of gradients."""
        return (Book(self.max_micro).slots,
                Book(self.max_micro, per_micro=backproof.PER_MICRO).slots)

    def norm_bytes(self) -> int:
        """The most bytes a stage's norm frame holds: its norm, refusals and report, with
        receipts."""
        return 8 * (1 + self.n + report_size(self.n) + sum(self.slots()) * WORDS)

    def _checks(self, stage: int) -> Checks:
        return self.checks.setdefault(stage, Checks(self.tolerances))

    def attempt(self, stage: int) -> tuple[int, int] | None:
        """(step, attempt) stage ``stage`` is at; ``None`` before its first."""
        w = self.workers.get(stage)
        return (w.step, w.tag) if w is not None and w.attempt >= 0 else None

    def tag(self, stage: int) -> int:
        """The attempt stage ``stage`` is at, as frames' ``flags`` carry it: the worker's."""
        w = self.workers.get(stage)
        return w.tag if w is not None else 0

    def jump_targets(self, s: int) -> list[int]:
        """Where stage s's output is jumped: to s + 2, the verifier of s + 1; while s + 1 is
        bypassed, also to s + 3, the verifier of s + 2, which then computes on it."""
        mid = checked(self.n)
        targets = [s + 2] if s + 1 in mid else []
        if s + 1 in self.plan.bypassed and s + 2 in mid:
            targets.append(s + 3)
        if self.second:  # also to the second replicas of the stages that compute on it
            targets += [t for t in second.jump_targets(s, self.plan, self.n)
                        if t not in targets]
        return targets

    def replicated(self, stage: int) -> dict[str, int]:
        """The replicas stage ``stage`` holds: name -> the stage it copies."""
        return replicated(stage, self.n, self.second)

    def wrap(self, stage: StageModule, channels: dict[int, Channel]) -> dict[int, Channel]:
        s, mid, n = stage.index, checked(self.n), self.n
        if self.receipt_slots:
            now = lambda: self.attempt(s)  # noqa: E731
            book = self.books.setdefault(s, Book(self.max_micro, now))
            back = self.backbooks.setdefault(
                s, Book(self.max_micro, now, per_micro=backproof.PER_MICRO))
            channels = dict(channels)
            for k in (s - 1, s - 2, s - 3, s - 4):
                if k >= 0:
                    kind = Kind.ACTIVATION if k == s - 1 else Kind.JUMP
                    channels[k] = Receipted(channels[k], book, output_of(kind))
            for k in (s + 1, s + 2, s + 3):
                if k < n:
                    channels[k] = Receipted(channels[k], back, backproof.backward)
        out = dict(channels)
        checks = self._checks(s)
        tag = lambda: self.tag(s)  # noqa: E731
        plan = lambda: self.plan  # noqa: E731
        gradcheck = None
        if s + 1 < n:  # forward out, gradients in
            jumps = {t: channels[t] for t in (s + 2, s + 3, s + 4) if t < n}
            out[s + 1] = Outbound(channels[s + 1], jumps, lambda: self.jump_targets(s), tag)
            if s + 1 in mid or s - 1 in mid:
                side = {k: Inbox(channels[k], Kind.JUMP_GRAD, tag) for k in (s + 2, s + 3)
                        if k < n and s + 1 in mid}
                if s - 1 in mid:  # what s + 1 sends for s's shadow while s is bypassed
                    side[s + 1] = Inbox(out[s + 1], Kind.JUMP_GRAD, tag)
                out.update({k: v for k, v in side.items() if k != s + 1})
                gradcheck = GradCheck(side.get(s + 1, out[s + 1]), side, self.cfg, checks,
                                      plan, n, self.timeout, tag,
                                      mend=self.coordinator.recovery.mends)
                out[s + 1] = gradcheck
        if s - 1 in mid:  # s verifies s - 1
            jumps_in = {k: Inbox(out[k], Kind.JUMP, tag) for k in (s - 2, s - 3) if k >= 0}
            out.update(jumps_in)
            repairs = Inbox(out[s - 1], Kind.JUMP, tag)
            back = {s - 1: repairs, **jumps_in}
            verifier = Verifier(stage, jumps_in, repairs, back, out.get(s + 1), self.cfg,
                                checks, plan, tag, hidden_size(stage), self.timeout)
            self.verifiers[s] = verifier
            out[s - 1] = Guard(repairs, verifier)
            if self.second and second.checks_at(s, n):  # inputs of s - 2, from s - 3 or s - 4
                ins = {k: jumps_in.get(k) or Inbox(out[k], Kind.JUMP, tag)
                       for k in (s - 3, s - 4) if k >= 0}
                out.update(ins)
                ins[s - 1] = repairs  # what s - 1 forwards while s - 3 is repaired
                dtype, hidden = verifier.dtype, verifier.hidden
                verifier.second = second.SecondReplica(
                    stage, ins, checks, lambda t: well_formed(t, hidden, dtype), self.timeout)
            if self.second:
                verifier.forwards = lambda p, s=s: second.forwards(s, p, n)
            if gradcheck is not None:
                gradcheck.feed = verifier.learn
        if s == 0 and announced_to(n):
            out[1] = Announce(out[1], {v: channels[v] for v in announced_to(n)}, tag)
        if s in announced_to(n):
            out[0] = Inbox(out[0], Kind.SHAPE, tag)
            self.shapes[s] = Shapes(out[0], lambda: self.workers[s].step, self.timeout)
            self.verifiers[s].ready = self.shapes[s].ready
        self.inboxes[s] = _inboxes(out)
        return out

    def attach(self, worker: StageWorker) -> None:
        """Fill the worker's seams: its report, its frozen parameters, the verdict's plan;
        stage 0 runs the coordinator."""
        me, checks = worker.me, self._checks(worker.me)
        shadow = shadow_params(worker.stage)
        second_replica = shadow_params(worker.stage, SECOND)
        held = {id(p) for p in shadow + second_replica}
        own = [p for p in worker.stage.parameters() if id(p) not in held]

        def report() -> torch.Tensor:
            replica = squared_norm(shadow) if shadow and not checks.blind else float("nan")
            checks.blind = False
            parts = [checks.counts(self.n), torch.tensor([replica], dtype=torch.float64)]
            if self.receipt_slots:
                for book, slots in ((self.books[me], self.receipt_slots),
                                    (self.backbooks[me], self.back_slots)):
                    parts.append(pack(book.drain(worker.step, worker.tag), slots))
            return torch.cat(parts)

        def frozen(verdict: Verdict) -> list[torch.nn.Parameter]:
            replicas = Decision.decode(verdict.payload, self.n).replicas
            return ((own if me in verdict.frozen else []) + (shadow if me in replicas else [])
                    + (second_replica if me - 2 in verdict.frozen else []))

        self.workers[me] = worker
        worker.report = report
        worker.report_size = report_size(self.n) + (self.receipt_slots + self.back_slots) * WORDS
        if worker.gate is not None:
            worker.gate.frozen = frozen
        worker.norm_excluded = held
        worker.overseen = True
        worker.verdict_hooks.append(lambda v: self._adopt(me, v))
        if me in self.verifiers:
            vf = self.verifiers[me]
            vf.position = lambda: worker.current
            vf.window = lambda: (worker.step, worker.micro)
            vf.rows = self.shapes[me].rows if me in self.shapes else worker.rows
        for inbox in self.inboxes.get(me, []):
            inbox.refuse = worker._reject
        if me == 0:
            worker.coordinator = self.coordinator
            self.coordinator.expected = lambda m: expected_output(worker, m)

    def _adopt(self, stage: int, verdict: Verdict) -> None:
        """The attempt is over for ``stage``: take the plan of the next one."""
        self.decision = Decision.decode(verdict.payload, self.n)
        self.plan = self.decision.plan

    def state(self) -> dict:
        """What a checkpoint keeps: the standing quarantine."""
        return {"quarantined": sorted(self.standing)}

    def restore(self, manifest: dict) -> None:
        """Resume with the quarantine a checkpoint recorded."""
        quarantined = manifest.get("quarantined", [])
        if not isinstance(quarantined, list) or not all(
                isinstance(q, int) and 0 < q < self.n - 1 for q in quarantined):
            raise PhalanxError(f"the checkpoint's quarantine {quarantined!r} is not a list of "
                               f"middle stages of a {self.n}-stage pipeline")
        q = frozenset(quarantined)
        plan = Plan(bypassed=q, quarantined=q)
        if not plan.valid(self.n):
            raise PhalanxError(f"the checkpoint's quarantine {quarantined!r} has stages next "
                               "to each other")
        self.plan = plan
        self.decision = Decision(plan=plan, quarantined=plan.bypassed)
        self.coordinator.restore(set(quarantined))

    @property
    def standing(self) -> frozenset[int]:
        """The standing quarantine, as the last verdict said."""
        return self.decision.quarantined

    def tally(self, stage: int) -> torch.Tensor:
        """[comparisons made, then the largest agreeing deviation by check and suspect] (the
        coordinator's norm checks are stage 0's)."""
        c = self.checks.get(stage, Checks())
        rows = c.deviation_rows(self.n)
        if stage == 0:
            rows = torch.maximum(rows, self.coordinator.checks.deviation_rows(self.n))
        return torch.cat([torch.tensor([c.checked], dtype=torch.float64), rows.reshape(-1)])

    def totals(self, tallies: list[torch.Tensor]) -> dict:
        t = torch.stack(tallies)
        rows = t[:, 1:].reshape(len(tallies), len(CHECKS), self.n).amax(dim=0)
        return {"comparisons": int(t[:, 0].sum()), "max_agreeing_deviation": float(rows.max()),
                "deviation": {c: rows[i].tolist() for i, c in enumerate(CHECKS)},
                "tolerance": self.cfg.tolerance, "rtol": self.cfg.rtol, "atol": self.cfg.atol,
                "calibration": self.cfg.calibration}

    def alerts(self, res: IterationResult) -> torch.Tensor:
        """``[verifier, suspect]`` alert counts of an attempt (stage 0's view); a row that is
        no counts (the coordinator named its sender) reads as none."""
        out = torch.zeros(self.n, self.n, dtype=torch.float64)
        if res.reports is not None:
            for r in range(self.n):
                if counts(res.reports[r, :self.n]):
                    out[r] = res.reports[r, :self.n]
        return out

    def describe(self, res: IterationResult) -> dict:
        """What the defense saw and decided in an attempt, for the metrics."""
        d = Decision.decode(res.verdict.payload, self.n)
        by_suspect = self.alerts(res).sum(dim=0).tolist()
        return {"alerts": {str(i): int(c) for i, c in enumerate(by_suspect) if c},
                "blamed": sorted(d.blamed), "frozen": sorted(res.verdict.frozen),
                "quarantined": sorted(d.quarantined), "discarded": res.verdict.discard,
                "next": {"bypassed": sorted(d.plan.bypassed),
                         "repaired": sorted(d.plan.repaired)}}
