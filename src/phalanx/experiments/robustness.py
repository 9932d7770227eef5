"""Paper 1's case study: poisoning attacks on a pipeline, with and without the defense.

The grid is {clean} ∪ {forward sign flip, backward N(0, 1)} × {p = 0.3, 0.7} × {no defense,
restart the iteration, duplicated block + jumping connection + skip layer, and the same block
with repair recovery (beyond the paper: the replica's result replaces the poisoned message)},
plus a clean run with the duplicated block on, where every alert would be a false one. Each cell
is an ordinary
``phalanx train`` run in its own directory; this module derives their configs from one base,
runs them (reusing finished cells), and turns their metrics into ``summary.json``, ``table.md``
and plots of validation perplexity over steps.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phalanx.errors import PhalanxError
from phalanx.experiments.scoring import Cell, score
from phalanx.experiments.session import SessionRun, run_session, stamp_path, write_plan

ATTACKS = {"sign_flip": "forward", "gaussian": "backward"}  # the paper's two attacks
DEFENSES = ("none", "restart", "skip", "repair")


@dataclass(kw_only=True)
class Spec:
    """The experiment's scale. The defaults fit the full grid in an hour on 2 CPU cores."""

    model: str = "smollm2"
    stages: int = 6
    runtime: str = "distributed"
    steps: int = 24
    batch_size: int = 4
    micro_batches: int = 4  # the paper's micro-batch of 1
    seq_len: int = 64
    eval_every: int = 8
    eval_batches: int = 6
    lr: float = 5e-5  # the paper's AdamW: lr 5e-5, weight decay 0.01, warm-up, clip 1.0, fp32
    warmup_steps: int = 4
    rates: tuple[float, ...] = (0.3, 0.7)
    defenses: tuple[str, ...] = DEFENSES
    corpus: str = "pydoc"
    device: str = "auto"
    seed: int = 0
    extra: list[str] = field(default_factory=list)  # further config overrides for every run

    @classmethod
    def quick(cls) -> Spec:
        """A minutes-long version on the tiny random model, for tests and smoke runs."""
        return cls(model="tiny", stages=4, runtime="local", steps=8, batch_size=4,
                   micro_batches=2, seq_len=32, eval_every=4, eval_batches=2, lr=1e-3,
                   warmup_steps=1)

    @classmethod
    def paper(cls) -> Spec:
        """Paper 1 at its own scale, as far as SmolLM2 on one GPU allows: 6 stages, micro-batch
        1 (batch 4 in 4 micro-batches), sequences of 512 tokens (the paper: 1024), 800 steps of
        the paper's AdamW, the standard library's docstrings (4x the pydoc text, so the clean
        run does not just memorise it), the simulator on the GPU."""
        return cls(model="smollm2", stages=6, runtime="local", steps=800, batch_size=4,
                   micro_batches=4, seq_len=512, eval_every=50, eval_batches=8, lr=5e-5,
                   warmup_steps=40, corpus="stdlib")


def grid(spec: Spec) -> list[Cell]:
    """Every cell: clean, clean with the defense watching, then attacks × rates × defenses."""
    cells = [Cell("clean", 0.0, "none"), Cell("clean", 0.0, "skip")]
    for attack in ATTACKS:
        for rate in spec.rates:
            cells += [Cell(attack, rate, d) for d in spec.defenses]
    return cells


