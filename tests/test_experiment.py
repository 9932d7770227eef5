"""`phalanx experiment robustness --quick`: the whole grid runs, every attacked iteration of a
defended run is detected and blamed on the attacker, no honest iteration raises an alert, and
the results are written as the issue asks."""

from __future__ import annotations

import json

import pytest

from phalanx.cli.main import main
from phalanx.experiments.robustness import Spec, grid
from phalanx.experiments.scoring import Cell, attempts, score

KEYS = {"attack", "rate", "defense", "val_ppl_end", "ppl_ratio_to_clean", "attacked_iterations",
        "detected_iterations", "false_alerts", "blame_correct", "tokens_per_s", "wall_s"}


def test_quick_grid_detects_every_attack_without_false_alerts(tmp_path, capsys):
    out = tmp_path / "rb"
    assert main(["experiment", "robustness", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["runs"]
    assert len(rows) == 18 and all(KEYS <= set(r) for r in rows)
    assert {(r["attack"], r["rate"], r["defense"]) for r in rows} == {
        (c.attack, c.rate, c.defense) for c in grid(Spec.quick())}
    t = summary["totals"]
    assert t["attacked_iterations_defended"] > 20
    assert t["detection_rate"] == 1.0 and t["false_alerts"] == 0 and t["blame_correct"] == 1.0
    undefended = [r for r in rows if r["defense"] == "none" and r["attack"] != "clean"]
    assert all(r["detected_iterations"] == 0 and r["attacked_iterations"] > 0
               for r in undefended)
    clean = next(r for r in rows if r["run"] == "clean")
    watched = next(r for r in rows if r["attack"] == "clean" and r["defense"] == "skip")
    assert watched["val_ppl_end"] == clean["val_ppl_end"]  # the defense alone changes nothing
    assert all(r["ppl_ratio_to_clean"] > 1 for r in undefended)  # the attacks do harm
    assert (out / "table.md").read_text().count("\n| ") == 19
    for r in rows:  # repair recovery trains exactly the clean model
        if r["defense"] == "repair":
            assert r["val_ppl_end"] == clean["val_ppl_end"] and r["detected_iterations"] > 0
    assert (out / "val_ppl.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the finished cells
    before = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    assert main(["experiment", "robustness", "--quick", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")} == before
    assert "| sign_flip | 0.7 | skip |" in capsys.readouterr().out


def test_score_counts_redone_attempts_and_misplaced_blame():
    records = [
        {"step": 0, "malicious": [], "alerts": {}, "blamed": []},
        {"step": 1, "malicious": [], "alerts": {}, "blamed": [],
         "redone": [{"malicious": [2], "alerts": {"2": 1}, "blamed": [2]},
                    {"malicious": [3], "alerts": {"2": 1}, "blamed": [2]}]},
        {"step": 2, "malicious": [1], "alerts": {}, "blamed": []},
    ]
    assert len(attempts(records)) == 5
    summary = {"val_loss_start": 1.0, "val_loss_end": 0.5, "val_ppl_start": 2.7,
               "val_ppl_end": 1.6, "steps": 3, "tokens_per_s": 1.0, "wall_s": 1.0}
    row = score(Cell("sign_flip", 0.5, "restart"), records, summary)
    assert (row["attacked_iterations"], row["detected_iterations"]) == (3, 2)
    assert row["false_alerts"] == 1 and row["blame_correct"] == 0.5  # stage 2 named for 3
    assert row["redone_iterations"] == 2 and row["honest_iterations"] == 2


def test_a_colluder_whose_forging_partner_is_out_of_the_path_attacks_in_vain():
    """With the forger (2) bypassed, its quiet partner (3) has nothing to hide: the attempt is
    in vain, not a missed detection; with the forger in the path it is attacked and missed."""
    records = [
        {"step": 0, "malicious": [2, 3], "alerts": {}, "blamed": [],
         "redone": [{"malicious": [2, 3], "alerts": {"2": 1}, "blamed": [2],
                     "next": {"bypassed": [2], "repaired": []}}]},
        {"step": 1, "malicious": [2, 3], "alerts": {}, "blamed": []},
    ]
    summary = {"val_loss_start": 1.0, "val_loss_end": 0.5, "val_ppl_start": 2.7,
               "val_ppl_end": 1.6, "steps": 2, "tokens_per_s": 1.0, "wall_s": 1.0}
    row = score(Cell("collude", 0.5, "skip"), records, summary, covers=frozenset({3}))
    assert (row["attacked_iterations"], row["detected_iterations"]) == (2, 1)
    assert row["attacks_in_vain"] == 1
    plain = score(Cell("collude", 0.5, "skip"), records, summary)  # 3 counted as an attacker
    assert (plain["attacked_iterations"], plain["attacks_in_vain"]) == (3, 0)


def test_demo_runs_clean_attacked_and_defended(tmp_path, capsys):
    """The demo's code path, on the tiny model in the simulator (the real demo is SmolLM2)."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), 'model.name="tiny"', 'pipeline.runtime="local"',
                 "optim.lr=1e-3"]) == 0
    text = capsys.readouterr().out
    assert "| clean |" in text and "| attacked, no defense |" in text
    rows = {r["run"]: r for r in json.loads((out / "summary.json").read_text())["runs"]}
    for name in ("sign_flip-p0.7-skip", "sign_flip-p0.7-repair"):
        defended = rows[name]
        assert defended["detected_iterations"] == defended["attacked_iterations"] > 0
        assert defended["blame_correct"] == 1.0 and defended["false_alerts"] == 0
    assert rows["sign_flip-p0.7-repair"]["val_ppl_end"] == rows["clean"]["val_ppl_end"]
    assert (out / "val_ppl.png").is_file()


def test_detection_coverage_of_every_attack(tmp_path, capsys):
    out = tmp_path / "det"
    assert main(["experiment", "detection", "--quick", "--out", str(out)]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert {(r["direction"], r["attack"]) for r in runs} >= {("forward", "forged"),
                                                             ("backward", "gaussian")}
    assert len(runs) == 10
    for r in runs:
        assert r["detected_iterations"] == r["attacked_iterations"] == 2, r
        assert r["blame_correct"] == 1.0 and r["false_alerts"] == 0, r
    assert "| forward | forged | 2 | 2 | 100% | 0 |" in capsys.readouterr().out


def test_model_cache_loads_once_and_hands_out_independent_copies():
    import torch

    from phalanx.experiments.session import ModelCache
    from phalanx.models import ModelConfig, load_model

    calls = []
    cache = ModelCache(lambda cfg: calls.append(cfg) or load_model(cfg))
    a, b = cache(ModelConfig(name="tiny")), cache(ModelConfig(name="tiny"))
    assert len(calls) == 1 and cache.loads == 1
    pa, pb = next(a.model.parameters()), next(b.model.parameters())
    assert pa is not pb and torch.equal(pa, pb)
    with torch.no_grad():
        pa.add_(1.0)  # training one run's copy leaves the next run's start untouched
    assert torch.equal(next(cache(ModelConfig(name="tiny")).model.parameters()), pb)
    cache(ModelConfig(name="tiny", seed=1))
    assert cache.loads == 2


@pytest.mark.slow
def test_a_session_of_distributed_runs_trains_each_exactly_as_alone(tmp_path):
    """One set of 4 stage processes trains three cells in turn (the model loaded once per
    process); each equals the same cell trained alone in the simulator. Under the GPipe
    schedule: the distributed equivalence check covers 1F1B, this covers GPipe across
    processes (the simulator's GPipe equals one process, tests/test_equivalence.py)."""
    from phalanx.experiments.report import read_run
    from phalanx.experiments.robustness import Runner

    spec = Spec.quick()
    spec.steps, spec.runtime = 4, "distributed"
    spec.extra = ['pipeline.schedule="gpipe"']
    cells = [Cell("clean", 0.0, "none"), Cell("sign_flip", 0.7, "skip"),
             Cell("sign_flip", 0.7, "repair")]
    rows = Runner(spec, tmp_path / "d").run(cells)
    assert rows[1]["detected_iterations"] == rows[1]["attacked_iterations"] > 0
    local = Spec.quick()
    local.steps, local.extra = 4, spec.extra
    lrun = Runner(local, tmp_path / "l")
    for cell in cells:
        lrun.train_here(lrun.session_run(cell).settings)
        d, _ = read_run(tmp_path / "d" / "runs" / cell.name)
        ref, _ = read_run(tmp_path / "l" / "runs" / cell.name)
        assert [r["loss"] for r in d] == pytest.approx([r["loss"] for r in ref], rel=1e-6)
        assert (tmp_path / "d" / "runs" / cell.name / "settings.json").is_file()


def test_paper_preset_is_the_papers_setting_at_gpu_scale():
    s = Spec.paper()
    assert (s.stages, s.batch_size // s.micro_batches, s.lr) == (6, 1, 5e-5)  # micro-batch 1
    assert s.steps >= 800 and s.corpus == "stdlib" and s.seq_len == 512
    assert len(grid(s)) == 18


def test_grid_estimate_by_hand():
    from phalanx.experiments.estimate import grid_seconds

    s = Spec.quick()
    s.steps = 10
    cells = [Cell("clean", 0.0, "none"), Cell("sign_flip", 0.7, "skip"),
             Cell("sign_flip", 0.7, "restart")]
    assert grid_seconds(s, cells, 2.0) == pytest.approx((20 + 28 + 44) * 1.1)


def test_paper_preset_refuses_a_cpu_host_with_its_estimate(tmp_path, monkeypatch, capsys):
    import torch

    import phalanx.experiments.estimate as est

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    monkeypatch.setattr(est, "probe_step_s", lambda spec: 10.0)
    code = main(["experiment", "robustness", "--preset", "paper", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    # 26.4 clean-run equivalents x 800 steps x 10 s x 1.1
    assert code == 2 and "estimated 64.5 h" in err and "add --force" in err
    assert not (tmp_path / "runs").exists()  # nothing started


@pytest.mark.parametrize(("args", "message"), [
    (["detection", "--steps", "0"], "--steps must be at least 1"),
    (["adaptive", "--cuts", "1"], "experiment adaptive does not use --cuts"),
    (["split", "--preset", "paper"], "experiment split does not use --preset"),
])
def test_an_option_another_experiment_reads_is_refused_not_ignored(tmp_path, capsys, args,
                                                                  message):
    code = main(["experiment", args[0], "--quick", "--out", str(tmp_path), *args[1:]])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_a_session_frees_each_run_before_the_next(tmp_path, monkeypatch):
    """A run's stages, optimizers and hooks refer to each other: without a collection after
    each run a session held every earlier run's tensors (3 GB a SmolLM2 run, OOM after 58 runs).
    The collector's own pace is taken out of the picture (disabled for the test)."""
    import gc
    import weakref

    from phalanx.experiments import adaptive as ad
    from phalanx.experiments import session as se
    from phalanx.train import Trainer

    spec = ad.AdaptiveSpec.quick()
    runs = [ad._session_run(spec, tmp_path, c) for c in ad.cells(spec)[:3]]
    alive: list[weakref.ref] = []
    real_run = Trainer.run

    def run(self):  # noqa: ANN001, ANN202
        alive.append(weakref.ref(self.runtime))
        return real_run(self)

    monkeypatch.setattr(Trainer, "run", run)
    gc.collect()
    gc.disable()
    try:
        se._run_all(runs, se.ModelCache(), None)
        assert len(alive) == 3 and all(r() is None for r in alive)
    finally:
        gc.enable()
