"""The declared hostile network: each fault does what it says, refused frames are logged and
counted while the run goes on, and lost frames surface as bounded timeouts naming the stage."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from phalanx.comm.faults import Fault, parse_fault
from phalanx.config import load_config
from phalanx.errors import ConfigError
from phalanx.train import Config
from phalanx.train.setup import build_pipeline

BASE = ['model.name="tiny"', "pipeline.stages=3", "pipeline.micro_batches=2",
        "train.batch_size=4", "data.seq_len=16", "optim.lr=1e-3", "optim.warmup_steps=0"]


def _losses(extra: list[str], steps: int = 3):  # noqa: ANN202
    import torch

    from phalanx.train.attempts import attempts

    pipe = build_pipeline(load_config(Config, None, [*BASE, *extra]), steps)
    batch = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = [attempts(pipe.runtime, pipe.attack, s, batch, 3) for s in range(steps)]
    pipe.results = [r[0][0] for r in runs]  # each iteration's first attempt
    return pipe, [r[-1][0].loss for r in runs]  # and the loss of the one kept


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ("drop 5% 1->2", Fault("drop", 1, 2, rate=0.05)),
        ("delay 200ms 2->1", Fault("delay", 2, 1, delay_s=0.2)),
        ("replay 0->1 at step 4", Fault("replay", 0, 1, step=4)),
        ("reorder 1 -> 2", Fault("reorder", 1, 2)),
        ("corrupt 100% 1->2", Fault("corrupt", 1, 2, rate=1.0)),
    ],
)
def test_fault_declarations(text, fault):
    assert parse_fault(text, 3) == fault


@pytest.mark.parametrize(
    ("text", "message"),
    [("drop 1->2", "takes a percentage"), ("delay 5% 1->2", "takes a delay in ms"),
     ("replay 1->2", "at step K"), ("drop 150% 1->2", "0 to 100"), ("drop 5% 1->7", "no link"),
     ("flood 1->2", "is not a fault")],
)
def test_bad_fault_declarations(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_fault(text, 3)


def test_bad_fault_on_the_command_line_is_one_line_exit_2(cli):
    code, err = cli("train", *BASE, 'faults.links=["drop 5% 1->9"]')
    assert code == 2 and "no link 1->9" in err and "Traceback" not in err


def test_delays_change_nothing_but_time():
    _, clean = _losses([])
    _, delayed = _losses(['faults.links=["delay 20ms 0->1", "delay 20ms 2->1"]'])
    assert delayed == clean


def test_a_replayed_frame_is_refused_counted_and_the_run_goes_on(caplog):
    _, clean = _losses([])
    with caplog.at_level("WARNING"):
        pipe, replayed = _losses(['faults.links=["replay 0->1 at step 1"]'])
    assert replayed == clean
    assert pipe.runtime.workers[1].rejected == {0: 1}
    assert "replayed, reordered or lost" in caplog.text
    # reported upward: stage 0's view of each iteration says who sent what was refused
    refused = [r.refused.tolist() for r in pipe.results]
    assert [sum(map(sum, t)) for t in refused] == [0, 1, 0] and refused[1][1][0] == 1


def test_network_corruption_without_integrity_is_caught_by_the_duplicated_block():
    """Over links without integrity a flipped bit arrives; the replica at stage 2 sees stage 1's
    message disagree with its recomputation in every micro-batch (and, with no other evidence,
    blames the sender: the secure transport is what keeps the network from framing a stage)."""
    _, clean = _losses([])
    pipe, repaired = _losses(['faults.links=["corrupt 100% 1->2"]', 'defense.verify="duplicate"',
                              'defense.recovery="repair"'])
    by_suspect = [{i: int(c) for i, c in enumerate(pipe.defense.alerts(r).sum(0).tolist()) if c}
                  for r in pipe.results]
    assert by_suspect == [{1: 2}] * 3  # both micro-batches of every step
    assert repaired == clean  # and repair replaces what the network corrupted


def test_reordered_frames_stall_the_simulator_with_the_waiting_actions_named():
    with pytest.raises(RuntimeError, match="deadlock"):
        _losses(['faults.links=["reorder 1->2"]'])


@pytest.mark.slow
def test_a_link_that_drops_everything_times_out_naming_the_silent_stage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "phalanx.cli", "train", *BASE,
                        'pipeline.runtime="distributed"', "pipeline.timeout_s=4",
                        "train.eval_batches=1", "train.steps=2", "train.progress=false",
                        'faults.links=["drop 100% 1->2"]', f'train.out_dir="{tmp_path}"'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    # every stage then waits on another within the same 4 s, so which timeout fires first (and
    # which stages see a closed link instead) is a race; a bounded timeout naming a peer is not
    assert re.search(r"stage \d waited 4 s for \w+ .*from stage \d", r.stderr), r.stderr


def test_a_dropping_link_is_a_bounded_timeout_naming_the_silent_peer():
    """The same, deterministic: one worker, its link from stage 0 losing every frame."""
    import torch

    from phalanx.comm import ChannelTimeout, LocalFabric
    from phalanx.comm.faults import with_faults
    from phalanx.models import ModelConfig, load_model, partition
    from phalanx.pipeline import Action, Op, StageWorker
    from phalanx.wire import Frame, Kind

    lm = load_model(ModelConfig(name="tiny"))
    stages = partition(lm.model, lm.family, 3)
    fabric = LocalFabric(3)
    sender = with_faults(fabric.channels(0), 0, [parse_fault("drop 100% 0->1", 3)], 0)[1]
    sender.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1,
                      tensor=torch.zeros(2, 8, 64)))
    worker = StageWorker(stages[1], fabric.channels(1), timeout=0.5)
    worker.begin(0, 1)
    with pytest.raises(ChannelTimeout, match="waited 0.5 s for ACTIVATION of micro-batch 0 "
                                              "\\(step 0\\) from stage 0"):
        worker.execute(Action(Op.FORWARD, 0))


def test_refused_frames_are_written_to_the_metrics_against_their_sender(tmp_path):
    import json

    from phalanx.train import Trainer

    cfg = load_config(Config, None, [*BASE, "train.steps=3", "train.eval_every=0",
                                     "train.progress=false", f'train.out_dir="{tmp_path}"',
                                     'faults.links=["replay 0->1 at step 1"]'])
    trainer = Trainer(cfg)
    try:
        trainer.run()
    finally:
        trainer.close()
    recs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("refused") for r in recs] == [None, {"0": 1}, None]