def overrides(spec: Spec, cell: Cell, out: Path) -> list[str]:
    """The ``phalanx train`` settings of one cell."""
    o = [f"model.name={json.dumps(spec.model)}", f"pipeline.stages={spec.stages}",
         f"pipeline.runtime={json.dumps(spec.runtime)}",
         f"pipeline.micro_batches={spec.micro_batches}", f"data.seq_len={spec.seq_len}",
         f"train.steps={spec.steps}", f"train.batch_size={spec.batch_size}",
         f"train.eval_every={spec.eval_every}", f"train.eval_batches={spec.eval_batches}",
         f"optim.lr={spec.lr}", f"optim.warmup_steps={spec.warmup_steps}",
         "optim.weight_decay=0.01", "optim.clip=1.0", 'model.dtype="float32"',
         "train.save=false", "train.progress=false", f"train.seed={spec.seed}",
         f"data.corpus={json.dumps(spec.corpus)}", f"pipeline.device={json.dumps(spec.device)}",
         f"train.out_dir={json.dumps(str(out))}"]
    if cell.attack != "clean":
        o += [f"attack.{ATTACKS[cell.attack]}={json.dumps(cell.attack)}",
              f"attack.rate={cell.rate}", f"attack.seed={spec.seed}"]
    if cell.defense != "none":
        o += ['defense.verify="duplicate"', f"defense.recovery={json.dumps(cell.defense)}"]
    return o + spec.extra


class Runner:
    """Runs the cells of a grid, skipping finished ones; the cells left run as one session
    (:mod:`phalanx.experiments.session`): one set of stage processes, the model loaded once."""

    def __init__(self, spec: Spec, out: Path, fresh: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.spec, self.out, self.fresh = spec, out, fresh
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))

    def session_run(self, cell: Cell) -> SessionRun:
        run_dir = self.out / "runs" / cell.name
        return SessionRun(cell.name, overrides(self.spec, cell, run_dir), str(run_dir))

    def finished(self, run: SessionRun) -> bool:
        stamp = stamp_path(run.out)
        return (not self.fresh and stamp.is_file() and (Path(run.out) / "summary.json").is_file()
                and json.loads(stamp.read_text()) == run.settings)

    @staticmethod
    def train_here(settings: list[str]) -> None:
        """A simulator run, in this process."""
        from phalanx.config import load_config
        from phalanx.train import Config, Trainer

        trainer = Trainer(load_config(Config, None, settings))
        try:
            trainer.run()
        finally:
            trainer.close()

    def train(self, runs: list[SessionRun]) -> None:
        """Train ``runs`` as one session: in this process for the simulator, else in one
        process per stage."""
        from phalanx.config import load_config
        from phalanx.train import Config

        for run in runs:
            Path(run.out).mkdir(parents=True, exist_ok=True)
            stamp_path(run.out).unlink(missing_ok=True)
        plan = self.out / "runs" / "session.json"
        write_plan(plan, runs)
        cfg = load_config(Config, None, runs[0].settings)
        if cfg.pipeline.runtime == "local":
            run_session(plan)
            return
        from phalanx.launch import spawn

        code = spawn(cfg.pipeline.stages, ["worker", "session", "--out", str(plan)],
                     log_dir=self.out)
        if code:
            raise PhalanxError(f"the session of {len(runs)} runs failed (exit {code}); the "
                               "report above says which stage and why; finished runs are kept")

    def run(self, cells: list[Cell] | None = None) -> list[dict]:
        """Run ``cells`` (the whole grid by default); rows with ``ppl_ratio_to_clean``."""
        from phalanx.experiments.report import read_run

        cells = cells or grid(self.spec)
        runs = [self.session_run(c) for c in cells]
        todo = [r for r in runs if not self.finished(r)]
        if len(todo) < len(runs):
            self.log(f"reusing {len(runs) - len(todo)} finished run(s) in {self.out / 'runs'}")
        t0 = time.perf_counter()
        if todo:
            self.train(todo)
        rows = []
        for cell, run in zip(cells, runs, strict=True):
            rows.append(score(cell, *read_run(Path(run.out))))
        if todo:
            self.log(f"{len(todo)} run(s) in {time.perf_counter() - t0:.0f} s")
        clean = next(r["val_ppl_end"] for r in rows if r["run"] == "clean")
        for r in rows:
            r["ppl_ratio_to_clean"] = r["val_ppl_end"] / clean
        return rows


