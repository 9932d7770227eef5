"""The engine's first test: with dropout off, pipeline training equals single-process training.

Every schedule, stage count and runtime: same loss, same gradients (max rel. diff <= 1e-5), and
after several optimizer steps (AdamW, warm-up, global-norm clipping) the same parameters.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from phalanx.models import ModelConfig, load_model, partition
from phalanx.pipeline import LocalRuntime, OptimConfig, PipelineConfig
from phalanx.pipeline.optim import lr_factor, param_groups
from phalanx.train.equivalence import TOLERANCE, max_rel_diff, pipeline_grads, reference_step

BATCH = torch.randint(0, 257, (8, 24), generator=torch.Generator().manual_seed(1))


def _runtime(name: str, stages: int, schedule: str, opt: OptimConfig, steps: int = 10):
    loaded = load_model(ModelConfig(name=name))
    ref = copy.deepcopy(loaded.model)
    parts = partition(loaded.model, loaded.family, stages)
    cfg = PipelineConfig(stages=stages, schedule=schedule, micro_batches=4)
    return ref, LocalRuntime(parts, cfg, opt, steps)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_one_step_loss_and_gradients(name, stages, schedule):
    ref, rt = _runtime(name, stages, schedule, OptimConfig())
    loss_ref, grads_ref = reference_step(ref, BATCH)
    res = rt.train_step(0, BATCH, optimize=False)
    rel, where = max_rel_diff(grads_ref, pipeline_grads(rt))
    assert abs(res.loss - loss_ref) <= TOLERANCE * abs(loss_ref)
    assert rel <= TOLERANCE, where
    # the tied embedding: stage 0 owns it and holds g_embedding + g_head (checked above against
    # the unsplit model); the last stage's replica has handed its gradient over
    if stages > 1:
        assert rt.workers[-1].stage.head.weight.grad is None
        assert "0:" + rt.workers[0].stage.names["embed.weight"] in pipeline_grads(rt)


def _reference_training(model, opt_cfg: OptimConfig, batches, total):  # noqa: ANN001, ANN202
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), opt_cfg.weight_decay),
                            lr=opt_cfg.lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps)
    losses = []
    for step, batch in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = opt_cfg.lr * lr_factor(step, total, opt_cfg.warmup_steps, opt_cfg.decay)
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt_cfg.clip)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_training_steps_match_single_process(schedule):
    opt = OptimConfig(lr=3e-3, warmup_steps=2, clip=0.5)  # clipping active: grad norm > 0.5
    ref, rt = _runtime("tiny", 4, schedule, opt, steps=4)
    batches = [BATCH] * 4  # the same batch: the loss must go down
    ref_losses = _reference_training(ref, opt, batches, 4)
    pipe_losses = [rt.train_step(s, b).loss for s, b in enumerate(batches)]
    rt.sync_replicas(4)  # the last stage's copy of the tied embedding, after the last step
    assert pipe_losses == pytest.approx(ref_losses, rel=1e-5)
    assert ref_losses[-1] < ref_losses[0]  # it does train
    ref_params = dict(ref.named_parameters())
    for w in rt.workers:
        for local, p in w.stage.named_parameters():
            r = ref_params[w.stage.names[local]]
            # Adam divides by sqrt(v): float noise in near-zero gradients moves a weight by up to
            # ~lr per step, so the bound is a small fraction of the total step size.
            diff = float((p - r).detach().abs().max())
            assert diff <= 1e-2 * opt.lr, (local, diff)


@pytest.mark.slow
@pytest.mark.parametrize(("stages", "schedule"), [(4, "1f1b")])
def test_distributed_runtime_equivalence(stages, schedule):
    """The same check across real processes (gloo), through the CLI, in four processes (the
    local runtime covers every count and schedule; GPipe across processes is trained against
    the simulator in tests/test_experiment.py, 2 stages in the split tests)."""
    cmd = [sys.executable, "-m", "phalanx.cli", "check", "equivalence", "--model", "tiny",
           "--stages", str(stages), "--schedule", schedule, "--runtime", "distributed",
           "--seq-len", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    assert rec["ok"] and rec["max_rel_grad_diff"] <= TOLERANCE
    assert rec["runtime"] == "distributed" and rec["stages"] == stages


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_bf16_autocast_pipeline_equals_the_bf16_single_process_step(stages, schedule):
    """Mixed precision: the stages compute in bf16 (autocast), weights and gradients stay fp32;
    the pipeline equals one process doing the same, and bf16 really changed the arithmetic."""
    from phalanx.config import load_config
    from phalanx.train import Config
    from phalanx.train.equivalence import TOLERANCES, check_local

    base = ['model.name="tiny"', f"pipeline.stages={stages}", f'pipeline.schedule="{schedule}"',
            "pipeline.micro_batches=4", "train.batch_size=4", "data.seq_len=32"]
    bf16 = check_local(load_config(Config, None, [*base, 'pipeline.precision="bf16"']))
    fp32 = check_local(load_config(Config, None, base))
    assert bf16["ok"] and bf16["max_rel_grad_diff"] <= 1e-5 < TOLERANCES["bf16"]
    assert abs(bf16["loss_pipe"] - fp32["loss_pipe"]) > 1e-6  # autocast was on
    assert bf16["precision"] == "bf16"
