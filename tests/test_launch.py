"""The launcher and the distributed runtime as a user meets them: collective decisions taken
alike on every rank, stages that die with their launcher, failures reported per stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from phalanx.launch.supervisor import StageExit, describe_exit

TINY = ['model.name="tiny"', "data.seq_len=32", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=2", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=1",
        'pipeline.runtime="distributed"', "pipeline.timeout_s=30"]


STAGES = 3  # a first, a middle and a last stage: each kind of process, one process each


def _cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phalanx.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "phalanx.cli", "train", *TINY, f"pipeline.stages={STAGES}",
         "train.steps=100000", f'train.out_dir="{out}"', *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stages_training(launcher: subprocess.Popen, out: Path, timeout: float = 90) -> list:
    """The launcher's stage processes, once training is under way (bounded wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            kids = psutil.Process(launcher.pid).children()
            if len(kids) == STAGES:
                return kids
        if launcher.poll() is not None:
            pytest.fail(f"the run ended early: {launcher.stderr.read()[-2000:]}")
        time.sleep(0.2)
    launcher.kill()
    pytest.fail("training did not start in time")


def _gone(procs: list, timeout: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


@pytest.mark.slow
def test_periodic_checkpoints_of_a_three_process_run_complete_and_resume(tmp_path):
    """The replica sync before a checkpoint is a collective decision: the middle ranks, which
    hold no tied weight, used to skip it and the run hung at its first checkpoint."""
    out = tmp_path / "run"
    args = [*TINY, "pipeline.stages=3", "train.checkpoint_every=1", f'train.out_dir="{out}"']
    r = _cli("train", *args, "train.steps=2", timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "stale" not in r.stderr
    for step in (1, 2):
        manifest = json.loads((out / "checkpoints" / f"step_{step}" / "manifest.json").read_text())
        assert manifest["step"] == step and set(manifest["stages"]) == {"0", "1", "2"}
    r = _cli("train", "--resume", *args, "train.steps=3", timeout=150)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["resumed_from"] == 2


@pytest.mark.slow
def test_killing_the_launcher_kills_every_stage(tmp_path):
    """``kill -9`` of ``phalanx train`` used to leave its stages training as orphans."""
    out = tmp_path / "run"
    launcher = _start(out)
    stages = _stages_training(launcher, out)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait(timeout=10)
    assert _gone(stages, timeout=15), [p.pid for p in stages if p.is_running()]
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_a_stage_that_dies_is_named_with_its_step_and_the_others_stop(tmp_path):
    out = tmp_path / "run"
    launcher = _start(out)
    stages = _stages_training(launcher, out)
    victim = next(p for p in stages if p.environ().get("RANK") == "1")
    victim.send_signal(signal.SIGKILL)
    try:
        _, err = launcher.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        launcher.kill()
        pytest.fail("the launcher did not end after a stage died")
    assert launcher.returncode != 0
    assert _gone(stages, timeout=15)
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    first = next(ln for ln in lines if "failed first" in ln)
    assert "stage 1 failed first: killed by SIGKILL during step" in first
    for other in (0, 2):
        assert any(ln.strip().startswith(f"stage {other}:") for ln in lines), err
    assert (out / "failure.log").is_file()


@pytest.mark.slow
def test_bad_input_found_by_a_stage_is_one_line_exit_2(tmp_path):
    """``phalanx launch`` runs no preflight: stage 0 finds the corpus too small itself, and its
    peers stop with it; the user still gets the one line, not a traceback per process."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world")
    r = _cli("launch", "--nproc", "2", "--", "train", *TINY, "pipeline.stages=2",
             f'data.corpus="{corpus}"', f'train.out_dir="{tmp_path / "run"}"', timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        f"phalanx: error: data.corpus='{corpus}' yields 12 tokens, too few for two sequences "
        "of data.seq_len=32"]


def test_distributed_run_with_a_tiny_corpus_fails_before_spawning(tmp_path, cli, monkeypatch):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("hello world")
    import phalanx.launch

    def no_spawn(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("a stage process was started")
    monkeypatch.setattr(phalanx.launch, "spawn", no_spawn)
    code, err = cli("train", *TINY, "pipeline.stages=4", f'data.corpus="{corpus}"')
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [
        f"phalanx: error: data.corpus='{corpus}' yields 12 tokens, too few for two sequences "
        "of data.seq_len=32"]


def test_corpus_too_small_for_the_batch_fails_before_spawning(tmp_path, cli):
    corpus = tmp_path / "small.txt"
    corpus.write_text("some words of text " * 20)  # 380 bytes: 11 sequences of 32
    code, err = cli("train", *TINY, "pipeline.stages=2", f'data.corpus="{corpus}"',
                    "train.batch_size=12", "pipeline.micro_batches=2")
    assert code == 2 and "exceeds the" in err and "Traceback" not in err


def test_warmup_longer_than_the_run_is_warned_once(tmp_path):
    r = _cli("train", *TINY[:-2], "pipeline.stages=2", "train.steps=3", "optim.warmup_steps=10",
             "train.save=false", f'train.out_dir="{tmp_path}"', timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    warns = [ln for ln in r.stderr.splitlines() if "warning" in ln]
    assert warns == ["phalanx: warning: optim.warmup_steps=10 is longer than train.steps=3: the "
                     "learning rate never reaches optim.lr=0.001 (it peaks at 0.0003); lower "
                     "optim.warmup_steps"]


@pytest.mark.parametrize(
    ("exit_", "words"),
    [
        (StageExit(1, -9, 3, {"phase": "training", "step": 7}), "killed by SIGKILL during step 7"),
        (StageExit(0, 1, 4, {"phase": "failed", "during": "checkpointing", "step": 5,
                             "error": "ChannelClosed: stage 1 closed the link"}),
         "exited with code 1 while checkpointing after step 5: ChannelClosed: stage 1 closed "
         "the link"),
        (StageExit(3, -15, 5, {"phase": "training", "step": 2}, stopped=True),
         "stopped by the launcher during step 2"),
        (StageExit(2, 1, 5, None), "exited with code 1"),
        (StageExit(2, 0, 5, {"phase": "done", "step": 9}), "finished"),
    ],
)
def test_describe_exit(exit_, words):
    assert describe_exit(exit_) == words


def test_launcher_environment_needs_no_torchrun():
    """The stages rendezvous through env:// on loopback; torchrun (whose elastic rendezvous
    unpickles from an unauthenticated store) is not involved."""
    from phalanx.launch.supervisor import stage_env

    env = stage_env(1, 4, 29511, Path("/tmp/x"))
    assert (env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == (
        "1", "4", "127.0.0.1", "29511")
    assert env["PHALANX_LAUNCHER_PID"] == str(os.getpid())


def test_the_culprit_is_the_stage_whose_failure_was_not_a_closed_link():
    """A peer of the failing stage often exits first (its link closed at once, while the
    failing stage still unwinds); the report must still name the stage that failed."""
    from phalanx.launch.supervisor import Launch

    launch = Launch(3, [])
    try:
        follower = StageExit(1, 1, 1, {"phase": "failed", "during": "training", "step": 3,
                                       "error": "ChannelClosed: stage 0 closed the link",
                                       "time": 1.0})
        bad = StageExit(0, 2, 2, {"phase": "failed", "during": "starting", "user_error": True,
                                  "error": "PhalanxError: data.corpus is empty", "time": 2.0})
        ok = StageExit(2, -15, 3, {"phase": "training", "step": 3}, stopped=True)
        out = launch._outcome([bad, follower, ok], timed_out=False, timeout=None)
        assert (out.code, out.report) == (2, "data.corpus is empty")
        crash = StageExit(2, -9, 2, {"phase": "training", "step": 3, "time": 0.5})
        out = launch._outcome([follower, crash], timed_out=False, timeout=None)
        assert out.code == 1 and out.report.startswith(
            "stage 2 failed first: killed by SIGKILL during step 3")
    finally:
        launch.close()
