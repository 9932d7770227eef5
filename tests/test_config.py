"""Configs: TOML files, dotted overrides, unknown keys and bad types."""

from __future__ import annotations

import pytest

from phalanx.config import apply_overrides, load_config, parse_override, to_dict, to_overrides
from phalanx.errors import ConfigError
from phalanx.train import Config


def test_defaults_and_overrides():
    cfg = load_config(Config, None, ["pipeline.stages=2", "optim.lr=1e-3", 'model.name="tiny"',
                                     "pipeline.boundaries=[2]", "model.name=tiny"])
    assert cfg.pipeline.stages == 2 and cfg.optim.lr == 1e-3
    assert cfg.model.name == "tiny" and cfg.pipeline.boundaries == [2]


def test_toml_file_then_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[pipeline]\nstages = 3\nschedule = "gpipe"\n[train]\nsteps = 7\n')
    cfg = load_config(Config, p, ["train.steps=9"])
    assert (cfg.pipeline.stages, cfg.pipeline.schedule, cfg.train.steps) == (3, "gpipe", 9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.stagez=2", "unknown config key 'pipeline.stagez'"),
        ("nope.x=1", "unknown config key 'nope'"),
        ("pipeline.stages=two", "pipeline.stages must be an integer"),
        ("pipeline.stages=2.5", "must be an integer"),
        ("optim.lr=fast", "optim.lr must be a number"),
        ("train.progress=1", "must be true or false"),
        ("pipeline.boundaries=3", "must be a list"),
        ("justakey", "key=value"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Config, None, [override])


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[pipeline\nstages=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(Config, bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Config, tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.schedule=zigzag", "schedule"),
        ("pipeline.runtime=cloud", "runtime"),
        ("train.batch_size=6", "multiple"),
        ("optim.decay=step", "decay"),
        ("pipeline.micro_batches=0", "at least 1"),
    ],
)
def test_validation(override, message):
    cfg = load_config(Config, None, [override])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_overrides_round_trip():
    cfg = load_config(Config, None, ["pipeline.boundaries=[1, 3]", 'train.out_dir="a \\"b\\""'])
    again = load_config(Config, None, to_overrides(to_dict(cfg)))
    assert to_dict(again) == to_dict(cfg)


def test_parse_override_falls_back_to_string():
    assert parse_override("model.name=/tmp/x y") == (["model", "name"], "/tmp/x y")
    assert apply_overrides({}, ["a.b=1"]) == {"a": {"b": 1}}


def test_shipped_configs_load_and_defaults_file_is_current():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    for path in root.glob("*.toml"):
        load_config(Config, path).validate()
    assert to_dict(load_config(Config, root / "defaults.toml")) == to_dict(Config())
