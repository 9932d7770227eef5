"""Everything a run can be refused for, checked once before any stage process is spawned.

A stage process that finds bad input can only fail: its peers then fail too, on a closed link.
So the launching process checks here what each stage would check later — the config, the model
and its cut, the tokenizer, the corpus and whether it yields the batches the run asks for — and
collects the settings that work but probably are not what the user meant (warnings).
"""

from __future__ import annotations

from pathlib import Path

from phalanx.data import build_data
from phalanx.defense.tolerance import covered_steps
from phalanx.errors import PhalanxError
from phalanx.models.loading import load_tokenizer, prepare
from phalanx.models.stages import resolve_bounds
from phalanx.pipeline.devices import choose_backend, stage_devices
from phalanx.pipeline.optim import lr_factor
from phalanx.train.checkpoint import read_manifest
from phalanx.train.config import Config


def preflight(cfg: Config, resume: bool = False) -> list[str]:
    """Raise :class:`~phalanx.errors.PhalanxError` for anything the run would fail on; return
    warnings about settings that run but probably do not do what was meant."""
    cfg.validate()
    devices = stage_devices(cfg.pipeline.device, cfg.pipeline.stages)
    if cfg.pipeline.runtime == "distributed":
        choose_backend(cfg.pipeline.backend, devices)
    if resume:  # the checkpoint index and manifest (each stage checks its file's hash)
        _, manifest = read_manifest(Path(cfg.train.out_dir) / "checkpoints")
        missing = {str(i) for i in range(cfg.pipeline.stages)} - set(manifest.get("stages", {}))
        if missing:
            raise PhalanxError(f"the checkpoint in {cfg.train.out_dir} has no stage "
                               f"{', '.join(sorted(missing))}: resume with the same "
                               "pipeline.stages it was written with")
    layers = prepare(cfg.model)
    resolve_bounds(layers, cfg.pipeline.stages, cfg.pipeline.boundaries or None)
    data = build_data(cfg.data, load_tokenizer(cfg.model))
    data.batch(0, cfg.train.batch_size)  # raises when the corpus is too small for a batch
    data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
    return warnings(cfg)


def warnings(cfg: Config) -> list[str]:
    """Settings that run but probably are not what the user meant."""
    out = []
    o, steps = cfg.optim, cfg.train.steps
    if o.warmup_steps > steps:
        peak = o.lr * lr_factor(steps - 1, steps, o.warmup_steps, o.decay, o.min_lr_ratio)
        out.append(
            f"optim.warmup_steps={o.warmup_steps} is longer than train.steps={steps}: the "
            f"learning rate never reaches optim.lr={o.lr:g} (it peaks at {peak:.3g}); lower "
            "optim.warmup_steps")
    d = cfg.defense
    if d.tolerance == "calibrated" and covered_steps(d.calibration) < steps:
        out.append(
            f"defense.calibration covered {covered_steps(d.calibration)} steps and this run has "
            f"{steps}: on mixed hardware the honest deviations grow with the steps (AdamW "
            "turns rounding into updates), so later ones may pass the tolerance and blame an "
            f"honest stage; calibrate over {steps} steps (phalanx calibrate train.steps={steps})")
    return out
