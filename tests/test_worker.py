"""StageWorker: what a peer sends is checked before it is used; broken schedules are caught."""

from __future__ import annotations

import pytest
import torch

from phalanx.comm import LocalFabric
from phalanx.models import ModelConfig, load_model, partition
from phalanx.pipeline import Action, Op, StageWorker, simulate
from phalanx.pipeline.verdict import Verdict
from phalanx.wire import Frame, FrameError, Kind


@pytest.fixture()
def stages():
    lm = load_model(ModelConfig(name="tiny"))
    return partition(lm.model, lm.family, 3)


def _middle(stages):  # noqa: ANN001, ANN202
    fabric = LocalFabric(3)
    worker = StageWorker(stages[1], fabric.channels(1), timeout=2.0)
    return worker, fabric.channel(0, 1), fabric.channel(2, 1)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.zeros(2, 8, 63), "expected \\(batch, seq, 64\\)"),
        (torch.zeros(2, 8), "expected \\(batch, seq, 64\\)"),
        (torch.zeros(2, 8, 64, dtype=torch.float64), "float32"),
        (torch.zeros(2, 8, 64, dtype=torch.int64), "float32"),
    ],
)
def test_bad_activation_is_refused(stages, tensor, message):
    worker, from_prev, _ = _middle(stages)
    from_prev.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1, tensor=tensor))
    worker.begin(0, 1)
    with pytest.raises(FrameError, match=message):
        worker.execute(Action(Op.FORWARD, 0))


def test_bad_gradient_is_refused(stages):
    worker, from_prev, from_next = _middle(stages)
    from_prev.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1,
                         tensor=torch.randn(2, 8, 64)))
    worker.begin(0, 1)
    worker.execute(Action(Op.FORWARD, 0))
    from_next.send(Frame(kind=Kind.GRADIENT, step=0, micro=0, src=2, dst=1,
                         tensor=torch.randn(2, 8, 32)))
    with pytest.raises(FrameError, match="gradient of \\(2, 8, 32\\)"):
        worker.execute(Action(Op.BACKWARD, 0))


def test_labels_outside_vocabulary_are_refused(stages):
    fabric = LocalFabric(3)
    last = StageWorker(stages[2], fabric.channels(2), timeout=2.0)
    fabric.channel(1, 2).send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=1, dst=2,
                                    tensor=torch.randn(1, 4, 64)))
    fabric.channel(0, 2).send(Frame(kind=Kind.LABELS, step=0, micro=0, src=0, dst=2,
                                    tensor=torch.tensor([[1, 2, 3, 999]])))
    last.begin(0, 1)
    with pytest.raises(FrameError, match="outside the vocabulary"):
        last.execute(Action(Op.FORWARD, 0))


def test_stale_frames_are_dropped_and_waits_are_bounded(stages):
    from phalanx.comm import ChannelTimeout

    worker, from_prev, _ = _middle(stages)
    worker.timeout = 0.2
    from_prev.send(Frame(kind=Kind.ACTIVATION, step=3, micro=0, src=0, dst=1,
                         tensor=torch.randn(1, 4, 64)))
    worker.begin(5, 1)  # the frame of step 3 arrives during step 5: stale
    with pytest.raises(ChannelTimeout, match="waited 0.2 s for ACTIVATION"):
        worker.execute(Action(Op.FORWARD, 0))


def test_simulator_reports_a_deadlocked_schedule(stages):
    fabric = LocalFabric(3)
    workers = [StageWorker(s, fabric.channels(s.index), timeout=None) for s in stages]
    for w in workers:
        w.begin(0, 1, [torch.zeros(1, 4, dtype=torch.int64)] if w.me == 0 else None)
    plans = {0: [Action(Op.BACKWARD, 0)], 1: [Action(Op.FORWARD, 0)], 2: []}
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(workers, plans)


def test_timeout_message_names_a_control_tag_not_a_micro_batch(stages):
    """A control message's ``micro`` field is a tag; calling it a micro-batch misleads."""
    from phalanx.comm import ChannelTimeout

    worker, _, _ = _middle(stages)
    worker.timeout = 0.05
    worker.begin(4, 1)
    with pytest.raises(ChannelTimeout) as err:
        worker.take_control(0, 2)
    msg = str(err.value)
    assert "CONTROL message 2" in msg and "micro-batch" not in msg and "from stage 0" in msg
    with pytest.raises(ChannelTimeout, match="ACTIVATION of micro-batch 0 \\(step 4\\)"):
        worker.execute(Action(Op.FORWARD, 0))


