"""The coordinator's decisions and the verdict's wire format, worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from phalanx.defense.config import DefenseConfig
from phalanx.defense.coordinator import Coordinator, designated
from phalanx.defense.plan import Decision, Plan
from phalanx.pipeline.verdict import Oversight, Verdict
from phalanx.wire import FrameError


def _seen(n: int, *pairs: tuple[int, int], step: int = 0, train: bool = True,
          norms: dict[int, float] | None = None, replica: dict[int, float] | None = None
          ) -> Oversight:
    """Alerts ``(reporter, suspect)``; every squared norm 1.0 and every replica's the same,
    unless ``norms`` / ``replica`` (by the stage that holds it) say otherwise."""
    reports = torch.zeros(n, n + 1, dtype=torch.float64)
    for r, s in pairs:
        reports[r, s] += 1
    reports[:, n] = torch.tensor([math.nan, math.nan] + [1.0] * (n - 2), dtype=torch.float64)
    for v, x in (replica or {}).items():
        reports[v, n] = x
    values = [1.0] * n
    for s, x in (norms or {}).items():
        values[s] = x
    invalid = frozenset(s for s, x in enumerate(values) if math.isnan(x))
    return Oversight(step=step, train=train, norms=values, invalid=invalid, reports=reports,
                     refused=torch.zeros(n, n, dtype=torch.float64))


def _d(v: Verdict, n: int) -> Decision:
    return Decision.decode(v.payload, n)


def test_skip_discards_redoes_with_the_culprit_bypassed_and_freezes_it_and_its_replica():
    c = Coordinator(DefenseConfig(verify="duplicate"), 6)
    v = c.decide(_seen(6, (3, 2), (1, 2)))  # forward check at 3, backward check at 1
    d = _d(v, 6)
    assert d.blamed == {2} and v.discard and d.plan == Plan(bypassed=frozenset({2}))
    v = c.decide(_seen(6))  # the redo, without stage 2: kept
    d = _d(v, 6)
    assert not v.discard and d.blamed == set() and d.plan == Plan()
    # stage 2 keeps its weights, and so does its replica at 3
    assert v.frozen == {2} and d.replicas == {3}
    v = c.decide(_seen(6, (5, 4), step=1))  # the verifier is the trusted last stage
    assert _d(v, 6).plan.bypassed == {4}
    v = c.decide(_seen(6, step=1))
    assert v.frozen == {4} and _d(v, 6).replicas == {5}
    assert c.decide(_seen(6, step=2)) == Verdict(payload=Decision().encode(6), norm_sq=6.0)
    assert c.blame_count == [0, 0, 1, 0, 1, 0]


def test_restart_redoes_as_it_was_repair_replaces_and_none_only_reports():
    v = Coordinator(DefenseConfig(verify="duplicate", recovery="restart"), 4).decide(
        _seen(4, (2, 1)))
    assert v.discard and v.frozen == set() and _d(v, 4).plan == Plan()
    c = Coordinator(DefenseConfig(verify="duplicate", recovery="repair"), 4)
    v = c.decide(_seen(4, (2, 1)))
    assert v.discard and _d(v, 4).plan == Plan(repaired=frozenset({1}))
    v = c.decide(_seen(4))
    assert not v.discard and v.frozen == set() and _d(v, 4).replicas == set()
    v = Coordinator(DefenseConfig(verify="duplicate", recovery="none"), 4).decide(
        _seen(4, (2, 1)))
    assert not v.discard and v.frozen == set() and _d(v, 4).blamed == {1}


def test_an_iterations_culprits_are_all_left_out_and_next_to_each_other_it_restarts():
    c = Coordinator(DefenseConfig(verify="duplicate"), 7)
    c.decide(_seen(7, (2, 1)))
    v = c.decide(_seen(7, (4, 3)))  # the redo names another culprit: both go
    assert v.discard and _d(v, 7).plan.bypassed == {1, 3}
    v = c.decide(_seen(7, (4, 2)))  # 2 is next to 1 and 3: no plan leaves all three out
    assert v.discard and _d(v, 7).plan == Plan()
    c = Coordinator(DefenseConfig(verify="duplicate"), 7)
    c.decide(_seen(7, (2, 1), step=3))
    v = c.decide(_seen(7, step=3, train=False))  # an evaluation is another attempt's business
    assert not v.discard and _d(v, 7).plan == Plan()


def test_quarantine_after_k_blames_in_2k_attempts_and_never_next_to_another():
    c = Coordinator(DefenseConfig(verify="duplicate", quarantine_after=2,
                                  recovery="restart"), 6)
    assert _d(c.decide(_seen(6, (3, 2))), 6).quarantined == set()
    assert _d(c.decide(_seen(6, step=1)), 6).quarantined == set()
    v = c.decide(_seen(6, (3, 2), step=2))  # 2 blames within the last 4 attempts
    assert _d(v, 6).quarantined == {2} and _d(v, 6).plan.bypassed == {2}
    v = c.decide(_seen(6, step=2))
    assert v.frozen == {2} and _d(v, 6).replicas == {3}
    # its word no longer counts; an accusation of it, which no honest stage makes (nobody
    # checks a stage out of the data path), names the accuser
    assert _d(c.decide(_seen(6, (2, 1), step=3)), 6).blamed == set()
    assert _d(c.decide(_seen(6, (1, 2), (3, 2), step=3)), 6).blamed == {1, 3}
    c.decide(_seen(6, (4, 3), step=4))
    v = c.decide(_seen(6, (4, 3), step=5))  # stage 3 is next to a quarantined stage
    assert _d(v, 6).blamed == {3} and _d(v, 6).quarantined == {2}


def test_verdict_and_decision_round_trip_and_malformed_ones_are_refused():
    d = Decision(plan=Plan(bypassed=frozenset({3}), repaired=frozenset({1}),
                           quarantined=frozenset({3})),
                 blamed=frozenset({1, 3}), quarantined=frozenset({3}), replicas=frozenset({4}))
    v = Verdict(frozen=frozenset({1, 2}), discard=True, payload=d.encode(5))
    back = Verdict.decode(v.encode(5), 5)
    assert back == v and Decision.decode(back.payload, 5) == d
    with pytest.raises(FrameError, match="zeros and ones"):
        Verdict.decode(torch.full((16,), 0.5, dtype=torch.float64), 5)
    with pytest.raises(FrameError, match="zeros and ones"):
        Verdict.decode(torch.zeros(3, dtype=torch.float64), 5)
    adjacent = Decision(plan=Plan(bypassed=frozenset({1, 2}))).encode(5)
    with pytest.raises(FrameError, match="impossible plan"):
        Decision.decode(adjacent, 5)


def test_an_accusation_outside_the_accusers_role_names_the_accuser():
    """Stage 5 cannot check stage 1 (it holds no replica of it and sees none of its messages):
    an honest stage never raises that alert, so the coordinator blames stage 5, not 1; the
    trusted ends are never blamed for their own rows."""
    c = Coordinator(DefenseConfig(verify="duplicate", recovery="none"), 7)
    assert _d(c.decide(_seen(7, (5, 1))), 7).blamed == {5}
    v = c.decide(_seen(7, (2, 2), (3, 0)))  # self-accusation, an accusation of stage 0
    assert _d(v, 7).blamed == {2, 3}
    assert _d(c.decide(_seen(7, (0, 4), (6, 1))), 7).blamed == set()  # the ends' rows


def test_the_roles_follow_the_plan():
    n, plan = 7, Plan(bypassed=frozenset({2}))
    # 3 computes on 1's output: 1 checks 3's gradient, 4 its output; 2, bypassed for this
    # iteration, still checks 1 with its replica (nobody else can); quarantined, it does not
    assert designated(1, 3, plan, n) and designated(4, 3, plan, n)
    assert not designated(2, 3, plan, n) and designated(2, 1, plan, n)
    assert designated(0, 1, plan, n)  # with 2's evidence
    standing = Plan(bypassed=frozenset({2}), quarantined=frozenset({2}))
    assert not designated(2, 1, standing, n) and not designated(0, 1, standing, n)
    assert not designated(3, 2, plan, n)  # a stage out of the path is accused by nobody
    assert designated(1, 4, plan, n)  # 4 holds 3's replica: its evidence goes to 1
    assert designated(0, 1, Plan(), n) and designated(2, 1, Plan(), n)
    assert designated(0, 2, Plan(), n)  # the evidence of 2 (the replica of 1) goes to 0
    assert designated(3, 1, Plan(), n)  # 3 receives 1's jumped output
    assert not designated(4, 1, Plan(), n)


def test_control_values_that_are_no_numbers_name_their_sender_and_never_stop_the_run():
    c = Coordinator(DefenseConfig(verify="duplicate", recovery="none"), 6)
    assert _d(c.decide(_seen(6, norms={3: math.nan})), 6).blamed == {3}
    seen = _seen(6)
    seen.reports[2, 4] = -1.0  # a negative alert count
    seen.reports[4, 1] = math.inf
    assert _d(c.decide(seen), 6).blamed == {2, 4}
    # a squared norm its replica contradicts (a huge one would turn every update to nothing)
    assert _d(c.decide(_seen(6, norms={2: 1e30})), 6).blamed == {2}
    assert _d(c.decide(_seen(6, replica={3: -1.0})), 6).blamed == {3}
    assert _d(c.decide(_seen(6, replica={3: math.nan})), 6).blamed == set()  # vouches for none
    assert _d(c.decide(_seen(6, replica={3: 2.0})), 6).blamed == {2}
