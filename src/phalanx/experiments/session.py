"""Several training runs in one set of stage processes: started, and the model loaded, once.

A grid of distributed runs (the demo, the robustness case study) used to start one process per
stage and load the model for every run: on two cores about 30 s a run that shows nothing. A
session instead launches the stage processes once; each process loads the model once, keeps it
pristine, and trains every run on a fresh copy of it over the same process group (each run has
its own links, opened and closed cleanly). Every run is exactly the run ``phalanx train`` would
make with the same settings: same weights, batches, seeds.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from phalanx.models import LoadedModel, ModelConfig, load_model
from phalanx.pipeline import PipelineConfig


@dataclass
class SessionRun:
    """One run of a session: its name, its ``phalanx train`` settings, its run directory."""

    name: str
    settings: list[str]
    out: str


class ModelCache:
    """``load_model`` that loads each model once and hands out fresh copies of it."""

    def __init__(self, load: Callable[[ModelConfig], LoadedModel] = load_model) -> None:
        self._load = load
        self._models: dict[tuple, LoadedModel] = {}
        self.loads = 0

    def __call__(self, cfg: ModelConfig) -> LoadedModel:
        key = (cfg.name, cfg.dtype, cfg.dropout, cfg.cache_dir, cfg.seed)
        if key not in self._models:
            self._models[key] = self._load(cfg)
            self.loads += 1
        m = self._models[key]
        return LoadedModel(model=copy.deepcopy(m.model), tokenizer=m.tokenizer, family=m.family,
                           source=m.source)


def write_plan(path: Path, runs: list[SessionRun]) -> None:
    path.write_text(json.dumps([r.__dict__ for r in runs], indent=1))


def read_plan(path: Path) -> list[SessionRun]:
    return [SessionRun(**r) for r in json.loads(path.read_text())]


def stamp_path(out: str | Path) -> Path:
    """The file that marks a run directory as finished with these settings."""
    return Path(out) / "settings.json"


def run_session(plan: Path, progress: Callable[[str, int | None], None] | None = None) -> None:
    """One stage process of a session (or the whole session, for the simulator): every run of
    ``plan`` in turn; stage 0 marks each finished run directory and logs its progress."""
    from phalanx.config import load_config
    from phalanx.train import Config

    runs = read_plan(plan)
    if not runs:
        return
    models = ModelCache()
    first = load_config(Config, None, runs[0].settings)
    with shared_group(first.pipeline):
        _run_all(runs, models, progress)


@contextlib.contextmanager
def shared_group(cfg: PipelineConfig) -> Iterator[None]:
    """For a distributed session: the process group, created before the first run so that no
    run destroys it, and destroyed after the last."""
    if cfg.runtime != "distributed":
        yield
        return
    import torch.distributed as dist

    from phalanx.pipeline.distributed import init_distributed

    init_distributed(cfg)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_all(runs: list[SessionRun], models: ModelCache,
             progress: Callable[[str, int | None], None] | None) -> None:
    from phalanx.config import load_config
    from phalanx.train import Config, Trainer

    t0 = time.perf_counter()
    for k, run in enumerate(runs, 1):
        cfg = load_config(Config, None, run.settings)
        trainer = Trainer(cfg, progress=progress, load=models)
        try:
            driver = trainer.driver
            if driver:
                print(f"[{k}/{len(runs)}] {run.name} ...", file=sys.stderr, flush=True)
            summary = trainer.run()
        finally:
            trainer.close()
            # stages, optimizers and hooks refer to each other: left to the collector's own
            # pace, the process grew by about 3 GB of SmolLM2 tensors a run (OOM after 58)
            del trainer
            gc.collect()
        if driver and summary is not None:
            stamp_path(run.out).write_text(json.dumps(run.settings, indent=1) + "\n")
            print(f"[{k}/{len(runs)}] {run.name}: val ppl {summary['val_ppl_end']:.2f}, "
                  f"{summary['wall_s']:.0f} s (elapsed {time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