def test_refused_frames_are_dropped_counted_and_the_stage_goes_on(stages, caplog):
    """A replayed frame, garbage bytes and a frame from far in the future: each is logged and
    counted against its sender, and the right frame that follows is still used."""
    import logging

    from phalanx.wire import encode

    fabric = LocalFabric(3)
    worker = StageWorker(stages[1], fabric.channels(1), timeout=5.0)
    prev = fabric.channel(0, 1)
    x = torch.randn(2, 8, 64)
    first = Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1, tensor=x)
    prev.send(first)  # seq 1
    worker.begin(0, 1)
    worker.channels[0].recv(1.0)  # consumed: a copy of it again is a replay
    inbox = worker.channels[0]
    inbox.inject(encode(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1, tensor=x,
                              seq=1)))
    inbox.inject(b"\x00" * 200)
    prev.send(Frame(kind=Kind.ACTIVATION, step=9, micro=0, src=0, dst=1, tensor=x))  # seq 2
    prev.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1, tensor=x))  # seq 3
    with caplog.at_level(logging.WARNING):
        worker.execute(Action(Op.FORWARD, 0))
    assert worker.rejected == {0: 3}
    assert "sequence number 1, expected 2" in caplog.text and "too far ahead" in caplog.text
    assert "bad magic" in caplog.text


@pytest.mark.parametrize("norm", [-99.0, float("nan"), float("inf")])
def test_a_norm_that_is_no_squared_norm_or_a_bad_report_is_refused_not_believed(stages, caplog,
                                                                                  norm):
    """A negative squared norm would shrink the global norm and turn clipping off, a NaN one
    used to freeze the run, a NaN count crashed the driver: now the sender is marked invalid
    for the coordinator, the step is skipped (no coordinator vouches for a norm), and the
    driver goes on."""
    from phalanx.pipeline.stats import StageStats

    fabric = LocalFabric(3)
    w0 = StageWorker(stages[0], fabric.channels(0), timeout=2.0)
    seen = []
    w0.coordinator = type("Seen", (), {"decide": lambda self, o: seen.append(o) or Verdict()})()
    w0.begin(0, 1, [torch.zeros(2, 8, dtype=torch.int64)])
    for p in (1, 2):
        t = torch.zeros(4, dtype=torch.float64)  # [norm, refusals by sender]; no report
        t[0] = norm if p == 1 else 1.0
        fabric.channel(p, 0).send(Frame(kind=Kind.NORM, step=0, micro=0, src=p, dst=0, tensor=t))
    with caplog.at_level("WARNING"):
        w0.execute(Action(Op.GATHER_NORM))
    assert seen[0].invalid == {1} and seen[0].norms[2] == 1.0
    assert w0.global_norm != w0.global_norm  # NaN: every stage skips this update
    assert "stage 1 sent a squared gradient norm" in caplog.text
    bad = torch.tensor([0.0, float("nan"), 0.0, 0.0, 0.0], dtype=torch.float64)
    with pytest.raises(FrameError, match="negative or non-finite"):
        StageStats.from_tensor(bad)


def test_one_flooding_peer_cannot_take_the_room_of_the_others(stages, monkeypatch):
    """A peer's backlog is bounded on its own: its excess is refused and counted against it,
    and another peer's frame still finds room."""
    from phalanx.pipeline import stash

    monkeypatch.setattr(stash, "PEER_FRAMES", 4)
    fabric = LocalFabric(3)
    w2 = StageWorker(stages[2], fabric.channels(2), timeout=5.0)
    w2.begin(0, 8)
    x = torch.randn(1, 8, 64)
    flooder = fabric.channel(1, 2)
    for m in range(8):  # stage 1 floods eight micro-batches at once
        flooder.send(Frame(kind=Kind.ACTIVATION, step=0, micro=m, src=1, dst=2, tensor=x))
    fabric.channel(0, 2).send(Frame(kind=Kind.LABELS, step=0, micro=0, src=0, dst=2,
                                    tensor=torch.zeros(1, 8, dtype=torch.int64)))
    assert not w2.ready(Action(Op.FORWARD, 7))  # the excess was refused, not stashed
    assert w2.rejected == {1: 4}
    assert w2.ready(Action(Op.FORWARD, 0))  # stage 0's label found room


def test_a_middle_stage_cannot_set_the_loss_with_its_report(stages):
    """Only the last stage computes the loss; a middle stage's report claiming one is not
    believed (it used to set the reported training and validation loss)."""
    from phalanx.pipeline.stats import IterationResult, StageStats

    res = IterationResult(stats=[StageStats(), StageStats(loss_sum=-1e6, loss_count=1),
                                 StageStats(loss_sum=6.0, loss_count=3)])
    assert res.loss == 2.0
