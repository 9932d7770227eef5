"""``phalanx check gpu``: is the pipeline correct and how fast is it on this host's GPU?

The equivalence check (one iteration against the single-process step of the same precision) for
every stage count, schedule and runtime asked for, all on the device — several stages, and in
the distributed runtime several processes, sharing one GPU — then a short training in the
simulator; one JSON record with the loss equality, the largest relative gradient difference,
tokens/s and peak GPU memory. ``--device cpu`` runs the same path on a CPU-only host (tests).
"""

from __future__ import annotations

import json
import tempfile
import time

import torch

from phalanx.config import load_config
from phalanx.errors import PhalanxError
from phalanx.pipeline.devices import gpu_count, stage_devices
from phalanx.train.config import Config
from phalanx.train.equivalence import check_distributed, check_local, check_overrides

SCHEDULES = ("gpipe", "1f1b")


def device_check(model: str, device: str | None, precision: str, *, stages: list[int],
                 runtimes: list[str], train_steps: int, batch_size: int, seq_len: int,
                 micro_batches: int) -> dict:
    """Run the checks and the training; the record ``phalanx check gpu`` prints."""
    device = device or "cuda"
    if device.startswith("cuda") and gpu_count() == 0:
        raise PhalanxError("phalanx check gpu needs a CUDA GPU and this host has none (or torch "
                           "is a CPU build); --device cpu runs the same checks on the CPU")
    stage_devices(device, 1)  # an impossible device is refused before anything runs
    if not stages or min(stages) < 1 or not set(runtimes) <= {"local", "distributed"}:
        raise PhalanxError("--stage-counts must list stage counts >= 1 and --runtimes a subset "
                           "of local,distributed")
    if train_steps < 1:
        raise PhalanxError("--train-steps must be at least 1")
    checks = []
    for runtime in runtimes:
        for n in stages:
            for schedule in SCHEDULES:
                cfg = load_config(Config, None, check_overrides(
                    model, n, schedule, runtime, micro_batches, batch_size, seq_len,
                    device=device, precision=precision))
                cfg.validate()
                rec = check_local(cfg) if runtime == "local" else check_distributed(cfg)
                checks.append({k: rec[k] for k in ("runtime", "stages", "schedule", "loss_ref",
                                                   "loss_pipe", "loss_rel_diff",
                                                   "max_rel_grad_diff", "ok")})
    train = short_training(model, device, precision, max(stages), train_steps, batch_size,
                           seq_len, micro_batches)
    return {
        "check": "gpu", "device": device, "device_name": _device_name(device),
        "precision": precision, "model": model, "checks": checks,
        "all_ok": all(c["ok"] for c in checks),
        "max_rel_grad_diff": max(c["max_rel_grad_diff"] for c in checks),
        "loss_equal": all(c["loss_rel_diff"] <= 1e-5 for c in checks),
        "train": train, "torch": torch.__version__,
    }


def short_training(model: str, device: str, precision: str, stages: int, steps: int,
                   batch_size: int, seq_len: int, micro_batches: int) -> dict:
    """A few optimizer steps in the simulator on the device: tokens/s and peak memory."""
    from phalanx.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="phalanx-gpucheck-") as out:
        cfg = load_config(Config, None, [
            *check_overrides(model, stages, "1f1b", "local", micro_batches, batch_size, seq_len,
                             device=device, precision=precision),
            f"train.steps={steps}", "train.save=false", "train.progress=false",
            "train.eval_batches=1", "optim.warmup_steps=1", f"train.out_dir={json.dumps(out)}"])
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        try:
            summary = trainer.run()
        finally:
            trainer.close()
    return {"stages": stages, "steps": steps, "tokens_per_step": batch_size * seq_len,
            "tokens_per_s": summary["tokens_per_s"], "peak_gpu_mb": summary["peak_gpu_mb"],
            "val_loss_start": summary["val_loss_start"], "val_loss_end": summary["val_loss_end"],
            "wall_s": time.perf_counter() - t0}


def _device_name(device: str) -> str:
    d = stage_devices(device, 1)[0]
    return torch.cuda.get_device_name(d) if d.type == "cuda" else "cpu"
