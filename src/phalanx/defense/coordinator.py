"""The central server of paper 1: reports in, blame, reputations, routes and recovery out.

It runs where stage 0 runs (the trusted data owner). Each attempt, every stage reports the
alerts it raised (by suspect) and, where it holds the replica of its predecessor, the replica's
squared gradient norm. Everything a middle stage reports is the attacker's to choose, so:

- An accusation counts only from a stage whose role is to check the accused in this attempt's
  plan (:func:`designated`): the forward check at s + 1, the backward check at the stage s
  computes on, and, against the replica holder s + 1, the stage that receives its evidence;
  against a stage whose output it receives over the jumping connection, the stage that checks
  with it. An accusation outside these roles is one honest code never makes: it names the
  accuser. A stage out of the data path for this iteration keeps its role as its
  predecessor's checker (nobody else holds that replica); a quarantined one is not heard (a
  repeat offender: its predecessor goes unchecked while the quarantine stands).
- A report that is not whole numbers of alerts, in range, names its sender, and so does a
  squared norm that is not a finite non-negative number (the worker marks it invalid).
- A stage's squared norm must equal its replica's (same weights, same gradient): a mismatch
  names the stage. A replica that could not follow (its true input was malformed) reports NaN
  and vouches for nothing.

- With signed links, each report ends with the receipts of the copies of other stages'
  outputs its sender received (:mod:`phalanx.defense.receipts`). Two validly signed receipts
  of different contents for one message name their signer with its own signatures as proof.
  In an attempt with such a proof against a stage in the data path, alerts and norm checks
  name nobody: the copies it sent fed the checks after it (each checked against another copy
  than it was given) and, through the gradients and evidence mended from them, the checks
  before it. Only self-evident lies (reports and norms that are not numbers) are named beside
  it; the attempt is discarded, and its redo, without it, is judged in full. A receipt no key
  signed, or one its reporter cannot have received, names its reporter. A validly signed
  output of another shape or dtype than the micro-batch's (which stage 0 knows) names its
  signer too, and its accusations in that attempt count for nothing: an honest stage sends
  every output in that shape, and its receivers could neither check it nor answer for it
  (the replica holder that got it sends empty evidence).
- With signed links, a backward accusation (a stage against the gradient it checks, or its
  evidence) counts only with the proof that the two signed messages disagreed
  (:mod:`phalanx.defense.backproof`); without it, it names the accuser. An accusation of
  evidence that was empty, by a stage that the evidence sender accused in its role of
  checking it, names nobody: an honest replica holder sends empty evidence when its true
  input (the accuser's jumped output) was malformed.
- Under repair, the stage b before a repaired stage c takes c + 1's replica gradient in place
  of c's. Where b's receipts show the two differ, c and its replica disagree on c's input
  gradient and nothing here tells which is false, so the gradients of stages 0..c are in
  dispute: a backward accusation or a norm check against one of them names nobody, and those
  stages and their replicas keep their weights this update
  (:func:`~phalanx.defense.backproof.disputed_repairs`).

The alert of one honest verifier names the culprit; a verifier that lies can name its honest
neighbour instead (one replica cannot tell who lied): see the README's threat model.

Decisions: a :class:`~phalanx.defense.recovery.Recovery` strategy keeps or discards the
attempt and plans the redo (an evaluation's redo repairs rather than skips: it measures the
whole model); the global squared norm is taken from the replicas where their word counts;
quarantine (``quarantine_after = k``): a stage blamed in k of the
last 2k attempts is bypassed from then on (never two next to each other).
"""

from __future__ import annotations

import math
from collections import deque

import torch

from phalanx.defense import backproof
from phalanx.defense import second as second_replicas
from phalanx.defense.compare import Checks
from phalanx.defense.config import DefenseConfig
from phalanx.defense.plan import Decision, Plan
from phalanx.defense.receipts import WORDS, Expected, Findings, Notary, equivocators
from phalanx.defense.recovery import Repair, Skip, strategy
from phalanx.pipeline.verdict import Oversight, Verdict

MAX_ALERTS = 1 << 20  # more alerts than messages a stage checks in an attempt


def counts(row: torch.Tensor) -> bool:
    """Whether a reported row of alerts is whole numbers of messages, in range."""
    return bool((torch.isfinite(row) & (row >= 0) & (row <= MAX_ALERTS)
                 & (row == row.round())).all())


def report_size(n: int) -> int:
    """A stage's report: alerts by suspect (n), then its replica's squared norm (NaN if none)."""
    return n + 1


