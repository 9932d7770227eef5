"""Pipeline training throughput: phalanx vs ``torch.distributed.pipelining`` vs one process.

Three systems train the same model on the same batches (real text from phalanx's data module),
with the same number of stages, micro-batches and schedule:

* ``phalanx``  -- phalanx's distributed runtime: one process per stage over gloo, started by
  torchrun, driven through :func:`phalanx.train.setup.build_pipeline` and
  ``Runtime.train_step`` (forward/backward schedule, tied-embedding gradient exchange, global
  gradient-norm clipping, AdamW step, statistics report).
* ``torch_pp`` -- ``torch.distributed.pipelining``: ``PipelineStage`` + ``ScheduleGPipe`` or
  ``Schedule1F1B`` over gloo, the same number of torchrun processes, each wrapping *phalanx's own*
  stage module (so the compute per stage is identical), loss = ``phalanx.models.lm_loss`` (torch
  divides the gradients by the number of micro-batches, as phalanx divides the loss), and a
  per-rank AdamW step. To train the same model as phalanx it also sums the tied embedding's
  gradients between the first and last rank and clips by the global gradient norm (two
  ``all_reduce`` calls, as a torch user would write them); ``--torch-pp-bare`` leaves both out.
* ``single``   -- the unsplit Hugging Face model in one process: forward with labels, backward,
  ``clip_grad_norm_(1.0)``, AdamW step.

Each repetition runs the three systems in turn (phalanx, torch_pp, single, phalanx, ...), each as
a fresh process (or torchrun job) that runs ``--warmup`` untimed steps then ``--steps`` timed
steps and writes its result to a JSON file named on its command line. Tokens/s of a job is
``steps * batch_size * seq_len`` over the wall time of the timed steps, measured on rank 0 with
every rank synchronised at the start and the end of the timed steps (phalanx's iteration already
ends with a report from every stage; the torch job calls ``dist.barrier()``). Multi-process jobs
get ``OMP_NUM_THREADS = cores // processes``; the single process gets every core.

Output: progress on stderr, then one JSON line on stdout with the median tokens/s of each system,
the per-repetition lists, ``ratio_vs_torch_pp`` (phalanx / torch_pp) and ``ratio_vs_single``
(phalanx / single), the first-step loss of each system (a sanity check: all three see the same
weights and batch) and the settings.

With ``--device cuda`` (or ``cuda:N``) every system trains on that one GPU: ``phalanx`` as one
process per stage sharing it (gloo links, tensors staged through host memory), ``phalanx_local``
as the simulator (all stages in one process), and ``single``; torch pipelining is left out there
(its NCCL point-to-point needs a GPU per rank). ``ratio_local_vs_single`` and
``ratio_vs_single`` are then the figures to read (target >= 0.9).

Usage::

    python benchmarks/pipeline.py --model tiny --stages 2 --steps 3 --reps 2
    phalanx bench pipeline --model smollm2 --stages 4 --schedule 1f1b
    phalanx bench pipeline --model random-smollm2 --device cuda --batch-size 16 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CPU_SYSTEMS = ("phalanx", "torch_pp", "single")
GPU_SYSTEMS = ("phalanx", "phalanx_local", "single")  # NCCL pipelining needs a GPU per rank


def systems(a: argparse.Namespace) -> tuple[str, ...]:
    """What runs: on the CPU phalanx against torch pipelining and one process; on a GPU the
    stages share the one device, as processes and in the simulator, against one process."""
    return CPU_SYSTEMS if a.device == "cpu" else GPU_SYSTEMS
LR = 5e-5
CLIP = 1.0
WEIGHT_DECAY = 0.01
TORCH_PP_NOTE = (
    "torch_pp runs phalanx's stage modules under torch.distributed.pipelining with a per-rank "
    "AdamW, plus an all_reduce of the tied embedding's gradient between the first and last rank "
    "and global-norm clipping (all_reduce of the squared norms), so both train the same model"
)
TORCH_PP_BARE_NOTE = (
    "torch_pp (--torch-pp-bare) runs phalanx's stage modules under torch.distributed.pipelining "
    "with a per-rank AdamW and no cross-stage work: no tied-embedding gradient sum and no global "
    "clipping (phalanx does both), so it does less work and trains an untied model"
)


def log(msg: str) -> None:
    """A progress message on stderr."""
    print(f"[bench pipeline] {msg}", file=sys.stderr, flush=True)


def cores() -> int:
    """CPU cores of this machine (as phalanx counts them)."""
    return os.cpu_count() or 1


# -- arguments ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments of the parent (and, with ``--child``, of a child job)."""
    ap = argparse.ArgumentParser(
        prog="phalanx bench pipeline",
        description="Training tokens/s of phalanx's distributed runtime, "
        "torch.distributed.pipelining and single-process training on the same model.",
    )
    ap.add_argument("--model", default="smollm2", help='"smollm2", "tiny" (random Llama), ...')
    ap.add_argument("--stages", type=int, default=4, help="pipeline stages (= processes)")
    ap.add_argument("--schedule", choices=("gpipe", "1f1b"), default="1f1b")
    ap.add_argument("--micro-batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repetition")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each system")
    ap.add_argument("--timeout", type=float, default=1800.0,
                    help="seconds one job (one system, one repetition) may take")
    ap.add_argument("--out", help="also write the JSON result to this file")
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda / cuda:N: every stage and the single process on it")
    ap.add_argument("--torch-pp-bare", action="store_true",
                    help="torch baseline without tied-gradient sum and global clipping")
    ap.add_argument("--child", choices=("phalanx", "phalanx_local", "torchpp", "single"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    problems = []
    if a.stages < 2:
        problems.append("--stages must be at least 2")
    if min(a.micro_batches, a.batch_size, a.seq_len - 1, a.steps, a.reps) < 1 or a.warmup < 0:
        problems.append("--micro-batches, --batch-size, --steps and --reps must be >= 1, "
                        "--seq-len >= 2 and --warmup >= 0")
    if a.batch_size % max(1, a.micro_batches):
        problems.append(f"--batch-size {a.batch_size} is not a multiple of "
                        f"--micro-batches {a.micro_batches}")
    if a.schedule == "1f1b" and a.micro_batches < a.stages:
        problems.append(f"torch's Schedule1F1B needs --micro-batches ({a.micro_batches}) >= "
                        f"--stages ({a.stages})")
    if problems:
        ap.error("; ".join(problems))
    return a


def child_argv(a: argparse.Namespace, child: str, result: Path) -> list[str]:
    """Arguments that hand this run's settings to a child job."""
    return [
        "--model", a.model, "--stages", str(a.stages), "--schedule", a.schedule,
        "--micro-batches", str(a.micro_batches), "--batch-size", str(a.batch_size),
        "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup),
        "--reps", "1", "--child", child, "--result", str(result), "--device", a.device,
        *(["--torch-pp-bare"] if a.torch_pp_bare else []),
    ]


# -- children: shared pieces -------------------------------------------------------------------
def make_batches(a: argparse.Namespace, tokenizer: Any) -> list[Any]:
    """The (B, T) int64 batches of every step (warm-up and timed), from phalanx's data module."""
    from phalanx.data import DataConfig, build_data

    data = build_data(DataConfig(seq_len=a.seq_len), tokenizer)
    return [data.batch(step, a.batch_size) for step in range(a.warmup + a.steps)]


def write_result(path: str, a: argparse.Namespace, elapsed: float, step_s: list[float],
                 losses: list[float], **extra: Any) -> None:
    """Write a child's measurement to ``path`` (rank 0 only)."""
    tokens = a.steps * a.batch_size * a.seq_len
    rec = {"tokens_per_s": tokens / elapsed, "elapsed_s": elapsed, "step_s": step_s,
           "losses": losses, **extra}
    Path(path).write_text(json.dumps(rec))


def sync(device: str) -> None:
    """Wait for the GPU's queued work, so that wall time covers it."""
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def child_phalanx(a: argparse.Namespace, runtime: str = "distributed") -> None:
    """One rank of phalanx's distributed runtime (started by torchrun), or with
    ``runtime="local"`` the whole pipeline in this one process (the simulator)."""
    import torch

    from phalanx.config import load_config
    from phalanx.train import Config
    from phalanx.train.setup import build_pipeline

    total = a.warmup + a.steps
    cfg = load_config(Config, None, [
        f"model.name={json.dumps(a.model)}", f"pipeline.stages={a.stages}",
        f"pipeline.runtime={json.dumps(runtime)}", f"pipeline.schedule={json.dumps(a.schedule)}",
        f"pipeline.device={json.dumps(a.device)}",
        f"pipeline.micro_batches={a.micro_batches}", f"train.batch_size={a.batch_size}",
        f"train.steps={total}", f"data.seq_len={a.seq_len}", "optim.warmup_steps=0",
        'optim.decay="constant"', f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
    ])
    t_load = time.perf_counter()
    pipe = build_pipeline(cfg, total)
    rt = pipe.runtime
    batches = make_batches(a, pipe.loaded.tokenizer) if rt.is_driver else None
    load_s = time.perf_counter() - t_load
    step_s: list[float] = []
    losses: list[float] = []
    compute = [0.0] * a.stages  # per stage, summed over the timed steps (from the reports)
    wait = [0.0] * a.stages
    t0 = time.perf_counter()
    try:
        for i in range(total):
            if i == a.warmup:
                rt.barrier()  # every stage finished the warm-up, optimizer steps included
                sync(a.device)
                t0 = time.perf_counter()
            ts = time.perf_counter()
            res = rt.train_step(i, batches[i] if batches is not None else None)
            step_s.append(time.perf_counter() - ts)
            if res is not None:
                losses.append(res.loss)
                if i >= a.warmup:
                    for k, st in enumerate(res.stats):
                        compute[k] += st.compute_s / a.steps
                        wait[k] += st.wait_s / a.steps
        rt.barrier()  # stages > 0 report before their step: wait for the last steps too
        sync(a.device)
        elapsed = time.perf_counter() - t0
    finally:
        rt.close()
    if rt.is_driver:
        write_result(a.result, a, elapsed, step_s[a.warmup:], losses, load_s=load_s,
                     threads=torch.get_num_threads(), stage_compute_s=compute,
                     stage_wait_s=wait)


def child_torchpp(a: argparse.Namespace) -> None:
    """One rank of ``torch.distributed.pipelining`` over phalanx's stage modules."""
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from phalanx.models import ModelConfig, lm_loss, load_model, partition

    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, cores() // n))
    torch.manual_seed(0)
    total = a.warmup + a.steps
    first, last = rank == 0, rank == n - 1
    t_load = time.perf_counter()
    loaded = load_model(ModelConfig(name=a.model))
    (module,) = partition(loaded.model, loaded.family, n, None, only=rank)
    module.train()
    stage = PipelineStage(module, rank, n, torch.device("cpu"))
    kind = Schedule1F1B if a.schedule == "1f1b" else ScheduleGPipe
    schedule = kind(stage, n_microbatches=a.micro_batches, loss_fn=lm_loss)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY)
    same_math = not a.torch_pp_bare
    tied = bool(module.tied) or n == 1
    tie_group = dist.new_group([0, n - 1]) if same_math and n > 1 and tied else None
    batches = make_batches(a, loaded.tokenizer) if (first or last) else None
    load_s = time.perf_counter() - t_load
    step_s: list[float] = []
    losses = torch.full((total,), float("nan"), dtype=torch.float64)
    t0 = time.perf_counter()
    try:
        for i in range(total):
            if i == a.warmup:
                dist.barrier()
                t0 = time.perf_counter()
            ts = time.perf_counter()
            args = (batches[i],) if first else ()
            if last:
                mb_losses: list[torch.Tensor] = []
                schedule.step(*args, target=batches[i], losses=mb_losses, return_outputs=False)
                losses[i] = float(torch.stack([x.detach() for x in mb_losses]).mean())
            else:
                schedule.step(*args, return_outputs=False)
            if same_math:
                reduce_and_clip(module, tie_group, first, last)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step_s.append(time.perf_counter() - ts)
        dist.barrier()
        elapsed = time.perf_counter() - t0
        dist.broadcast(losses, src=n - 1)  # the last rank computed them; rank 0 reports
    finally:
        dist.destroy_process_group()
    if first:
        write_result(a.result, a, elapsed, step_s[a.warmup:], losses.tolist(), load_s=load_s,
                     threads=torch.get_num_threads())


def reduce_and_clip(module: Any, tie_group: Any, first: bool, last: bool) -> None:
    """What a torch.distributed.pipelining user adds to train the same model as phalanx: sum the
    tied embedding's gradients between the first and last rank, and clip by the global norm."""
    import torch
    import torch.distributed as dist

    if tie_group is not None and (first or last):
        dist.all_reduce((module.embed if first else module.head).weight.grad, group=tie_group)
    skip = {id(p) for p in module.replicas()}  # the last rank's tied copy counts once
    grads = [p.grad for p in module.parameters() if p.grad is not None and id(p) not in skip]
    sq = torch.stack(torch._foreach_norm(grads)).double().pow(2).sum().reshape(1)
    dist.all_reduce(sq)
    coef = min(1.0, CLIP / (float(sq[0]) ** 0.5 + 1e-6))
    all_grads = [p.grad for p in module.parameters() if p.grad is not None]
    if coef < 1.0:
        torch._foreach_mul_(all_grads, coef)


def child_single(a: argparse.Namespace) -> None:
    """The unsplit model trained in this one process."""
    import torch

    from phalanx.models import ModelConfig, load_model

    torch.set_num_threads(cores())
    torch.manual_seed(0)
    total = a.warmup + a.steps
    t_load = time.perf_counter()
    loaded = load_model(ModelConfig(name=a.model))
    model = loaded.model.to(a.device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR,
                            weight_decay=WEIGHT_DECAY)
    batches = [b.to(a.device) for b in make_batches(a, loaded.tokenizer)]
    load_s = time.perf_counter() - t_load
    step_s: list[float] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    for i in range(total):
        if i == a.warmup:
            sync(a.device)
            t0 = time.perf_counter()
        ts = time.perf_counter()
        loss = model(batches[i], labels=batches[i]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step_s.append(time.perf_counter() - ts)
    sync(a.device)
    elapsed = time.perf_counter() - t0
    write_result(a.result, a, elapsed, step_s[a.warmup:], losses, load_s=load_s,
                 threads=torch.get_num_threads())


# -- parent ------------------------------------------------------------------------------------
def _stdout_target() -> int | None:
    """Children print to our stderr so that stdout carries only the JSON line."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return subprocess.DEVNULL


def kill_group(proc: subprocess.Popen) -> None:
    """Stop a job started with ``start_new_session=True`` and all its children."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=10)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(a: argparse.Namespace, system: str, tmp: Path, rep: int) -> dict[str, Any]:
    """Run one repetition of ``system`` as a fresh process or torchrun job; its result."""
    script = str(Path(__file__).resolve())
    result = tmp / f"{system}-{rep}.json"
    child = {"phalanx": "phalanx", "phalanx_local": "phalanx_local", "torch_pp": "torchpp",
             "single": "single"}[system]
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if system in ("single", "phalanx_local"):
        env["OMP_NUM_THREADS"] = str(cores())
        cmd = [sys.executable, script, *child_argv(a, child, result)]
    else:
        env["OMP_NUM_THREADS"] = str(max(1, cores() // a.stages))
        env.setdefault("TORCHELASTIC_ERROR_FILE", os.devnull)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={a.stages}", script, *child_argv(a, child, result)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=_stdout_target(), start_new_session=True)
    try:
        code = proc.wait(timeout=a.timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise SystemExit(f"bench pipeline: {system} (repetition {rep + 1}) took more than "
                         f"{a.timeout:.0f} s; killed") from None
    except BaseException:
        kill_group(proc)
        raise
    if code != 0 or not result.is_file():
        kill_group(proc)
        raise SystemExit(f"bench pipeline: {system} (repetition {rep + 1}) failed with exit "
                         f"code {code}; see the messages above")
    rec = json.loads(result.read_text())
    rec["job_s"] = time.perf_counter() - t0
    return rec


def preflight(a: argparse.Namespace) -> int:
    """Check the model and stage count (converting the SmolLM2 cache once, before the jobs
    start); returns the model's number of layers."""
    from phalanx.models import ModelConfig
    from phalanx.models.loading import prepare

    layers = prepare(ModelConfig(name=a.model))
    if a.stages > layers:
        raise SystemExit(f"bench pipeline: --stages {a.stages} is more than the model's "
                         f"{layers} layers")
    return layers


def _median_lists(rows: list[list[float]]) -> list[float]:
    """Element-wise median of equal-length lists."""
    return [statistics.median(col) for col in zip(*rows, strict=True)]


def summarise(a: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], layers: int,
              wall_s: float, load_start: float) -> dict[str, Any]:
    """The JSON record of the whole benchmark."""
    import torch

    names = systems(a)
    tps = {s: [r["tokens_per_s"] for r in runs[s]] for s in names}
    med = {s: statistics.median(v) for s, v in tps.items()}
    rec: dict[str, Any] = {"benchmark": "pipeline", "device": a.device}
    for s in names:
        rec[f"{s}_tokens_per_s"] = med[s]
    if "torch_pp" in med:
        rec["ratio_vs_torch_pp"] = med["phalanx"] / med["torch_pp"]
    rec["ratio_vs_single"] = med["phalanx"] / med["single"]
    if "phalanx_local" in med:
        rec["ratio_local_vs_single"] = med["phalanx_local"] / med["single"]
    for s in names:
        rec[f"{s}_tokens_per_s_reps"] = tps[s]
    rec.update({
        "median_step_s": {s: statistics.median(x for r in runs[s] for x in r["step_s"])
                          for s in names},
        "first_step_loss": {s: runs[s][0]["losses"][0] for s in names},
        # same data, weights and optimizer maths: the runs' losses agree at the end too
        "last_step_loss": {s: runs[s][0]["losses"][-1] for s in names},
        "phalanx_stage_compute_s": _median_lists([r["stage_compute_s"] for r in runs["phalanx"]]),
        "phalanx_stage_wait_s": _median_lists([r["stage_wait_s"] for r in runs["phalanx"]]),
        "threads_per_process": {s: runs[s][0]["threads"] for s in names},
        "torch_pp_note": TORCH_PP_BARE_NOTE if a.torch_pp_bare else TORCH_PP_NOTE,
        "settings": {
            "model": a.model, "layers": layers, "stages": a.stages, "schedule": a.schedule,
            "micro_batches": a.micro_batches, "batch_size": a.batch_size, "seq_len": a.seq_len,
            "tokens_per_step": a.batch_size * a.seq_len, "steps": a.steps,
            "warmup_steps": a.warmup, "reps": a.reps, "order": "alternating " + ",".join(names),
            "backend": "gloo", "cpu_count": cores(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if a.device != "cpu" else None,
            "python": platform.python_version(),
            "load_avg_1min_at_start": load_start,
        },
        "wall_s": wall_s,
    })
    return rec


def run_parent(a: argparse.Namespace) -> int:
    """Alternate the three systems for ``--reps`` repetitions; print the JSON line."""
    t_start = time.perf_counter()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure
    layers = preflight(a)
    log(f"model={a.model} ({layers} layers) stages={a.stages} schedule={a.schedule} "
        f"micro_batches={a.micro_batches} batch={a.batch_size}x{a.seq_len} steps={a.steps} "
        f"warmup={a.warmup} reps={a.reps} cores={cores()}")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems(a)}
    with tempfile.TemporaryDirectory(prefix="phalanx-bench-") as tmp:
        for rep in range(a.reps):
            for system in systems(a):
                log(f"rep {rep + 1}/{a.reps}: {system} ...")
                rec = run_job(a, system, Path(tmp), rep)
                runs[system].append(rec)
                log(f"rep {rep + 1}/{a.reps}: {system} {rec['tokens_per_s']:.1f} tokens/s "
                    f"(timed {rec['elapsed_s']:.1f} s, job {rec['job_s']:.1f} s, "
                    f"first loss {rec['losses'][0]:.4f})")
    rec = summarise(a, runs, layers, time.perf_counter() - t_start, load_start)
    line = json.dumps(rec)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(line + "\n")
    ratios = {k: v for k, v in rec.items() if k.startswith("ratio_")}
    log(", ".join(f"{s} {rec[s + '_tokens_per_s']:.1f}" for s in systems(a)) + " tokens/s; "
        + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    print(line, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the parent and of the child jobs."""
    a = parse_args(argv)
    if a.child is None:
        return run_parent(a)
    if not a.result:
        raise SystemExit("--child needs --result PATH")
    children = {"phalanx": child_phalanx, "torchpp": child_torchpp, "single": child_single,
                "phalanx_local": lambda a: child_phalanx(a, runtime="local")}
    children[a.child](a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
