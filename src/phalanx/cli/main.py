"""``phalanx`` — demo, train, calibrate, experiment, split, launch, check, report, bench.
User errors: one line, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from phalanx.cli.split import add_parser as add_split_parser
from phalanx.cli.split import cmd_split
from phalanx.errors import PhalanxError

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="phalanx",
        description="Robust and private decentralized training of LLMs: pipeline-parallel "
        "training of real models over real processes, attacks and defenses.",
    )
    sub = ap.add_subparsers(dest="command", required=True,
                            metavar="{demo,train,calibrate,experiment,split,launch,check,keys,report,"
                            "bench}")

    d = sub.add_parser("demo", help="SmolLM2-135M, 4 pipeline processes: clean vs attacked vs "
                       "defended")
    d.add_argument("--out", default="runs/demo", help="run directory")
    d.add_argument("overrides", nargs="*", help="config overrides, key=value")

    t = sub.add_parser(
        "train", help="train a pipeline from a TOML config and overrides",
        description="Sections: model, data, pipeline, optim, train, attack, defense; every key "
        "and its "
        "default is in configs/defaults.toml. Example: phalanx train model.name=tiny "
        "pipeline.stages=2 pipeline.runtime=distributed",
    )
    t.add_argument("--config", help="TOML config file")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. pipeline.stages=4")

    cal = sub.add_parser(
        "calibrate", help="the duplicated block's tolerance for mixed hardware, from honest runs",
        description="Trains as phalanx train does, with the duplicated block measuring how far "
        "each honest message is from its recomputation (defense.tolerance=measure, no attack), "
        "and writes the calibration that defense.tolerance=calibrated reads: per check and "
        "stage, the largest deviation times --margin. Run it on the machines the run will use. "
        "--from converts the summary.json of such a run made elsewhere (e.g. by hand on "
        "several hosts).")
    cal.add_argument("--config", help="TOML config file")
    cal.add_argument("--out", default="calibration.json", help="calibration file to write")
    cal.add_argument("--margin", type=float, default=10.0,
                     help="tolerance = margin x the largest honest deviation (default 10)")
    cal.add_argument("--from", dest="source", help="summary.json of a measuring run")
    cal.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=50")

    e = sub.add_parser(
        "experiment", help="paper recipes: sweeps with tables and plots",
        description="robustness: paper 1's case study, {clean} ∪ {forward sign flip, backward "
        "Gaussian} × {p=0.3, 0.7} × {no defense, restart, duplicated block + skip layer}; "
        "finished cells are reused unless --fresh. detection: every attack, the forged pair "
        "included, against the duplicated block. adaptive: every adaptive attacker (one that "
        "uses every field it sends) x {skip, repair, restart}. split: paper 2's methods (full "
        "and LoRA centralized; split LoRA, LoRA+SPF, P-tuning v2 with the server in its "
        "enclave; the masked method; split LoRA without the enclave): validation perplexity, "
        "trainable parameters, tokens/s, wire bytes, enclave bytes, the security's cost. "
        "privacy: inversion of what the stage after each cut receives (exact search, learned "
        "decoder, nearest embedding), label and weight-gradient leakage, victims drifted from "
        "the public weights, and Gaussian noise / DP-Forward at the cut against their "
        "perplexity and tokens/s cost.")
    e.add_argument("name", choices=["robustness", "detection", "adaptive", "split", "privacy"])
    e.add_argument("--out", help="output directory (default results/NAME)")
    e.add_argument("--quick", action="store_true",
                   help="tiny model, few steps (minutes): a smoke run of the whole grid")
    e.add_argument("--preset", choices=["paper"],
                   help="robustness: paper = paper 1 at its own scale (6 stages, 800 steps of "
                   "4x512 tokens, the stdlib corpus) on a GPU; prints its estimated time")
    e.add_argument("--force", action="store_true",
                   help="start a --preset paper grid on a host without a GPU anyway")
    e.add_argument("--device", help="pipeline.device of every run (default auto)")
    e.add_argument("--fresh", action="store_true", help="redo cells that already finished")
    e.add_argument("--steps", type=int, help="optimizer steps per run")
    e.add_argument("--runtime", choices=["local", "distributed"], help="runtime of every run")
    e.add_argument("--defenses", help="robustness: comma-separated subset of "
                   "none,restart,skip,repair (default: all)")
    e.add_argument("--tactics", help="adaptive: comma-separated subset of the tactics (default: "
                   "all)")
    e.add_argument("--cuts", help="privacy: comma-separated cut depths (default 1,2,4,8,16)")
    e.add_argument("--sigmas", help="privacy: comma-separated noise levels (x token RMS)")
    e.add_argument("overrides", nargs="*", help="config overrides for every run, key=value")

    add_split_parser(sub)

    la = sub.add_parser("launch", help="run a phalanx command as one local process per stage")
    la.add_argument("--nproc", type=int, required=True, help="number of processes (= stages)")
    la.add_argument("args", nargs=argparse.REMAINDER, help="the phalanx command, after --")

    c = sub.add_parser(
        "check", help="correctness checks",
        description="equivalence: one pipeline iteration against the single-process step. gpu: "
        "the equivalence check for every stage count, schedule and runtime on a device, plus a "
        "short training, as one JSON line (default model: random-smollm2, SmolLM2's shape).")
    c.add_argument("what", choices=["equivalence", "gpu"])
    c.add_argument("--model", help="smollm2 (equivalence default), random-smollm2 (gpu "
                   "default), tiny, a model folder")
    c.add_argument("--stages", type=int, default=4)
    c.add_argument("--schedule", default="1f1b")
    c.add_argument("--runtime", default="local")
    c.add_argument("--device", help="pipeline.device (equivalence default auto; gpu: cuda)")
    c.add_argument("--precision", default="fp32", help="fp32 or bf16")
    c.add_argument("--micro-batches", type=int, default=4)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--seq-len", type=int, default=64)
    c.add_argument("--stage-counts", default="2,4", help="gpu: stage counts to check")
    c.add_argument("--runtimes", default="local,distributed", help="gpu: runtimes to check")
    c.add_argument("--train-steps", type=int, default=20, help="gpu: steps of the training")

    k = sub.add_parser(
        "keys", help="identities and the roster of the secure transport",
        description="new: an Ed25519 key and its certificate in --out (key.pem is 0600; share "
        "only cert.pem). roster: the data owner's list of admitted stages, one identity folder "
        "(or a copy of its cert.pem beside a key) per stage, in stage order. token: a one-time "
        "secret that lets a participant bind a key it made itself to a stage (secure.token).")
    ks = k.add_subparsers(dest="action", required=True, metavar="{new,roster,token}")
    kn = ks.add_parser("new", help="a new identity (key.pem, cert.pem) in --out")
    kn.add_argument("--out", required=True, help="identity folder")
    kn.add_argument("--name", help="a name for the certificate")
    kr = ks.add_parser("roster", help="the roster admitting these identities as stages 0..N-1")
    kr.add_argument("--out", required=True, help="roster file")
    kr.add_argument("identities", nargs="+", help="identity folders of stages 0..N-1; '-' "
                    "for a stage a participant will join with a token (printed)")
    kt = ks.add_parser("token", help="a one-time join token binding a new key to a stage")
    kt.add_argument("--roster", required=True, help="the coordinator's roster file")
    kt.add_argument("--stage", required=True, type=int, help="the stage (1..N-1) to bind")

    r = sub.add_parser("report", help="summary table and loss plot of a run directory")
    r.add_argument("run_dir", help="a train.out_dir")

    b = sub.add_parser("bench", help="benchmarks (code in benchmarks/)")
    b.add_argument("name", choices=["pipeline", "defense", "secure", "split", "tolerance"])
    b.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")

    w = sub.add_parser("worker")  # one rank of a spawned job; no help: not listed
    w.add_argument("job", choices=["equivalence", "session"])
    w.add_argument("--out", required=True)
    w.add_argument("overrides", nargs="*")
    return ap


def _config(path: str | None, overrides: list[str]):  # noqa: ANN202
    from phalanx.config import load_config
    from phalanx.train import Config

    cfg = load_config(Config, path, overrides)
    cfg.validate()
    return cfg


def _preflight(cfg, resume: bool = False) -> None:  # noqa: ANN001
    """Catch bad input before any process is spawned or any weight is loaded; print the
    warnings once, here, rather than once per stage."""
    from phalanx.train.preflight import preflight

    for w in preflight(cfg, resume):
        print(f"phalanx: warning: {w}", file=sys.stderr)


def cmd_train(a: argparse.Namespace, argv: list[str]) -> int:
    from phalanx.pipeline.distributed import under_launcher
    from phalanx.train import Trainer

    cfg = _config(a.config, a.overrides)
    one_stage = cfg.pipeline.runtime == "secure" and cfg.secure.stage >= 0  # one host's stage
    if not under_launcher():
        _preflight(cfg, a.resume)
        if cfg.secure.stage <= 0:  # the data owner's: its own batches
            from phalanx.train.exposure import report_exposure

            report_exposure(cfg)
        if cfg.pipeline.runtime == "distributed":  # started by hand: one process per stage
            from phalanx.launch import spawn

            return spawn(cfg.pipeline.stages, argv, log_dir=Path(cfg.train.out_dir))
        if cfg.pipeline.runtime == "secure" and not one_stage:
            return _spawn_secure(cfg, argv)
    trainer = Trainer(cfg, resume=a.resume, progress=_STATUS.progress)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if summary is not None:
        keys = ("val_ppl_start", "val_ppl_end", "tokens_per_s", "peak_rss_mb", "wall_s")
        print(json.dumps({k: summary[k] for k in keys}))
        print(f"run directory: {cfg.train.out_dir}", file=sys.stderr)
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from phalanx.defense.tolerance import calibration

    if a.source:
        summary_path = Path(a.source)
    else:
        forced = ['defense.verify="duplicate"', 'defense.tolerance="measure"', "defense.rtol=0",
                  "defense.atol=0", 'defense.calibration=""', 'attack.forward="none"',
                  'attack.backward="none"', 'attack.adaptive="none"']
        argv = ["train", *(["--config", a.config] if a.config else []), *a.overrides, *forced]
        code = cmd_train(_parser().parse_args(argv), argv)
        if code:
            return code
        summary_path = Path(_config(a.config, [*a.overrides, *forced]).train.out_dir,
                            "summary.json")
    try:
        summary = json.loads(summary_path.read_text())
        defense, stages = summary["defense"], summary["config"]["pipeline"]["stages"]
        measured = summary["config"]["defense"]["tolerance"] == "measure"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PhalanxError(f"{summary_path}: not the summary of a run with the duplicated "
                           f"block ({type(exc).__name__}: {exc})") from None
    if not measured:
        raise PhalanxError(f"{summary_path}: the run compared with defense.tolerance other "
                           "than measure, so its disagreeing messages were not measured")
    steps = summary.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise PhalanxError(f"{summary_path}: steps={steps!r} is not a number of steps")
    doc = calibration(defense.get("deviation", {}), stages, a.margin, steps,
                      {"summary": str(summary_path), "comparisons": defense.get("comparisons"),
                       "model": summary.get("model")})
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({"comparisons": defense.get("comparisons"), "rtol": doc["rtol"]}))
    print(f"calibration: {a.out} (use defense.tolerance=\"calibrated\" "
          f"defense.calibration=\"{a.out}\")", file=sys.stderr)
    return 0


def _spawn_secure(cfg, argv: list[str]) -> int:  # noqa: ANN001
    """All stages on this host over TLS links: throwaway identities unless given."""
    from phalanx.launch import spawn
    from phalanx.launch.supervisor import free_port

    extra = []
    with tempfile.TemporaryDirectory(prefix="phalanx-keys-") as tmp:
        if not (cfg.secure.key and cfg.secure.roster):
            from phalanx.secure.local import local_identities

            extra += local_identities(Path(tmp), cfg.pipeline.stages)
        if not cfg.secure.coordinator:
            extra.append(f'secure.coordinator="127.0.0.1:{free_port()}"')
        return spawn(cfg.pipeline.stages, [*argv, *extra], log_dir=Path(cfg.train.out_dir))


def cmd_keys(a: argparse.Namespace) -> int:
    """Identities, the roster and join tokens of the secure transport."""
    from phalanx.secure.identity import Roster, load_identity, load_roster, member_of, new_identity
    from phalanx.secure.join import token_text

    if a.action == "new":
        ident = new_identity(Path(a.out), a.name or Path(a.out).name)
        print(json.dumps({"identity": str(ident.cert_path.parent),
                          "fingerprint": ident.fingerprint}))
        return 0
    if a.action == "token":
        roster = load_roster(a.roster)
        if not 0 < a.stage < roster.size:
            raise PhalanxError(f"--stage {a.stage}: a join token is for a stage 1.."
                               f"{roster.size - 1} of this roster (stage 0 is the coordinator)")
        secret = roster.new_token(a.stage)
        roster.save()
        print(json.dumps({"stage": a.stage,
                          "token": token_text(a.stage, secret, roster.members[0].fingerprint)}))
        return 0
    if not a.identities or a.identities[0] == "-":
        raise PhalanxError("the first identity of a roster is stage 0's, the coordinator's: "
                           "give its folder")
    ids = {i: load_identity(d) for i, d in enumerate(a.identities) if d != "-"}
    roster = Roster([member_of(i, Path(a.identities[i]).name, x.cert_pem)
                     for i, x in ids.items()])
    out = Path(a.out)
    tokens = {i: token_text(i, roster.new_token(i), roster.members[0].fingerprint)
              for i, d in enumerate(a.identities) if d == "-"}
    roster.save(out)
    print(json.dumps({"roster": a.out, "stages": [x.fingerprint[:16] for x in ids.values()],
                      **({"tokens": tokens} if tokens else {})}))
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from phalanx.cli.demo import run_demo

    return run_demo(a.out, a.overrides)


# which experiments read each option; given to any other, it is refused rather than ignored
_APPLIES = {"preset": {"robustness"}, "force": {"robustness"}, "device": {"robustness"},
            "runtime": {"robustness"}, "defenses": {"robustness"}, "tactics": {"adaptive"},
            "cuts": {"privacy"}, "sigmas": {"privacy"},
            "fresh": {"robustness", "split", "adaptive"},
            "steps": {"robustness", "detection", "split", "adaptive"},
            "overrides": {"robustness", "detection", "split", "adaptive"}}


def _check_options(a: argparse.Namespace) -> None:
    """One line naming the options that ``phalanx experiment NAME`` would not read."""
    given = [k for k in _APPLIES if getattr(a, k) not in (None, False, [])]
    stray = [k for k in given if a.name not in _APPLIES[k]]
    if stray:
        names = ", ".join("config overrides" if k == "overrides" else f"--{k}" for k in stray)
        raise PhalanxError(f"experiment {a.name} does not use {names}")
    if a.steps is not None and a.steps < 1:
        raise PhalanxError("--steps must be at least 1")


def cmd_experiment(a: argparse.Namespace) -> int:
    from phalanx.experiments import robustness as rb

    _check_options(a)
    a.out = a.out or f"results/{a.name}"
    if a.name == "detection":
        return _detection(a)
    if a.name == "adaptive":
        return _adaptive(a)
    if a.name == "split":
        return _split(a)
    if a.name == "privacy":
        return _privacy(a)
    if a.quick and a.preset:
        raise PhalanxError("--quick and --preset are alternatives: choose one")
    spec = rb.Spec.quick() if a.quick else rb.Spec.paper() if a.preset else rb.Spec()
    if a.device:
        spec.device = a.device
    if a.steps is not None:
        spec.steps = a.steps
        spec.eval_every = max(1, min(spec.eval_every, a.steps // 2))
    if a.runtime:
        spec.runtime = a.runtime
    if a.defenses:
        chosen = tuple(d.strip() for d in a.defenses.split(","))
        if not set(chosen) <= set(rb.DEFENSES) or "none" not in chosen:
            raise PhalanxError(f"--defenses={a.defenses!r}: choose among "
                               f"{','.join(rb.DEFENSES)}, including none")
        spec.defenses = chosen
    spec.extra = list(a.overrides)
    cells = rb.grid(spec)
    _preflight(_config(None, rb.overrides(spec, cells[-1], Path(a.out) / "check")))
    if a.preset:
        _estimate(spec, cells, a.force)
    out = Path(a.out)
    rows = rb.Runner(spec, out, fresh=a.fresh).run()
    summary = rb.write(rows, spec, out)
    print((out / "table.md").read_text())
    print(json.dumps(summary["totals"]))
    print(f"results: {out}/summary.json, {out}/table.md, {out}/val_ppl.png", file=sys.stderr)
    return 0


def _estimate(spec, cells: list, force: bool) -> None:  # noqa: ANN001
    """Say how long the grid will take here (two measured iterations); refuse a GPU-sized grid
    on a CPU-only host unless forced."""
    from phalanx.experiments.estimate import grid_seconds, probe_step_s
    from phalanx.pipeline.devices import stage_devices

    device = stage_devices(spec.device, 1)[0]
    print(f"phalanx: timing two iterations of the grid's first run on {device} ...",
          file=sys.stderr, flush=True)
    step_s = probe_step_s(spec)
    hours = grid_seconds(spec, cells, step_s) / 3600
    print(f"phalanx: {len(cells)} runs of {spec.steps} steps; one iteration takes {step_s:.2f} s "
          f"here: estimated {hours:.1f} h", file=sys.stderr, flush=True)
    if device.type == "cpu" and not force:
        raise PhalanxError(f"--preset paper is sized for a GPU and would take about {hours:.0f} "
                           "h on this CPU-only host: run it where a GPU is, or add --force")


def _detection(a: argparse.Namespace) -> int:
    from phalanx.experiments import detection as dt

    spec = dt.DetectionSpec.quick() if a.quick else dt.DetectionSpec()
    if a.steps is not None:
        spec.steps = a.steps
    spec.extra = list(a.overrides)
    rows = dt.run(spec, Path(a.out))
    print((Path(a.out) / "table.md").read_text())
    missed = sum(r["attacked_iterations"] - r["detected_iterations"] for r in rows)
    return 0 if missed == 0 else 1


def _numbers(text: str, kind: type, what: str) -> tuple:
    try:
        return tuple(kind(x) for x in text.split(","))
    except ValueError:
        raise PhalanxError(f"{what}={text!r}: give comma-separated numbers") from None


def _privacy(a: argparse.Namespace) -> int:
    from phalanx.experiments import privacy as pv

    spec = pv.PrivacySpec.quick() if a.quick else pv.PrivacySpec()
    if a.cuts:
        spec.cuts = _numbers(a.cuts, int, "--cuts")
    if a.sigmas:
        spec.sigmas = _numbers(a.sigmas, float, "--sigmas")
    out = Path(a.out)
    pv.run(spec, out)
    return _show(out, "recovery.png")


def _show(out: Path, plot: str) -> int:
    """Print an experiment's table and say where its results are."""
    print((out / "table.md").read_text())
    print(f"results: {out}/summary.json, {out}/table.md, {out}/{plot}", file=sys.stderr)
    return 0


