"""The Trainer and the CLI: metrics, summaries, checkpoints, exact resume, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phalanx.config import load_config
from phalanx.errors import PhalanxError
from phalanx.train import Config, Trainer

TINY = ['model.name="tiny"', "data.seq_len=32", "train.batch_size=4", "pipeline.micro_batches=2",
        "train.eval_batches=2", "train.progress=false", "optim.lr=1e-3", "optim.warmup_steps=2"]


def _train(out: Path, extra: list[str], resume: bool = False) -> dict:
    cfg = load_config(Config, None, [*TINY, f'train.out_dir="{out}"', *extra])
    trainer = Trainer(cfg, resume=resume)
    try:
        return trainer.run()
    finally:
        trainer.close()


def _losses(out: Path) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_metrics_summary_and_checkpoint(tmp_path):
    s = _train(tmp_path, ["pipeline.stages=2", "train.steps=4", "train.eval_every=2"])
    recs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    assert all(len(r["compute_s"]) == 2 and len(r["wait_s"]) == 2 for r in recs)
    assert recs[0]["lr"] == pytest.approx(5e-4) and recs[1]["lr"] == pytest.approx(1e-3)
    assert "val_loss" in recs[1]
    for key in ("val_ppl_start", "val_ppl_end", "tokens_per_s", "peak_rss_mb"):
        assert s[key] > 0
    assert s["val_ppl_end"] < s["val_ppl_start"]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 4
    manifest = json.loads((tmp_path / "checkpoints" / "step_4" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"0", "1"}
    out = _cli("report", str(tmp_path))
    assert out.returncode == 0 and "validation perplexity after" in out.stdout
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


QUARANTINE = ['attack.forward="scale"', "attack.strength=4", "attack.rate=1.0",
              "attack.stages=[1]", 'defense.verify="duplicate"', "defense.quarantine_after=1"]


@pytest.mark.parametrize("defended", [False, True])
def test_resume_continues_exactly(tmp_path, defended):
    """Also with a stage in quarantine: the checkpoint keeps it bypassed after the resume."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["pipeline.stages=4", "train.steps=6", "train.checkpoint_every=3",
             *(QUARANTINE if defended else [])]
    _train(full, extra)
    # an interrupted run: the same run directory as it stood after the step-3 checkpoint
    part.mkdir()
    shutil.copytree(full / "checkpoints" / "step_3", part / "checkpoints" / "step_3")
    (part / "checkpoints" / "latest.json").write_text('{"checkpoint": "step_3"}')
    lines = (full / "metrics.jsonl").read_text().splitlines()[:3]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    s = _train(part, extra, resume=True)
    assert _losses(part) == _losses(full)  # bitwise: same batches, weights, optimizer state
    assert s["resumed_from"] == 3


def test_corrupt_checkpoint_is_refused(tmp_path):
    _train(tmp_path, ["pipeline.stages=2", "train.steps=1"])
    f = tmp_path / "checkpoints" / "step_1" / "stage_1.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(PhalanxError, match="does not match its hash"):
        _train(tmp_path, ["pipeline.stages=2", "train.steps=2"], resume=True)


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phalanx.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "pipeline.stagez=2"], "unknown config key"),
        (["train", "train.steps=many"], "must be an integer"),
        (["train", 'model.name="/no/such/model"'], "not found"),
        (["train", 'model.name="tiny"', "pipeline.stages=9"], "more than the model's 4 layers"),
        (["train", 'model.name="tiny"', 'data.corpus="/no/such/corpus"'], "does not exist"),
        (["train", "--config", "/no/such.toml"], "does not exist"),
        (["launch", "--nproc", "2"], "give the command"),
        (["train", "--resume", 'model.name="tiny"', 'pipeline.runtime="distributed"',
          'train.out_dir="/no/such/run"'], "no checkpoint to resume from"),
        (["train", 'model.name="tiny"', 'data.corpus=""'], "data.corpus is empty"),
        (["report", "/no/such/run"], "not a finished run directory"),
        (["train", 'model.name="tiny"', "pipeline.stages=2", 'defense.verify="duplicate"'],
         "at least 3 stages"),
        (["train", 'model.name="tiny"', "pipeline.stages=4", 'attack.forward="sign_flip"',
          "attack.rate=0.5", "attack.stages=[0]"], "trusted data owner"),
        (["train", 'model.name="tiny"', "pipeline.stages=4", 'attack.forward="sign_flip"',
          "attack.rate=1.5"], "must be in [0, 1]"),
        (["train", 'model.name="tiny"', "pipeline.stages=2", 'attack.backward="gaussian"',
          "attack.rate=0.3"], "at least 3 stages"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(args, message, capsys):
    """In this process (the same ``main`` the console script runs; any other exception would
    propagate as a traceback); the process-level exit is checked once, below."""
    from phalanx.cli.main import main

    assert main(list(args)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_bad_input_exits_the_process_with_2_and_one_line():
    out = _cli("train", 'model.name="tiny"', "pipeline.stages=9")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_cli_unknown_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    out = _cli("train", f'model.name="{tmp_path}"')
    assert out.returncode == 2 and "not supported" in out.stderr


@pytest.mark.slow
def test_distributed_training_started_by_launch_matches_local(tmp_path):
    """`phalanx launch` starts one `phalanx train` process per stage over gloo, and they train
    exactly as the simulator (`phalanx train` spawning its own processes: the attacked test
    below)."""
    launcher = ["launch", "--nproc", "2", "--"]
    args = [*TINY, "pipeline.stages=2", "train.steps=3"]
    out_dir = f'train.out_dir="{tmp_path / "d"}"'
    out = _cli(*launcher, "train", *args, 'pipeline.runtime="distributed"', out_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    _train(tmp_path / "l", ["pipeline.stages=2", "train.steps=3"])
    assert _losses(tmp_path / "d") == pytest.approx(_losses(tmp_path / "l"), rel=1e-6)
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert len(s["peak_rss_mb_per_process"]) == 2


@pytest.mark.slow
def test_attacked_training_is_the_same_in_both_runtimes(tmp_path):
    """A poisoning attack wraps the malicious stage's links in either runtime, with the same
    effect: the distributed run's losses equal the simulator's, and both differ from clean."""
    args = [*TINY, "pipeline.stages=3", "train.steps=3", 'attack.forward="sign_flip"',
            "attack.rate=1.0", 'attack.backward="gaussian"']
    out = _cli("train", *args, 'pipeline.runtime="distributed"',
               f'train.out_dir="{tmp_path / "d"}"')
    assert out.returncode == 0, out.stderr[-2000:]
    _train(tmp_path / "l", args[len(TINY):])
    _train(tmp_path / "c", ["pipeline.stages=3", "train.steps=3"])
    assert _losses(tmp_path / "d") == pytest.approx(_losses(tmp_path / "l"), rel=1e-6)
    assert _losses(tmp_path / "l")[0] != pytest.approx(_losses(tmp_path / "c")[0])
    recs = [json.loads(r) for r in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["malicious"] == [1] for r in recs)  # 3 stages: stage 1 is the only middle one
    s = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert len(s["peak_rss_mb_per_process"]) == 3  # one process per stage, spawned by train
