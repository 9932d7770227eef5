"""``privacy.report``: a run's own exposure at the cuts its untrusted stages receive."""

from __future__ import annotations

import json

import pytest

from phalanx.config import load_config
from phalanx.privacy.exposure import untrusted_cuts
from phalanx.train import Config
from phalanx.train.exposure import report_exposure

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ['model.name="tiny"', "data.seq_len=16", "train.batch_size=2", "privacy.report=true",
        "pipeline.micro_batches=2",
        "privacy.tokens=8", "privacy.sequences=2"]


def test_the_untrusted_cuts_are_the_middle_stages_inputs_or_the_servers():
    assert untrusted_cuts([1, 2, 3], None) == [1, 2]  # stages 1, 2 receive; 3 is the owner's
    assert untrusted_cuts([2], None) == []  # two stages: both the data owner's
    assert untrusted_cuts([2], 2) == [2] and untrusted_cuts([1, 3], 1) == [1]  # the server


def test_the_report_reads_the_users_own_batch_at_every_untrusted_cut(tmp_path, capsys):
    cfg = load_config(Config, None, [*TINY, "pipeline.stages=4", 'privacy.cuts="all"',
                                     f'train.out_dir="{tmp_path}"', "privacy.budget=4096"])
    rows = report_exposure(cfg)
    assert [r["cut"] for r in rows] == [1, 2]  # tiny: 4 layers, one per stage
    for r in rows:  # the attacker knows the weights: a random model is injective as well
        assert r["token_recovery"] == 1.0 and r["tokens"] == 16
    doc = json.loads((tmp_path / "exposure.json").read_text())
    assert [r["cut"] for r in doc["cuts"]] == [1, 2]
    err = capsys.readouterr().err
    assert "at cut 1" in err and "recovers 100% of 16 tokens of your batches" in err


def test_a_budget_of_one_candidate_reads_less_than_the_whole_vocabulary(tmp_path):
    """The recovery is measured, not assumed: one candidate per position (the table's first
    guess, at a cut where it is not always right) recovers less."""
    cfg = load_config(Config, None, [*TINY, "pipeline.stages=3", f'train.out_dir="{tmp_path}"',
                                     "privacy.budget=1", "privacy.tokens=16"])
    (row,) = report_exposure(cfg)
    assert row["cut"] == 2 and row["token_recovery"] < 1.0  # tiny in 3 stages: layers 2, 1, 1


def test_no_untrusted_stage_no_report_and_off_by_default(tmp_path, capsys):
    cfg = load_config(Config, None, [*TINY, "pipeline.stages=2", f'train.out_dir="{tmp_path}"'])
    assert report_exposure(cfg) == []
    assert "no stage outside the data owner's" in capsys.readouterr().err
    off = load_config(Config, None, ['model.name="tiny"', f'train.out_dir="{tmp_path / "o"}"'])
    assert report_exposure(off) == [] and not (tmp_path / "o").exists()


def test_a_split_run_reports_the_servers_cut(tmp_path):
    cfg = load_config(Config, None, [*TINY, 'split.mode="layers"', "split.cut=2",
                                     'trainable.method="lora"', f'train.out_dir="{tmp_path}"',
                                     "privacy.budget=4096"])
    cfg.validate()  # (what the CLI does: the split sets the stages)
    (row,) = report_exposure(cfg)
    assert row["cut"] == 2 and row["token_recovery"] == 1.0


@pytest.mark.parametrize(("setting", "match"), [
    ('privacy.cuts="some"', "privacy.cuts='some' is unknown"),
    ("privacy.budget=0", "privacy.budget=0 must be"),
    ("privacy.tokens=-1", "privacy.tokens=-1 must be"),
])
def test_bad_privacy_settings_are_one_line_exit_2(setting, match, cli, tmp_path):
    code, err = cli("train", *TINY, setting, f'train.out_dir="{tmp_path}"')
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1