def _split(a: argparse.Namespace) -> int:
    from phalanx.experiments import split as sp

    spec = sp.SplitSpec.quick() if a.quick else sp.SplitSpec()
    if a.steps is not None:
        spec.steps = a.steps
    spec.extra = list(a.overrides)
    out = Path(a.out)
    for method in spec.methods:  # bad overrides: one line before anything loads
        _config(None, sp.settings(spec, method, out / "check"))
    sp.run(spec, out, fresh=a.fresh)
    return _show(out, "split.png")


def _adaptive(a: argparse.Namespace) -> int:
    from phalanx.experiments import adaptive as ad

    spec = ad.AdaptiveSpec.quick() if a.quick else ad.AdaptiveSpec()
    if a.steps is not None:
        spec.steps = a.steps
    if a.tactics:
        chosen = tuple(t.strip() for t in a.tactics.split(","))
        unknown = set(chosen) - set(ad.TACTICS)
        if unknown:
            raise PhalanxError(f"--tactics: unknown {', '.join(sorted(unknown))}; choose among "
                               f"{', '.join(sorted(ad.TACTICS))}")
        spec.tactics = chosen
        spec.second = tuple(t for t in spec.second if t in chosen)
        spec.secure = tuple(t for t in spec.secure if t in chosen)
    spec.extra = list(a.overrides)
    out = Path(a.out)
    _preflight(_config(None, ad.settings(spec, out / "check", "drift", "skip")))
    ad.run(spec, out, fresh=a.fresh)
    print((out / "table.md").read_text())
    print(f"results: {out}/summary.json, {out}/table.md", file=sys.stderr)
    return 0