def designated(r: int, x: int, plan: Plan, n: int, second: bool = False) -> bool:
    """Whether stage r's role in ``plan`` is to check stage x. A stage out of the data path
    for this iteration only keeps its role as the holder of its predecessor's replica: the
    forward check, and the evidence for the backward one (nobody else checks that stage).
    With second replicas, the stages x's output is jumped to for them check its copy."""
    if not 0 < x < n - 1 or x in plan.out:
        return False
    if r in plan.out:
        return r in plan.heard and r == x + 1
    if r == x + 1:  # the forward check: r holds x's replica
        return True
    if r == plan.pred(x) and (x + 1 not in plan.out or x + 1 in plan.heard):
        return True  # the backward check, with x + 1's evidence
    c = x - 1  # x as the replica holder of c, whose evidence goes to the stage c computes on
    # (while c is repaired, x's replica gradient replaces c's there)
    if 0 < c and (c not in plan.out or c in plan.repaired) and r == plan.pred(c):
        return True
    if second and r in second_replicas.jump_targets(x, plan, n):
        return True
    return r == x + 2 or (r == x + 3 and x + 1 in plan.bypassed)  # x's jumped output


class Coordinator:
    """Blame, reputation and recovery decisions for a pipeline of ``num_stages`` stages."""

    def __init__(self, cfg: DefenseConfig, num_stages: int, ema: float = 0.9) -> None:
        self.cfg, self.n, self.ema = cfg, num_stages, ema
        self.recovery = strategy(cfg.recovery)
        self.notary: Notary | None = None  # with signed links: what checks receipts
        self.receipt_slots = 0  # receipts per report
        self.back_slots = 0  # and receipts of gradients
        self.expected: Expected = lambda m: None  # the outputs' shape, from the data owner
        self.withheld: frozenset[int] = frozenset()  # the last attempt's: keep their weights
        self.checks = Checks(cfg.tolerances(num_stages))  # the norm cross-checks' tally
        self.reputation = [1.0] * num_stages  # EMA of "not blamed" per attempt
        self.blame_count = [0] * num_stages
        self.alerts_seen = 0
        self.quarantined: set[int] = set()
        self.plan = Plan()  # the routes of the attempt being judged
        self._attempt: tuple[int, bool] | None = None  # (step, train) of a discarded attempt
        self._culprits: frozenset[int] = frozenset()  # named over this iteration's attempts
        window = 2 * cfg.quarantine_after
        self.history: deque[frozenset[int]] = deque(maxlen=max(window, 1))

    def blame(self, seen: Oversight, plan: Plan) -> frozenset[int]:
        """The culprits of one attempt, by the rules of the module docstring."""
        n, named = self.n, set()
        middle = set(range(1, n - 1))
        named |= (seen.invalid & middle) - plan.out  # (out of the path, its norm is not used)
        alerts, replica_norm = seen.reports[:, :n], seen.reports[:, n]
        proof, disputes = self.receipts(seen), self.disputes(seen)
        front, self.withheld = backproof.disputed_repairs(plan, disputes), frozenset()
        named |= ((proof.equivocators | proof.forgers | proof.malformed) & middle) - plan.out
        named |= {r for r, d in disputes.items() if d.forged} & middle - plan.out
        judged = not proof.equivocators - plan.out  # else every check was fed by a liar
        for r in range(n):
            row = alerts[r]
            if not counts(row):  # alerts are whole numbers of messages: anything else is none
                named |= ({r} & middle) - plan.out
                continue
            self.alerts_seen += int(row.sum())
            if r in proof.malformed:  # its own signature shows it lied: its word counts for
                continue  # nothing (its receivers could not check it, nor answer it)
            for x in torch.nonzero(row > 0).reshape(-1).tolist() if judged else ():
                if not designated(r, x, plan, n, self.cfg.second == "replica"):
                    named |= ({r} & middle) - plan.out
                elif 0 < r < x and r in disputes and not backproof.backed(r, x, plan, disputes):
                    named.add(r)  # a backward accusation without its proof
                elif r < x and x in front:
                    self.withheld = front  # its gradient came from a repair in dispute
                elif r < x and self.blinded(r, x, alerts, plan, disputes):
                    continue  # x could not compute its evidence: r's own output was malformed
                else:
                    named.add(x)
        for s in middle - plan.out if judged else ():
            v = s + 1
            if (v in plan.out and v not in plan.heard) or s in seen.invalid:
                continue
            theirs = float(replica_norm[v])
            if theirs < 0 or math.isinf(theirs):
                named |= {v} & middle  # it holds the replica: its norm is a number
            elif not math.isnan(theirs) and not self.norms_agree(seen, s, theirs):
                if s in front:
                    self.withheld = front
                else:  # (NaN: the replica had nothing to learn from; it vouches for none)
                    named.add(s)
        return frozenset(named)

    def blinded(self, r: int, x: int, alerts: torch.Tensor, plan: Plan,
                disputes: dict[int, backproof.Disputes]) -> bool:
        """Whether r's accusation of x's evidence is explained by r itself: x sent it empty
        evidence (r's signed receipts show it: what an honest replica holder sends when its
        true input, r's jumped output, is malformed) and x, in its role of checking r, accused
        r in the same attempt. (A non-finite output shows in no signed header: this is the
        proof an honest x can give.)"""
        return (r in disputes and x in disputes[r].empty and bool(alerts[x, r] > 0)
                and counts(alerts[x]) and designated(x, r, plan, self.n,
                                                     self.cfg.second == "replica"))

    def receipts(self, seen: Oversight) -> Findings:
        """What the receipts in this attempt's reports prove."""
        if self.notary is None or not self.receipt_slots:
            return Findings()
        start = self.n + 1
        words = seen.reports[:, start:start + self.receipt_slots * WORDS]
        return equivocators({r: words[r] for r in range(self.n)}, seen.step, seen.tag,
                            self.notary, self.expected)

    def disputes(self, seen: Oversight) -> dict[int, backproof.Disputes]:
        """What each middle stage's gradient receipts prove (none without signed links)."""
        if self.notary is None or not self.back_slots:
            return {}
        start = self.n + 1 + self.receipt_slots * WORDS
        words = seen.reports[:, start:start + self.back_slots * WORDS]
        return {r: backproof.disputes(words[r], r, seen.step, seen.tag, self.notary)
                for r in range(self.n - 1)}  # (stage 0's too: it may take a replacement)

    def norms_agree(self, seen: Oversight, s: int, theirs: float) -> bool:
        """Whether stage s's squared norm agrees with its replica's."""
        return self.checks.compare_scalars(theirs, seen.norms[s], "norm", s)

    def decide(self, seen: Oversight) -> Verdict:
        plan = self.plan
        key = (seen.step, seen.train)
        if key != self._attempt:
            self._culprits = frozenset()
        culprits = self.blame(seen, plan)
        for s in range(self.n):
            hit = s in culprits
            self.blame_count[s] += hit
            self.reputation[s] = self.ema * self.reputation[s] + (1 - self.ema) * (not hit)
        self.history.append(culprits)
        k = self.cfg.quarantine_after
        if k:
            for s in sorted(culprits):
                recent = sum(s in h for h in self.history)
                if recent >= k and not {s - 1, s + 1} & self.quarantined:
                    self.quarantined.add(s)
        self._culprits |= culprits
        q = frozenset(self.quarantined)
        base = Plan(bypassed=q, quarantined=q)
        # an evaluation measures the whole model: its redo replaces the culprits' messages by
        # their replicas' rather than leave their layers out
        recovery = self.recovery if seen.train or not isinstance(self.recovery, Skip) else Repair()
        response = recovery.respond(culprits, self._culprits, base, self.n)
        self._attempt = key if response.discard else None
        self.plan = response.redo if response.discard else base
        unvouched = frozenset(s for s in seen.invalid if self._replica(seen, plan, s) is None)
        # a repaired stage steps, and nobody checked its norm against its replica's: where the
        # two differ, it keeps its weights rather than let either set the clipping
        for s in plan.repaired:
            theirs = self._replica(seen, plan, s)
            if theirs is None or not self.norms_agree(seen, s, theirs):
                unvouched |= {s}
        frozen, replicas = self.frozen_for(plan, unvouched)
        frozen, replicas = frozen | self.withheld, replicas | {s + 1 for s in self.withheld}
        decision = Decision(plan=self.plan, blamed=culprits,
                            quarantined=frozenset(self.quarantined), replicas=replicas)
        return Verdict(frozen=frozen, discard=response.discard,
                       payload=decision.encode(self.n),
                       norm_sq=self.norm_sq(seen, plan, frozen))

    def norm_sq(self, seen: Oversight, plan: Plan, frozen: frozenset[int]) -> float:
        """The global squared norm: over the stages that step, each middle stage's as its
        replica computed it where that replica's word counts (so a stage left out of the path,
        whose report nobody checks, cannot turn clipping off or every update to nothing)."""
        total = 0.0
        for s in range(self.n):
            if s not in frozen:
                theirs = self._replica(seen, plan, s)
                total += seen.norms[s] if theirs is None else theirs
        return total

    def _replica(self, seen: Oversight, plan: Plan, s: int) -> float | None:
        """Stage s's squared norm as its replica computed it, where that replica's word counts
        and it sent a number."""
        v = s + 1
        if not 0 < s < self.n - 1 or (v in plan.out and v not in plan.heard):
            return None
        theirs = float(seen.reports[v, self.n])
        return theirs if math.isfinite(theirs) and theirs >= 0 else None

    def frozen_for(self, plan: Plan, invalid: frozenset[int]
                   ) -> tuple[frozenset[int], frozenset[int]]:
        """What keeps its weights after an attempt with ``plan``: the bypassed stages and
        those whose norm was no number and no replica vouches for, and their replicas (held by
        the next stage). The
        replica a bypassed stage holds goes on learning, from the gradient its successor sends
        it (:mod:`phalanx.defense.verifier`)."""
        own = plan.bypassed | (invalid & set(range(1, self.n - 1)))  # (repaired ones too)
        return frozenset(own), frozenset(s + 1 for s in own)

    def restore(self, quarantined: set[int]) -> None:
        """Resume with a standing quarantine."""
        self.quarantined = set(quarantined)
        self.plan = Plan(bypassed=frozenset(quarantined), quarantined=frozenset(quarantined))
