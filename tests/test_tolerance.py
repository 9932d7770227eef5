"""Tolerances of the duplicated block: bitwise by default, RMS-scaled (not max-scaled) when set,
calibrated per check and stage on honest runs for mixed hardware, with the attack budget that
leaves measured by the drift attacker; checks that cannot work are one-line errors, exit 2."""

from __future__ import annotations

import json

import pytest
import torch

import phalanx.defense.replica as replica
from phalanx.cli.main import main
from phalanx.config import load_config
from phalanx.defense.tolerance import Tolerance, deviation, load_calibration
from phalanx.errors import ConfigError
from phalanx.train import Config
from phalanx.train.attempts import attempts
from phalanx.train.setup import build_pipeline

TINY = ['model.name="tiny"', "pipeline.stages=4", "pipeline.micro_batches=2",
        "train.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0",
        'defense.verify="duplicate"']
BATCH = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))


def test_bitwise_rms_and_measure_by_hand():
    a = torch.tensor([1.0, 2.0, -4.0, 0.5])
    r = float(a.pow(2).mean().sqrt())  # 2.305
    assert Tolerance().agrees(a, a.clone()) and not Tolerance().agrees(a, a + 1e-7)
    assert Tolerance(rtol=1e-5).agrees(a, a + 0.9e-5 * r)
    assert not Tolerance(rtol=1e-5).agrees(a, a + 1.1e-5 * r)
    for tol in (Tolerance(rtol=1.0, atol=1.0), Tolerance(measure=True)):
        assert not tol.agrees(a, torch.tensor([1.0, float("nan"), -4.0, 0.5]))
        assert not tol.agrees(a, a[:2]) and not tol.agrees(a, a.double())
    assert Tolerance(measure=True).agrees(a, -a)  # calibration: content is not judged
    assert deviation(a, a + 0.1 * r) == pytest.approx(0.1)
    assert Tolerance().scalars_agree(2.0, 2.0) and not Tolerance().scalars_agree(2.0, 2.0 + 1e-9)
    assert not Tolerance(measure=True).scalars_agree(2.0, float("nan"))


def test_an_outlier_channel_does_not_widen_an_rms_tolerance():
    """SmolLM2's hidden states have one channel ~190x their RMS: scaled by the largest entry,
    the same rtol would let every other entry move 190x further."""
    h = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
    h[..., 7] = 190.0
    rtol, push = 1e-4, 1e-4 * float(h.abs().max()) * 0.5  # within a max-scaled tolerance
    assert float((h + push - h).abs().max()) <= rtol * float(h.abs().max())
    assert not Tolerance(rtol=rtol).agrees(h, h + push)


@pytest.fixture
def mixed_hardware(monkeypatch):
    real = replica.shadow_of
    monkeypatch.setattr(replica, "shadow_of", lambda stage: replica.OtherRounding(real(stage)))


def _alerts(extra: list[str], steps: int = 3) -> list[dict[int, int]]:
    """Alerts by suspect in each iteration's first attempt."""
    pipe = build_pipeline(load_config(Config, None, [*TINY, *extra]), steps + 2)
    out = []
    for step in range(steps):
        res = attempts(pipe.runtime, pipe.attack, step, BATCH, 3)[0][0]
        out.append({i: int(c) for i, c in enumerate(res.reports[:, :4].sum(0).tolist()) if c})
    return out


@pytest.fixture
def calibrated(mixed_hardware, tmp_path) -> str:
    path = tmp_path / "calibration.json"
    assert main(["calibrate", "--out", str(path), *TINY, "train.steps=4", "train.eval_every=0",
                 "data.seq_len=16", f'train.out_dir="{tmp_path / "run"}"']) == 0
    return str(path)


def test_mixed_hardware_needs_a_calibration_and_passes_with_one(mixed_hardware, calibrated):
    doc = json.loads(open(calibrated).read())
    assert doc["steps"] == 4
    for check in ("forward", "backward", "norm"):
        assert any(d > 0 for d in doc["deviation"][check][1:3])  # the replicas' rounding shows
        assert doc["rtol"][check] == [10 * d for d in doc["deviation"][check]]
    assert load_calibration(calibrated, 4)["forward"] == doc["rtol"]["forward"]
    assert all(_alerts([]))  # bitwise: every honest iteration is a false alert
    honest = _alerts(['defense.tolerance="calibrated"', f'defense.calibration="{calibrated}"'])
    assert honest == [{}, {}, {}]


