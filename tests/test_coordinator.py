"""The coordinator's decisions and the verdict's wire format, worked out by hand."""

from __future__ import annotations

import pytest
import torch

from phalanx.defense.config import DefenseConfig
from phalanx.defense.coordinator import Coordinator
from phalanx.pipeline.verdict import Verdict
from phalanx.wire import FrameError


def _alerts(n: int, *pairs: tuple[int, int]) -> torch.Tensor:
    a = torch.zeros(n, n, dtype=torch.float64)
    for v, s in pairs:
        a[v, s] += 1
    return a


def test_blame_names_the_suspect_and_skip_freezes_it_its_verifier_and_the_stage_before():
    c = Coordinator(DefenseConfig(verify="duplicate"), 6)
    v = c.decide(0, _alerts(6, (3, 2), (1, 2)))  # forward check at 3, backward check at 1
    assert v.blamed == {2} and v.frozen == {1, 2, 3} and not v.discard
    v = c.decide(1, _alerts(6, (5, 4)))  # the verifier is the trusted last stage: it steps
    assert v.blamed == {4} and v.frozen == {3, 4}
    v = c.decide(2, _alerts(6))
    assert v == Verdict()
    assert c.blame_count == [0, 0, 1, 0, 1, 0]
    assert c.reputation[2] == pytest.approx(0.9 * 0.9 * 0.9 + 0.1 * 0.9 + 0.1)  # 1 → .9 → .91..


def test_restart_discards_and_none_only_reports():
    v = Coordinator(DefenseConfig(verify="duplicate", recovery="restart"), 4).decide(
        0, _alerts(4, (2, 1)))
    assert v.discard and v.frozen == set() and v.blamed == {1}
    v = Coordinator(DefenseConfig(verify="duplicate", recovery="none"), 4).decide(
        0, _alerts(4, (2, 1)))
    assert not v.discard and v.frozen == set() and v.blamed == {1}


def test_quarantine_after_k_blames_in_2k_steps_and_never_next_to_another():
    c = Coordinator(DefenseConfig(verify="duplicate", quarantine_after=2), 6)
    assert c.decide(0, _alerts(6, (3, 2))).quarantined == set()
    assert c.decide(1, _alerts(6)).quarantined == set()
    v = c.decide(2, _alerts(6, (3, 2)))  # 2 blames within the last 4 iterations
    assert v.quarantined == {2} and 2 in v.frozen
    # its word no longer counts: alerts it raises, or that rest on its replica, are ignored
    assert c.decide(3, _alerts(6, (2, 1), (1, 2), (3, 2))).blamed == set()
    c.decide(4, _alerts(6, (4, 3)))
    v = c.decide(5, _alerts(6, (4, 3)))  # stage 3 is next to a quarantined stage: skip only
    assert v.blamed == {3} and v.quarantined == {2} and v.frozen == {2, 3, 4}


def test_verdict_round_trip_and_malformed_verdicts_are_refused():
    v = Verdict(frozen=frozenset({1, 2}), quarantined=frozenset({2}), discard=True,
                blamed=frozenset({2}))
    assert Verdict.decode(v.encode(5), 5) == v
    with pytest.raises(FrameError, match="zeros and ones"):
        Verdict.decode(torch.full((16,), 0.5, dtype=torch.float64), 5)
    with pytest.raises(FrameError, match="zeros and ones"):
        Verdict.decode(torch.zeros(3, dtype=torch.float64), 5)


def test_an_accusation_outside_the_accusers_neighbours_names_the_accuser():
    """Stage 4 cannot check stage 1 (it holds no replica of it and sees none of its messages):
    an honest stage never raises that alert, so the coordinator blames stage 4, not 1; the
    trusted ends are never blamed for their own rows."""
    c = Coordinator(DefenseConfig(verify="duplicate", quarantine_after=1), 6)
    v = c.decide(0, _alerts(6, (4, 1)))
    assert v.blamed == {4} and 1 not in v.frozen
    v = c.decide(1, _alerts(6, (2, 2), (3, 0)))  # self-accusation, an accusation of stage 0
    assert v.blamed == {2, 3}
    assert c.decide(2, _alerts(6, (0, 3), (5, 1))).blamed == set()  # the ends: not middle stages
