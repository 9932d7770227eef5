"""Check that one pipeline iteration equals one single-process iteration (loss and gradients)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from phalanx.data import build_data
from phalanx.models import lm_loss
from phalanx.models.stages import PRECISIONS
from phalanx.pipeline import Runtime
from phalanx.pipeline.devices import stage_devices
from phalanx.train.config import Config
from phalanx.train.setup import build_pipeline, load_prepared

TOLERANCE = 1e-5
TOLERANCES = {"fp32": TOLERANCE, "bf16": 1e-4}
"""Largest relative gradient difference a pipeline may have from its single-process reference
(same micro-batches, same precision): sums in another order. Measured on CPU, SmolLM2 and the
tiny model, 2 and 4 stages, both schedules: 1.5e-7 in fp32 and in bf16 autocast alike; bf16
gets a wider margin for GPU kernels that pick their algorithm by shape."""


def first_batch(cfg: Config, tokenizer) -> torch.Tensor:  # noqa: ANN001
    """The batch of step 0 (the same in every process that builds the data)."""
    return build_data(cfg.data, tokenizer).batch(0, cfg.train.batch_size)


def reference_step(model: torch.nn.Module, batch: torch.Tensor, micro: int = 1,
                   precision: str = "fp32") -> tuple[float, dict]:
    """Loss and gradients of the unsplit model on ``batch`` in one process, accumulated over
    the same ``micro`` micro-batches the pipeline uses.

    The same sums in the same order: a full-batch step differs from an accumulated one by float
    rounding alone (measured on SmolLM2, 4 x 16 tokens: 1.6e-5 relative on a norm's gradient),
    which is not a pipeline error and would hide one of that size."""
    model.train()
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    dtype = PRECISIONS[precision]
    loss = 0.0
    for mb in batch.to(device).chunk(micro):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(mb, use_cache=False).logits  # (a KV cache is for generation)
        step_loss = lm_loss(logits, mb)  # the pipeline's loss, outside autocast, in fp32
        (step_loss / micro).backward()
        loss += step_loss.item() / micro
    grads = {n: p.grad.detach().to("cpu", copy=True) for n, p in model.named_parameters()
             if p.grad is not None}
    return loss, grads


def pipeline_grads(runtime: Runtime) -> dict[str, torch.Tensor]:
    """Gradients of the stages in this process, keyed ``<stage>:<name in the unsplit model>``."""
    out = {}
    for w in runtime.workers:
        for local, p in w.stage.named_parameters():
            if p.grad is not None and local in w.stage.names:  # not a verification shadow
                out[f"{w.me}:{w.stage.names[local]}"] = p.grad.detach().to("cpu", copy=True)
    return out


def max_rel_diff(ref: dict[str, torch.Tensor], pipe: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest per-tensor ``max|g_pipe - g_ref| / max|g_ref|`` and where it occurs; every
    parameter of the reference must be covered by the pipeline."""
    worst, where = 0.0, ""
    covered = set()
    for key, g in pipe.items():
        name = key.split(":", 1)[1]
        r = ref[name]
        covered.add(name)
        rel = float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))
        if rel > worst:
            worst, where = rel, key
    missing = set(ref) - covered
    if missing:
        return float("inf"), f"missing gradients: {sorted(missing)[:3]}"
    return worst, where


def reference_for(cfg: Config, model: torch.nn.Module, batch: torch.Tensor
                  ) -> tuple[float, dict]:
    """The single-process step the pipeline of ``cfg`` must equal: the same micro-batches, the
    same precision, on stage 0's device."""
    device = stage_devices(cfg.pipeline.device, 1)[0]
    return reference_step(copy.deepcopy(model).to(device), batch, cfg.pipeline.micro_batches,
                          cfg.pipeline.precision)


def check_overrides(model: str, stages: int, schedule: str, runtime: str, micro_batches: int,
                    batch_size: int, seq_len: int, device: str | None = None,
                    precision: str = "fp32") -> list[str]:
    """The config of one equivalence check, as ``phalanx train`` overrides."""
    o = [f"model.name={json.dumps(model)}", f"pipeline.stages={stages}",
         f"pipeline.schedule={json.dumps(schedule)}", f"pipeline.runtime={json.dumps(runtime)}",
         f"pipeline.micro_batches={micro_batches}", f"train.batch_size={batch_size}",
         f"data.seq_len={seq_len}", f"pipeline.precision={json.dumps(precision)}"]
    return o + ([f"pipeline.device={json.dumps(device)}"] if device else [])


