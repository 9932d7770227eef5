"""The training loop: config -> pipeline -> iterations -> metrics, evaluations, checkpoints."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from phalanx.config import to_dict
from phalanx.data import TokenData, build_data
from phalanx.models import load_model
from phalanx.pipeline import IterationResult
from phalanx.train.attempts import attempts
from phalanx.train.checkpoint import (
    PLAIN,
    load_stage,
    read_manifest,
    save_stage,
    write_manifest,
)
from phalanx.train.config import Config
from phalanx.train.oversight import Overseer, Unwatched
from phalanx.train.setup import Loader, build_pipeline

log = logging.getLogger(__name__)

Progress = Callable[[str, "int | None"], None]
"""Told where the run is: a phase (evaluating, training, checkpointing, done) and a step."""


def peak_gpu_mb(workers: list) -> float:
    """Peak GPU memory allocated by torch on the devices of these stages, in MiB (0 on CPU)."""
    devices = {w.device for w in workers if w.device.type == "cuda"}
    return max((torch.cuda.max_memory_allocated(d) / 2**20 for d in devices), default=0.0)


def peak_rss_mb() -> float:
    """Peak resident memory of this process, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _due(done: int, every: int, total: int) -> bool:
    """Whether a periodic task (every ``every`` steps, 0 = never) falls after step ``done``;
    the final step has its own evaluation and checkpoint."""
    return bool(every) and done % every == 0 and done < total


def ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class Trainer:
    """Runs ``cfg``; in a distributed run every process runs it, the driver (stage 0) reports."""

    def __init__(self, cfg: Config, resume: bool = False, progress: Progress | None = None,
                 load: Loader = load_model) -> None:
        cfg.validate()
        self.cfg = cfg
        self.resume = resume
        self.progress: Progress = progress or (lambda phase, step: None)
        self.out = Path(cfg.train.out_dir)
        self.pipe = build_pipeline(cfg, cfg.train.steps, load=load)
        self.runtime = self.pipe.runtime
        self.overseer: Overseer = self.pipe.defense or Unwatched()
        self.driver = self.runtime.is_driver
        self.data: TokenData | None = None
        try:
            if self.driver:
                self.data = build_data(cfg.data, self.pipe.loaded.tokenizer)
                self.out.mkdir(parents=True, exist_ok=True)
                self.val = self.data.val_batches(cfg.train.batch_size, cfg.train.eval_batches)
        except BaseException:
            self.runtime.close()  # the peers learn at once that this stage is gone
            raise

    # -- pieces -------------------------------------------------------------------------------
    def evaluate(self, step: int) -> float | None:
        """Validation loss, redone while the coordinator discards the pass (at most
        ``defense.max_retries`` times; then NaN: no loss that failed its checks is reported)."""
        self.progress("evaluating", step)
        for attempt in range(self.cfg.defense.max_retries + 1):
            self.pipe.attack.attempt = attempt  # a redone pass draws the attack afresh
            val = self.runtime.evaluate(self.val if self.driver else None, step=step)
            if not self.runtime.workers[0].verdict.discard:
                return val
        log.warning("the evaluation at step %d failed its checks %d times: not reported", step,
                    self.cfg.defense.max_retries + 1)
        return float("nan") if val is not None else None

    def checkpoint(self, step: int, extra: dict) -> None:
        self.progress("checkpointing", step)
        directory = self.out / "checkpoints" / f"step_{step}"
        self.runtime.sync_replicas(step)
        hashes = {w.me: save_stage(directory, w, self.pipe.stores.get(w.me, PLAIN))
                  for w in self.runtime.workers}
        digests = {i: torch.frombuffer(bytearray(bytes.fromhex(h)), dtype=torch.uint8)
                   for i, h in hashes.items()}
        gathered = self.runtime.gather(digests)
        if gathered is not None:
            all_hashes = {i: bytes(t.tolist()).hex() for i, t in gathered.items()}
            write_manifest(directory, step, all_hashes, extra, self.pipe.suffixes)
        self.runtime.barrier()

    def attempt(self, step: int, batch: torch.Tensor | None) -> tuple[object, list[dict]]:
        """Iteration ``step``, redone while the coordinator discards it; returns the last
        result and every attempt's record (malicious stages, alerts, blame) at the driver."""
        results = attempts(self.runtime, self.pipe.attack, step, batch,
                           self.cfg.defense.max_retries)
        tries = [self.oversight(r, bad) for r, bad in results if r is not None]
        return results[-1][0], tries

    def oversight(self, res: IterationResult, malicious: frozenset[int]) -> dict:
        """What the attack did and what the defense saw in one attempt."""
        rec: dict = {"malicious": sorted(malicious)}
        if res.refused is not None and bool((res.refused > 0).any()):
            by_sender = res.refused.sum(dim=0).tolist()
            rec["refused"] = {str(i): int(c) for i, c in enumerate(by_sender) if c}
        if res.reports is not None:
            rec.update(self.overseer.describe(res))
        return rec

    def weights_digests(self) -> dict[str, str] | None:
        """SHA-256 of each stage's own weights (the model's parameters, not a verifier's
        replica), at the driver: equal digests are bitwise-equal trained models."""
        self.runtime.sync_replicas(self.cfg.train.steps)
        digests = {}
        for w in self.runtime.workers:
            h = hashlib.sha256()
            for name, p in sorted(w.stage.named_parameters()):
                if name in w.stage.names:
                    h.update(name.encode())
                    h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
            digests[w.me] = torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)
        gathered = self.runtime.gather(digests)
        if gathered is None:
            return None
        return {str(i): bytes(t.tolist()).hex() for i, t in sorted(gathered.items())}

    def check_totals(self) -> dict | None:
        """The overseer's totals over the run (for the duplicated block: comparisons made and
        the largest relative difference among those that agreed), at the driver; ``None``
        elsewhere or without an overseer."""
        tallies = {w.me: self.overseer.tally(w.me) for w in self.runtime.workers}
        if any(t is None for t in tallies.values()):
            return None
        gathered = self.runtime.gather(tallies)
        return None if gathered is None else self.overseer.totals(list(gathered.values()))

    def run_state(self, val_start: float | None) -> dict:
        """What a checkpoint keeps besides the stages: the starting validation loss and the
        overseer's state (the standing quarantine)."""
        return {"val_loss_start": val_start, **self.overseer.state()}

    def restore(self) -> dict:
        directory, manifest = read_manifest(self.out / "checkpoints")
        for w in self.runtime.workers:
            load_stage(directory, manifest, w, self.pipe.stores.get(w.me, PLAIN))
        self.overseer.restore(manifest)
        self.runtime.barrier()
        return manifest

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train; returns the summary on the driver, ``None`` elsewhere."""
        cfg, rt = self.cfg, self.runtime
        t_cfg = cfg.train
        start, val_start = 0, None
        if self.resume:
            manifest = self.restore()
            start, val_start = int(manifest["step"]), manifest.get("val_loss_start")
        if val_start is None:
            val_start = self.evaluate(start)
        metrics_path = self.out / "metrics.jsonl"
        records: list[str] = []
        if self.driver and self.resume and metrics_path.exists():
            records = [r for r in metrics_path.read_text().splitlines()
                       if r.strip() and json.loads(r).get("step", -1) < start]
        metrics = open(metrics_path, "w") if self.driver else None  # noqa: SIM115
        if metrics is not None:
            metrics.writelines(r + "\n" for r in records)
        bar = tqdm(total=t_cfg.steps, initial=start, desc="train", unit="step", file=sys.stderr,
                   disable=not (self.driver and t_cfg.progress), dynamic_ncols=True)
        tokens_done, train_s = 0, 0.0
        t_run = time.perf_counter()
        try:
            for step in range(start, t_cfg.steps):
                batch = self.data.batch(step, t_cfg.batch_size) if self.data else None
                self.progress("training", step)
                lr = rt.workers[0].optimizer.lr  # the rate this step uses
                t0 = time.perf_counter()
                res, tries = self.attempt(step, batch)
                dt = time.perf_counter() - t0
                done = step + 1
                val = self.evaluate(done) if _due(done, t_cfg.eval_every, t_cfg.steps) else None
                if res is not None:
                    tokens = batch.numel()
                    tokens_done, train_s = tokens_done + tokens, train_s + dt
                    rec = {
                        "step": step, "loss": res.loss, "lr": lr, **tries[-1],
                        "grad_norm": res.grad_norm, "skipped_step": res.skipped,
                        "tokens_per_s": tokens / dt, "step_s": dt,
                        "compute_s": [s.compute_s for s in res.stats],
                        "wait_s": [s.wait_s for s in res.stats],
                    }
                    if val is not None:
                        rec["val_loss"] = val
                    if len(tries) > 1:
                        rec["redone"] = tries[:-1]
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{res.loss:.3f}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
                if t_cfg.save and _due(done, t_cfg.checkpoint_every, t_cfg.steps):
                    self.checkpoint(done, self.run_state(val_start))
            val_end = self.evaluate(t_cfg.steps)
            if t_cfg.save:
                self.checkpoint(t_cfg.steps, self.run_state(val_start))
            mem = torch.tensor([peak_rss_mb(), peak_gpu_mb(rt.workers)], dtype=torch.float64)
            rss = self.runtime.gather({w.me: mem for w in rt.workers})
            checks = self.check_totals()
            weights = self.weights_digests()
            self.progress("done", t_cfg.steps)
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        if not self.driver:
            return None
        per_stage = [float(rss[i][0]) for i in sorted(rss)]
        summary = {
            "val_loss_start": val_start, "val_ppl_start": ppl(val_start),
            "val_loss_end": val_end, "val_ppl_end": ppl(val_end),
            "steps": t_cfg.steps, "resumed_from": start if self.resume else None,
            "tokens_per_s": tokens_done / train_s if train_s else float("nan"),
            "wall_s": time.perf_counter() - t_run,
            "peak_rss_mb": max(per_stage) if cfg.pipeline.runtime != "local"
            else peak_rss_mb(),
            "peak_rss_mb_per_process": per_stage if cfg.pipeline.runtime != "local"
            else [peak_rss_mb()],
            "peak_gpu_mb": max(float(rss[i][1]) for i in rss),
            "model": self.pipe.loaded.source, "config": to_dict(cfg),
        }
        if checks is not None:
            summary["defense"] = checks
        summary["weights_sha256"] = weights
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def close(self) -> None:
        self.runtime.close()