def cmd_launch(a: argparse.Namespace) -> int:
    from phalanx.launch import spawn

    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    if not args:
        raise PhalanxError("give the command to launch after --, e.g. "
                           "phalanx launch --nproc 4 -- train pipeline.runtime=distributed")
    if a.nproc < 1:
        raise PhalanxError("--nproc must be at least 1")
    return spawn(a.nproc, args)


def cmd_check(a: argparse.Namespace) -> int:
    from phalanx.train import equivalence as eq

    if a.what == "gpu":
        from phalanx.train.devicecheck import device_check

        rec = device_check(a.model or "random-smollm2", a.device, a.precision,
                           stages=_ints(a.stage_counts), runtimes=a.runtimes.split(","),
                           train_steps=a.train_steps, batch_size=a.batch_size,
                           seq_len=a.seq_len, micro_batches=a.micro_batches)
        print(json.dumps(rec))
        return 0 if rec["all_ok"] else 1
    cfg = _config(None, eq.check_overrides(
        a.model or "smollm2", a.stages, a.schedule, a.runtime, a.micro_batches, a.batch_size,
        a.seq_len, device=a.device, precision=a.precision))
    _preflight(cfg)
    rec = eq.check_local(cfg) if cfg.pipeline.runtime == "local" else eq.check_distributed(cfg)
    print(json.dumps(rec))
    return 0 if rec["ok"] else 1


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PhalanxError(f"--stage-counts={text!r}: give stage counts such as 2,4") from None