@pytest.mark.parametrize("times", [0.1, 10.0])
def test_drift_within_the_calibrated_budget_passes_and_beyond_it_is_caught(
        mixed_hardware, calibrated, times):
    """The budget a calibrated tolerance leaves is rtol x RMS per entry: the drift attacker
    pushes strength x 1e-6 x RMS in a fixed direction on activations and gradients."""
    budget = min(load_calibration(calibrated, 4)["forward"][1:3])
    strength = times * budget / 1e-6
    seen = _alerts(['defense.tolerance="calibrated"', f'defense.calibration="{calibrated}"',
                    'attack.adaptive="drift"', "attack.rate=1.0", "attack.stages=[1]",
                    f"attack.strength={strength}"])
    if times > 1:
        assert all(1 in alerts for alerts in seen)  # the attacker, by its verifier
    else:
        assert seen == [{}, {}, {}]


@pytest.mark.parametrize(("extra", "message"), [
    (['defense.tolerance="calibrated"'], "needs defense.calibration"),
    (['defense.tolerance="close"'], "defense.tolerance='close' is unknown"),
    (["defense.rtol=1e-4"], "apply to defense.tolerance=rms"),
    (['defense.tolerance="rms"', "defense.rtol=nan"], "finite and >= 0"),
    (['defense.tolerance="rms"', "defense.rtol=1.0"], "checks nothing"),
    (['defense.calibration="x.json"'], "is read with defense.tolerance=calibrated"),
    (['defense.tolerance="calibrated"', 'defense.calibration="/nonexistent.json"'],
     "cannot be read"),
])
def test_a_tolerance_that_cannot_work_is_a_config_error(extra, message):
    cfg = load_config(Config, None, [*TINY, *extra])
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


VALID = ('{"format": "phalanx-calibration/1", "stages": 4, "steps": 4, "rtol": {"forward": '
         '[0, 0, 0, 0], "backward": [0, 0, 0, 0], "norm": [0, 0, 0, 0]}}')


@pytest.mark.parametrize(("content", "message"), [
    ("{", "is not JSON"),
    ('{"format": "other"}', "is not a calibration file"),
    ('{"format": "phalanx-calibration/1", "stages": 6}', "calibrated for 6 stages"),
    ('{"format": "phalanx-calibration/1", "stages": 4, "rtol": {"forward": [0, 0, 0, 0], '
     '"backward": [0, -1, 0, 0], "norm": [0, 0, 0, 0]}}', "rtol.backward must be 4 numbers"),
    ('{"format": "phalanx-calibration/1", "stages": 4, "rtol": {"forward": [0, 0, 0, 0], '
     '"backward": [0, 0, 0, 0], "norm": [0, true, 0, 0]}}', "rtol.norm must be 4 numbers"),
    (VALID.replace('"norm": [0, 0, 0, 0]', '"norm": [0, 1e300, 0, 0]'), "in \\[0, 1\\)"),
    (VALID.replace('"norm": [0, 0, 0, 0]', '"norm": [0, ' + "9" * 400 + ', 0, 0]'),
     "in \\[0, 1\\)"),
    (VALID.replace(', "steps": 4', ""), "steps .* must be a whole number"),
    ("[" * 100_000, "is not JSON"),
    ("0" * (1 << 21), "over 1 MiB"),
])
def test_a_bad_calibration_file_is_named(tmp_path, content, message):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_calibration(path, 4)
    assert load_calibration(_valid(tmp_path), 4)["norm"] == [0.0] * 4


def _valid(tmp_path) -> str:  # noqa: ANN001
    path = tmp_path / "valid.json"
    path.write_text(VALID)
    return str(path)


def test_a_device_given_as_calibration_is_read_no_further_than_the_cap():
    with pytest.raises(ConfigError, match="over 1 MiB"):
        load_calibration("/dev/zero", 4)


def test_a_run_longer_than_its_calibration_is_warned_about(tmp_path):
    from phalanx.train.preflight import warnings

    cfg = load_config(Config, None, [*TINY, 'defense.tolerance="calibrated"',
                                     f'defense.calibration="{_valid(tmp_path)}"',
                                     "train.steps=40"])
    cfg.validate()
    assert any("covered 4 steps and this run has 40" in w for w in warnings(cfg))


def test_a_calibrated_run_without_its_file_is_one_line_exit_2(tmp_path, cli):
    code, err = cli("train", *TINY, 'defense.tolerance="calibrated"', f'train.out_dir="{tmp_path}"')
    assert code == 2
    assert err.strip().count("\n") == 0 and "phalanx calibrate" in err


def test_calibrate_refuses_a_summary_that_did_not_measure(tmp_path, capsys):
    summary = {"defense": {"deviation": {}}, "steps": 1,
               "config": {"pipeline": {"stages": 4}, "defense": {"tolerance": "bitwise"}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert main(["calibrate", "--from", str(tmp_path / "summary.json"),
                 "--out", str(tmp_path / "c.json")]) == 2
    assert "were not measured" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