def check_distributed(cfg: Config) -> dict:
    """Reference here, pipeline in one process per stage (each writes its gradients)."""
    from phalanx.config import to_dict, to_overrides
    from phalanx.errors import PhalanxError
    from phalanx.launch import spawn

    loaded = load_prepared(cfg)
    loss_ref, ref = reference_for(cfg, loaded.model, first_batch(cfg, loaded.tokenizer))
    del loaded
    with tempfile.TemporaryDirectory(prefix="phalanx-eq-") as tmp:
        code = spawn(cfg.pipeline.stages,
                     ["worker", "--out", tmp, "equivalence", *to_overrides(to_dict(cfg))],
                     timeout=cfg.pipeline.timeout_s * 2)
        if code:  # the launcher has printed which stage failed and why
            raise PhalanxError(f"the distributed equivalence check failed (exit {code})")
        loss_pipe, pipe = collect(Path(tmp), cfg.pipeline.stages)
    return report(cfg, loss_ref, ref, loss_pipe, pipe)


def run_pipeline_step(cfg: Config, batch: torch.Tensor | None) -> tuple[Runtime, float | None]:
    """Build the pipeline and run one iteration without the optimizer step."""
    pipe = build_pipeline(cfg, total_steps=1)
    res = pipe.runtime.train_step(0, batch if pipe.runtime.is_driver else None, optimize=False)
    return pipe.runtime, (res.loss if res is not None else None)


def check_local(cfg: Config) -> dict:
    """Reference and local-runtime pipeline in this process."""
    loaded = load_prepared(cfg)
    batch = first_batch(cfg, loaded.tokenizer)
    loss_ref, ref = reference_for(cfg, loaded.model, batch)
    runtime, loss_pipe = run_pipeline_step(cfg, batch)
    return report(cfg, loss_ref, ref, loss_pipe, pipeline_grads(runtime))


def worker_main(cfg: Config, out_dir: Path) -> None:
    """One rank of a distributed check: run the iteration, write this stage's gradients."""
    pipe = build_pipeline(cfg, total_steps=1)
    rt = pipe.runtime
    batch = first_batch(cfg, pipe.loaded.tokenizer) if rt.is_driver else None
    res = rt.train_step(0, batch, optimize=False)
    for w in rt.workers:
        grads = {k: v.contiguous() for k, v in pipeline_grads(rt).items()}
        save_file(grads, out_dir / f"grads_{w.me}.safetensors")
    if res is not None:
        (out_dir / "loss.json").write_text(json.dumps({"loss": res.loss}))
    rt.barrier()
    rt.close()


def collect(out_dir: Path, stages: int) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients the ranks of a distributed check wrote."""
    grads: dict[str, torch.Tensor] = {}
    for i in range(stages):
        grads.update(load_file(out_dir / f"grads_{i}.safetensors"))
    loss = json.loads((out_dir / "loss.json").read_text())["loss"]
    return float(loss), grads


def report(cfg: Config, loss_ref: float, ref: dict, loss_pipe: float, pipe: dict) -> dict:
    """The check's JSON record."""
    rel, where = max_rel_diff(ref, pipe)
    tol = TOLERANCES[cfg.pipeline.precision]
    loss_rel = abs(loss_pipe - loss_ref) / max(abs(loss_ref), 1e-30)
    return {
        "model": cfg.model.name, "stages": cfg.pipeline.stages, "schedule": cfg.pipeline.schedule,
        "runtime": cfg.pipeline.runtime, "micro_batches": cfg.pipeline.micro_batches,
        "batch_size": cfg.train.batch_size, "seq_len": cfg.data.seq_len,
        "loss_ref": loss_ref, "loss_pipe": loss_pipe, "loss_rel_diff": loss_rel,
        "precision": cfg.pipeline.precision, "device": cfg.pipeline.device,
        "max_rel_grad_diff": rel, "worst_param": where, "tolerance": tol,
        "ok": bool(rel <= tol and loss_rel <= tol),
    }