def cmd_report(a: argparse.Namespace) -> int:
    from phalanx.experiments.report import markdown, plot_run, read_run

    run = Path(a.run_dir)
    _, summary = read_run(run)
    print(markdown(summary))
    print(f"\nplot: {plot_run(run)}")
    return 0


def cmd_worker(a: argparse.Namespace) -> int:
    if a.job == "session":
        from phalanx.experiments.session import run_session

        run_session(Path(a.out), progress=_STATUS.progress)
        return 0
    from phalanx.config import load_config
    from phalanx.train import Config
    from phalanx.train.equivalence import worker_main

    worker_main(load_config(Config, None, a.overrides), Path(a.out))
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    import runpy

    root = Path(__file__).resolve().parents[3]
    script = root / "benchmarks" / f"{a.name}.py"
    if not script.is_file():
        raise PhalanxError(f"benchmark {script} not found: run from a phalanx source checkout")
    sys.argv = [str(script), *(a.args[1:] if a.args[:1] == ["--"] else a.args)]
    runpy.run_path(str(script), run_name="__main__")
    return 0


class _Status:
    """This process's word to its launcher, when it is a stage started by ``phalanx.launch``."""

    def __init__(self) -> None:
        self.file = None

    def join(self) -> None:
        from phalanx.launch import join_launcher

        self.file = join_launcher()

    def progress(self, phase: str, step: int | None) -> None:
        if self.file is not None:
            self.file.update(phase, step)


_STATUS = _Status()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=os.environ.get("PHALANX_LOG", "WARNING"),
                        format="%(levelname)s %(name)s: %(message)s")
    a = _parser().parse_args(argv)
    _STATUS.join()
    stage = _STATUS.file  # a stage of a launch: errors go to the launcher's report
    try:
        if a.command == "train":
            return cmd_train(a, argv)
        handlers = {"demo": cmd_demo, "calibrate": cmd_calibrate, "experiment": cmd_experiment,
                    "launch": cmd_launch, "split": cmd_split,
                    "keys": cmd_keys,
                    "check": cmd_check,
                    "bench": cmd_bench, "report": cmd_report, "worker": cmd_worker}
        return handlers[a.command](a)
    except PhalanxError as exc:
        if stage is not None:
            stage.failed(exc, user_error=True)
        else:
            print(f"phalanx: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("phalanx: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if stage is None:
            raise
        stage.failed(exc, user_error=False)  # the traceback goes to the launcher's log
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
