"""Devices: every stage's device and the backend follow from the config and the host alike on
every rank; what the host cannot do is a one-line error naming the fix. CUDA-only tests skip
on a host without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from phalanx.comm import LocalFabric
from phalanx.comm.device import OnDevice, on_device
from phalanx.errors import ConfigError
from phalanx.pipeline.devices import choose_backend, own_gpus, stage_devices
from phalanx.wire import Frame, Kind

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
D = torch.device


@pytest.mark.parametrize(
    ("spec", "stages", "gpus", "want"),
    [
        ("auto", 3, 0, [D("cpu")] * 3),
        ("cpu", 2, 4, [D("cpu")] * 2),
        ("auto", 4, 1, [D("cuda", 0)] * 4),  # four stages share the one GPU
        ("cuda", 4, 2, [D("cuda", 0), D("cuda", 1), D("cuda", 0), D("cuda", 1)]),
        ("cuda:1", 2, 2, [D("cuda", 1)] * 2),
        ("CUDA:0", 1, 1, [D("cuda", 0)]),
    ],
)
def test_stage_devices(spec, stages, gpus, want):
    assert stage_devices(spec, stages, gpus) == want


@pytest.mark.parametrize(
    ("spec", "gpus", "message"),
    [
        ("cuda", 0, "has no CUDA GPU"),
        ("cuda:0", 0, "has no CUDA GPU"),
        ("cuda:3", 1, "has 1 GPU\\(s\\), cuda:0 to cuda:0"),
        ("cuda:x", 1, "is not a device"),
        ("tpu", 1, "is unknown"),
    ],
)
def test_impossible_devices_are_refused_with_the_fix(spec, gpus, message):
    with pytest.raises(ConfigError, match=message):
        stage_devices(spec, 2, gpus)


def test_nccl_only_where_every_stage_has_its_own_gpu():
    shared = stage_devices("cuda", 4, 1)
    own = stage_devices("cuda", 2, 2)
    assert not own_gpus(shared) and own_gpus(own)
    assert not own_gpus(stage_devices("cpu", 2, 2))
    assert choose_backend("auto", shared) == "gloo"
    assert choose_backend("auto", stage_devices("cpu", 2, 0)) == "gloo"
    assert choose_backend("gloo", own) == "gloo"
    with pytest.raises(ConfigError, match="needs one GPU per stage.*use pipeline.backend=gloo"):
        choose_backend("nccl", shared)


def test_cli_refuses_a_missing_gpu_in_one_line(cli):
    if torch.cuda.device_count() > 3:
        pytest.skip("this host has a cuda:3")
    code, err = cli("train", 'model.name="tiny"', 'pipeline.device="cuda:3"', "pipeline.stages=2")
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "pipeline.device=cuda:3" in err


def test_on_device_leaves_control_values_in_host_memory():
    fabric = LocalFabric(2)
    a, b = fabric.channels(0)[1], OnDevice(fabric.channels(1)[0], torch.device("meta"))
    a.send(Frame(kind=Kind.NORM, step=0, micro=0, src=0, dst=1, tensor=torch.ones(3).double()))
    a.send(Frame(kind=Kind.ACTIVATION, step=0, micro=0, src=0, dst=1, tensor=torch.ones(2, 2)))
    assert b.recv(1.0).tensor.device.type == "cpu"
    assert b.recv(1.0).tensor.device.type == "meta"  # pipeline data lands on the stage's device
    assert on_device({1: a}, torch.device("cpu")) == {1: a}


@cuda
def test_local_pipeline_on_the_gpu_equals_the_cpu():
    from phalanx.models import ModelConfig, load_model, partition
    from phalanx.pipeline import LocalRuntime, OptimConfig, PipelineConfig

    batch = torch.randint(0, 256, (4, 16))
    losses = {}
    for device in ("cpu", "cuda"):
        m = load_model(ModelConfig(name="tiny"))
        rt = LocalRuntime(partition(m.model, m.family, 4),
                          PipelineConfig(stages=4, micro_batches=2, device=device),
                          OptimConfig(), 2)
        losses[device] = [rt.train_step(s, batch).loss for s in range(2)]
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-4)


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "phalanx.cli", "check", "gpu", *args],
                          capture_output=True, text=True, timeout=300)


def test_check_gpu_runs_its_whole_path_on_the_cpu():
    """The same checks and training as on a GPU, with --device cpu: every record equal."""
    r = _check("--device", "cpu", "--model", "tiny", "--stage-counts", "2,3", "--runtimes",
               "local", "--train-steps", "2", "--seq-len", "32", "--precision", "bf16")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert [(c["stages"], c["schedule"]) for c in rec["checks"]] == [
        (2, "gpipe"), (2, "1f1b"), (3, "gpipe"), (3, "1f1b")]
    assert rec["all_ok"] and rec["loss_equal"] and rec["max_rel_grad_diff"] <= 1e-5
    assert rec["precision"] == "bf16" and rec["train"]["tokens_per_s"] > 0
    assert rec["train"]["peak_gpu_mb"] == 0.0 and rec["device_name"] == "cpu"


def test_check_gpu_without_a_gpu_is_one_line_exit_2(cli):
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    code, err = cli("check", "gpu")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "needs a CUDA GPU" in err and "--device cpu" in err


@cuda
def test_check_gpu_on_the_gpu():
    r = _check("--model", "tiny", "--train-steps", "3", "--seq-len", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["all_ok"] and rec["train"]["peak_gpu_mb"] > 0