def totals(rows: list[dict]) -> dict:
    """The targets of the issue, over the whole grid."""
    defended = [r for r in rows if r["defense"] != "none"]
    attacked = sum(r["attacked_iterations"] for r in defended)
    skip_hi = [r for r in rows if r["defense"] == "skip" and r["attack"] != "clean"
               and r["rate"] == max(x["rate"] for x in rows)]
    return {
        "attacked_iterations_defended": attacked,
        "detected_iterations": sum(r["detected_iterations"] for r in defended),
        "detection_rate": sum(r["detected_iterations"] for r in defended) / attacked
        if attacked else None,
        "honest_iterations_checked": sum(r["honest_iterations"] for r in defended),
        "false_alerts": sum(r["false_alerts"] for r in defended),
        "comparisons": sum(r["comparisons"] for r in defended),
        "max_agreeing_deviation": max((r["max_agreeing_deviation"] or 0.0 for r in defended),
                                      default=None),
        "blame_correct": min((r["blame_correct"] for r in defended
                              if r["blame_correct"] is not None), default=None),
        "skip_ppl_ratio_at_max_rate": max((r["ppl_ratio_to_clean"] for r in skip_hi),
                                          default=None),
    }


def table(rows: list[dict], spec: Spec) -> str:
    """The results as Markdown."""
    head = ("| attack | p | defense | val ppl end | × clean | attacked | detected | false alerts "
            "| blame correct | redone | tok/s | wall s |")
    lines = [f"Robustness grid: {spec.model}, {spec.stages} stages ({spec.runtime}), "
             f"{spec.steps} steps of {spec.batch_size}×{spec.seq_len} tokens, lr {spec.lr:g}.",
             "", head, "|" + "---|" * 12]
    for r in rows:
        fa = "–" if r["false_alerts"] is None else str(r["false_alerts"])
        bc = "–" if r["blame_correct"] is None else f"{100 * r['blame_correct']:.0f}%"
        lines.append(
            f"| {r['attack']} | {r['rate']:g} | {r['defense']} | {r['val_ppl_end']:.2f} | "
            f"{r['ppl_ratio_to_clean']:.3f} | {r['attacked_iterations']} | "
            f"{r['detected_iterations']} | {fa} | {bc} | {r['redone_iterations']} | "
            f"{r['tokens_per_s']:.0f} | {r['wall_s']:.0f} |")
    t = totals(rows)
    lines += ["", f"Defended runs: {t['detected_iterations']}/{t['attacked_iterations_defended']} "
              f"attacked iterations detected, {t['false_alerts']} false alerts over "
              f"{t['honest_iterations_checked']} honest checked iterations; "
              f"{t['comparisons']} comparisons, largest relative difference among agreeing ones "
              f"{t['max_agreeing_deviation']:.2g}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> Path:
    """Validation perplexity over steps: one panel per attack and rate, a line per defense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["attack"], r["rate"]) for r in rows if r["attack"] != "clean"})
    clean = next(r for r in rows if r["run"] == "clean")
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2), dpi=110,
                             squeeze=False)
    for ax, (attack, rate) in zip(axes[0], panels, strict=True):
        ax.plot(*zip(*clean["val_ppl_curve"], strict=True), "k--", label="clean", lw=1.6,
                zorder=5)  # on top: repair lies exactly on it
        for r in rows:
            if (r["attack"], r["rate"]) == (attack, rate):
                ax.plot(*zip(*r["val_ppl_curve"], strict=True), "o-", ms=3, lw=1.4,
                        label={"none": "no defense", "restart": "restart",
                               "skip": "dup. block + skip", "repair": "dup. block + repair"}[
                                   r["defense"]])
        ax.set_title(f"{ATTACKS[attack]} {attack}, p = {rate:g}", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation perplexity")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write(rows: list[dict], spec: Spec, out: Path) -> dict:
    """``summary.json``, ``table.md`` and ``val_ppl.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"spec": asdict(spec), "totals": totals(rows), "runs": rows}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "table.md").write_text(table(rows, spec))
    plot(rows, out / "val_ppl.png")
    return summary
