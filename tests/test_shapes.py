"""The data owner's announcement of each micro-batch's shape: sent with every activation of
stage 0, to the stages that check a middle stage, and read there; what is not two positive
whole numbers is ignored (nothing is checked against it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from phalanx.comm import LocalFabric
from phalanx.defense.links import Inbox
from phalanx.defense.shapes import Announce, Shapes, announced_to
from phalanx.wire import DEFAULT_LIMITS, Frame, Kind


def test_the_stages_told_are_the_checkers_that_hear_from_no_trusted_stage():
    assert announced_to(4) == [] and announced_to(6) == [3, 4] and announced_to(8) == [3, 4, 5, 6]


def _pair(tag: int = 0):  # noqa: ANN202
    fabric = LocalFabric(4, DEFAULT_LIMITS)
    zero, three = fabric.channels(0), fabric.channels(3)
    out = Announce(zero[1], {3: zero[3]}, lambda: tag)
    return out, Shapes(Inbox(three[0], Kind.SHAPE, lambda: tag), lambda: 5, None), three[0]


def test_every_activation_of_stage_0_announces_its_batch_and_seq_with_the_attempt():
    out, shapes, _ = _pair(tag=2)
    out.send(Frame(kind=Kind.ACTIVATION, step=5, micro=1, src=0, dst=1,
                   tensor=torch.zeros(2, 7, 4)))
    assert shapes.ready(1) and shapes.rows(1) == (2, 7)
    assert not shapes.ready(0)  # (nothing for a micro-batch that was not sent)


def test_other_frames_announce_nothing():
    out, shapes, _ = _pair()
    out.send(Frame(kind=Kind.TIED_WEIGHT, step=5, micro=0, src=0, dst=1, tensor=torch.zeros(3)))
    assert not shapes.ready(0)


@pytest.mark.parametrize("bad", [torch.tensor([2, 0]), torch.tensor([2.0, 7.0]),
                                 torch.tensor([2, 7, 1])], ids=["zero", "float", "three"])
def test_an_announcement_that_is_not_two_positive_whole_numbers_is_ignored(bad):
    fabric = LocalFabric(4, DEFAULT_LIMITS)
    fabric.channels(0)[3].send(Frame(kind=Kind.SHAPE, step=5, micro=0, src=0, dst=3,
                                     tensor=bad))
    shapes = Shapes(Inbox(fabric.channels(3)[0], Kind.SHAPE, lambda: 0), lambda: 5, None)
    assert shapes.ready(0) and shapes.rows(0) is None


@pytest.mark.slow
def test_six_processes_announce_shapes_and_name_only_a_short_sender(tmp_path, six_layers):
    """Six processes over torch.distributed (unsigned links): stage 2 sends its output a
    position short; the announcements reach stages 3 and 4 across processes, and stage 2
    alone is named in every iteration, the repaired redo kept."""
    args = [f'model.name="{six_layers}"', "pipeline.stages=6", "pipeline.micro_batches=2",
            "train.batch_size=4", "train.steps=2", "train.eval_batches=1",
            "train.progress=false", "data.seq_len=16", 'pipeline.runtime="distributed"',
            'defense.verify="duplicate"', 'defense.recovery="repair"', 'attack.adaptive="short"',
            "attack.rate=1.0", "attack.stages=[2]", f'train.out_dir="{tmp_path}"']
    out = subprocess.run([sys.executable, "-m", "phalanx.cli", "train", *args],
                         capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    recs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["redone"][0]["blamed"] for r in recs] == [[2], [2]]
    assert [r["blamed"] for r in recs] == [[], []]
