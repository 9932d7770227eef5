"""Adaptive attackers against the defense: every tactic of :mod:`phalanx.threats.adaptive`
under each recovery (skip, repair, restart).

Each cell is an ordinary ``phalanx train`` run (the simulator: one process, the same stage code
as the distributed runtime); all of them run as one session, the model loaded once. Per cell:
attacked and detected iterations, whether the blame named the attacker, the attempts in which an
honest stage was blamed, whether the final weights are bitwise those of an undefended clean run,
and the validation perplexity against that run's. Writes ``summary.json`` and ``table.md``.

The tactics of ``secure`` run once more under repair in the secure runtime: one process per
stage, TLS links pinned to throwaway identities, every frame signed (``phalanx train
pipeline.runtime=secure``, a process start per cell). Such a cell is also compared with its
simulator twin: the same blame in every attempt, and the same losses.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from phalanx.errors import PhalanxError
from phalanx.experiments.report import read_run
from phalanx.experiments.scoring import Cell, score
from phalanx.experiments.session import SessionRun, run_session, stamp_path, write_plan
from phalanx.experiments.spec import ShortRuns
from phalanx.threats.adaptive import TACTICS

RECOVERIES = ("skip", "repair", "restart")
NOT_ATTRIBUTABLE = {"false_evidence", "frame_predecessor", "collude"}
"""Tactics one replica cannot pin on the right stage (README: what is not covered). The cells
run in the simulator, whose links sign: a message that differs by receiver (``equivocate``,
and ``short`` where the verifier's true input comes from another middle stage) is pinned on
its sender by its own signed receipts, and a backward accusation without the signed pair of
gradients that disagreed (``frame_successor``) names its accuser."""
NORM_LIARS = {"nan_norm", "negative_norm", "huge_norm"}
"""Repaired, such a liar keeps its weights (its norm and its replica's disagree)."""


@dataclass(kw_only=True)
class AdaptiveSpec(ShortRuns):
    """Scale of the grid."""

    steps: int = 4
    eval_batches: int = 2
    rate: float = 0.5
    attacker: int = 2  # a middle stage that holds a replica (of stage 1)
    lr: float = 5e-5
    tactics: tuple[str, ...] = tuple(sorted(TACTICS))
    recoveries: tuple[str, ...] = RECOVERIES
    second: tuple[str, ...] = ("collude",)  # tactics run again with defense.second=replica
    # tactics run again under repair in the secure runtime (one process per stage, TLS)
    secure: tuple[str, ...] = ("equivocate", "flag_forge", "frame_successor")
    timeout_s: float = 900  # for a secure cell's processes

    @classmethod
    def quick(cls) -> AdaptiveSpec:
        return cls(model="tiny", stages=4, steps=3, seq_len=16, batch_size=4, lr=1e-3,
                   tactics=("flag_forge", "nan_norm", "false_alert", "short", "eval_poison",
                            "false_evidence"), second=("flag_forge",),
                   secure=("equivocate", "flag_forge"), timeout_s=120)


def settings(spec: AdaptiveSpec, out: Path, tactic: str | None, recovery: str | None,
             second: bool = False) -> list[str]:
    """The ``phalanx train`` settings of one cell (``tactic=None``: clean; ``recovery=None``:
    no defense; ``second``: with the second replica)."""
    o = [f"model.name={json.dumps(spec.model)}", f"pipeline.stages={spec.stages}",
         f"pipeline.micro_batches={spec.micro_batches}", f"train.batch_size={spec.batch_size}",
         f"data.seq_len={spec.seq_len}", f"train.steps={spec.steps}",
         f"train.eval_batches={spec.eval_batches}", f"optim.lr={spec.lr}",
         "optim.warmup_steps=1", "train.save=false", "train.progress=false",
         f"train.seed={spec.seed}", f"train.out_dir={json.dumps(str(out))}"]
    if tactic is not None:
        stages = [spec.attacker, spec.attacker + 1] if tactic == "collude" else [spec.attacker]
        o += [f"attack.adaptive={json.dumps(tactic)}", f"attack.rate={spec.rate}",
              f"attack.stages={json.dumps(stages)}", f"attack.seed={spec.seed}"]
    if recovery is not None:
        o += ['defense.verify="duplicate"', f"defense.recovery={json.dumps(recovery)}"]
    if second:
        o.append('defense.second="replica"')
    return o + spec.extra


@dataclass(frozen=True)
class CellSpec:
    """One run of the grid (``tactic=None``: the clean reference; ``recovery=None``: no
    defense)."""

    name: str
    tactic: str | None
    recovery: str | None
    second: bool = False  # with the second replica
    secure: bool = False  # in the secure runtime, one process per stage


SECURE_RECOVERY = "repair"


def cells(spec: AdaptiveSpec) -> list[CellSpec]:
    """Every run: the clean reference first."""
    out = [CellSpec("clean", None, None)]
    out += [CellSpec(f"{t}-{r}", t, r) for t in spec.tactics for r in spec.recoveries]
    out += [CellSpec(f"{t}-{r}-second", t, r, second=True)
            for t in spec.second for r in spec.recoveries]
    for t in spec.secure:  # with its simulator twin
        if t not in spec.tactics or SECURE_RECOVERY not in spec.recoveries:
            out.append(CellSpec(f"{t}-{SECURE_RECOVERY}", t, SECURE_RECOVERY))
        out.append(CellSpec(f"{t}-{SECURE_RECOVERY}-secure", t, SECURE_RECOVERY, secure=True))
    return out


def _session_run(spec: AdaptiveSpec, out: Path, c: CellSpec) -> SessionRun:
    o = settings(spec, out / "runs" / c.name, c.tactic, c.recovery, c.second)
    if c.secure:
        o += ['pipeline.runtime="secure"', f"pipeline.timeout_s={spec.timeout_s}"]
    return SessionRun(c.name, o, str(out / "runs" / c.name))


def run(spec: AdaptiveSpec, out: Path, fresh: bool = False) -> list[dict]:
    """Run the grid (reusing finished cells unless ``fresh``); write the results."""
    grid = cells(spec)
    runs = [_session_run(spec, out, c) for c in grid]
    todo = [r for r, c in zip(runs, grid, strict=True)
            if not c.secure and (fresh or not _finished(r))]
    if todo:
        plan = out / "runs" / "session.json"
        plan.parent.mkdir(parents=True, exist_ok=True)
        write_plan(plan, todo)
        run_session(plan)
    for r, c in zip(runs, grid, strict=True):
        if c.secure and (fresh or not _finished(r)):
            run_secure(r, spec.timeout_s)
    _, clean = read_run(Path(runs[0].out))
    by_name = dict(zip((c.name for c in grid), runs, strict=True))
    rows = []
    for c, r in zip(grid, runs, strict=True):
        tactic, recovery, second = c.tactic, c.recovery, c.second
        if tactic is None:
            continue
        records, summary = read_run(Path(r.out))
        covers = frozenset({spec.attacker + 1}) if tactic == "collude" else frozenset()
        row = score(Cell(tactic, spec.rate, recovery), records, summary, covers)
        if tactic == "eval_poison":  # training is not attacked: what counts is the validation
            row.update(attacked_iterations=None, detected_iterations=None, blame_correct=None)
        rows.append({
            "tactic": tactic, "recovery": recovery, "second_replica": second,
            "attacked": row["attacked_iterations"],
            "detected": row["detected_iterations"], "blame_correct": row["blame_correct"],
            "honest_blamed": row["false_alerts"], "in_vain": row["attacks_in_vain"],
            "dropped": row["skipped_steps"],
            "weights_equal_clean": summary.get("weights_sha256") == clean.get("weights_sha256"),
            "ppl_ratio_to_clean": summary["val_ppl_end"] / clean["val_ppl_end"]
            if math.isfinite(summary["val_ppl_end"]) else float("inf"),
            "attributable": tactic not in NOT_ATTRIBUTABLE or (second and tactic == "collude"),
            "runtime": "secure" if c.secure else "simulator",
            "same_as_simulator": _same(records, by_name.get(f"{tactic}-{recovery}"))
            if c.secure else None,
        })
        print(f"{c.name}: detected {row['detected_iterations']}/{row['attacked_iterations']}",
              file=sys.stderr, flush=True)
    write(rows, spec, out)
    return rows


def run_secure(r: SessionRun, timeout_s: float) -> None:
    """One cell in the secure runtime: ``phalanx train`` starts a process per stage, with
    throwaway identities and roster; the directory is marked finished when it succeeds."""
    print(f"[secure] {r.name} ...", file=sys.stderr, flush=True)
    try:
        done = subprocess.run([sys.executable, "-m", "phalanx.cli", "train", *r.settings],
                              capture_output=True, text=True, timeout=timeout_s * 2)
    except subprocess.TimeoutExpired:
        raise PhalanxError(f"the secure cell {r.name} ran past {2 * timeout_s:.0f} s") from None
    if done.returncode != 0:
        raise PhalanxError(f"the secure cell {r.name} failed (exit {done.returncode}): "
                           f"{done.stderr.strip()[-1500:]}")
    stamp_path(r.out).write_text(json.dumps(r.settings, indent=1) + "\n")


def _blame_trace(records: list[dict]) -> list[tuple]:
    """Who was blamed in each attempt of each step."""
    return [(tuple(x.get("blamed", [])), tuple(tuple(t["blamed"]) for t in x.get("redone", [])))
            for x in records]


def _same(records: list[dict], twin: SessionRun | None) -> bool | None:
    """Whether a secure cell blamed as its simulator twin did, attempt by attempt, with the
    same losses to float tolerance (``None`` where the twin was not run)."""
    if twin is None or not _finished(twin):
        return None
    theirs = read_run(Path(twin.out))[0]
    if len(records) != len(theirs) or _blame_trace(records) != _blame_trace(theirs):
        return False
    return all(math.isclose(a["loss"], b["loss"], rel_tol=1e-5)
               for a, b in zip(records, theirs, strict=True))


def _n(value: int | None) -> str:
    return "–" if value is None else str(value)


def _finished(r: SessionRun) -> bool:
    stamp = stamp_path(r.out)
    return stamp.is_file() and json.loads(stamp.read_text()) == r.settings


def write(rows: list[dict], spec: AdaptiveSpec, out: Path) -> None:
    covered = [r for r in rows if r["attributable"]]
    totals = {
        "attacked": sum(r["attacked"] or 0 for r in rows),
        "detected": sum(r["detected"] or 0 for r in rows),
        "honest_blamed_covered": sum(r["honest_blamed"] or 0 for r in covered),
        "repair_equals_clean_covered": all(r["weights_equal_clean"] for r in covered
                                           if r["recovery"] == "repair"
                                           and r["tactic"] not in NORM_LIARS),
    }
    (out / "summary.json").write_text(json.dumps(
        {"spec": asdict(spec), "totals": totals, "runs": rows}, indent=1) + "\n")
    lines = [f"Adaptive attackers: {spec.model}, {spec.stages} stages, {spec.steps} iterations, "
             f"stage {spec.attacker} attacking with p = {spec.rate} (collude: stages "
             f"{spec.attacker} and {spec.attacker + 1}).", "",
             "| tactic | recovery | attacked | detected | blame correct | honest blamed | "
             "in vain | dropped | weights = clean | ppl × clean |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bc = "–" if r["blame_correct"] is None else f"{100 * r['blame_correct']:.0f}%"
        name = r["tactic"] + ("" if r["attributable"] else " †")
        recovery = r["recovery"] + (" + second replica" if r["second_replica"] else "")
        if r.get("runtime") == "secure":
            recovery += f" (secure runtime, {spec.stages} processes; same as simulator: " + (
                "–" if r["same_as_simulator"] is None else
                "yes" if r["same_as_simulator"] else "no") + ")"
        lines.append(f"| {name} | {recovery} | {_n(r['attacked'])} | {_n(r['detected'])} | "
                     f"{bc} | "
                     f"{r['honest_blamed']} | {r['in_vain']} | {r['dropped']} | "
                     f"{'yes' if r['weights_equal_clean'] else 'no'} | "
                     f"{r['ppl_ratio_to_clean']:.4f} |")
    lines += ["", "† not attributable with one replica (README, threat model): detected, but the "
              "blame can fall on an honest neighbour."]
    (out / "table.md").write_text("\n".join(lines) + "\n")
