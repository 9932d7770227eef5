"""``phalanx experiment split --quick``: every method of paper 2's comparison runs and reports
what the issue asks for, with the relations a bug would break."""

from __future__ import annotations

import json
import math

import pytest

from phalanx.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")
FIELDS = ("method", "val_metric", "trainable_params", "tokens_per_s", "wire_bytes_per_step")


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    out = tmp_path_factory.mktemp("split")
    assert main(["experiment", "split", "--quick", "--steps", "2", "--out", str(out)]) == 0
    assert (out / "table.md").is_file() and (out / "split.png").stat().st_size > 0
    return json.loads((out / "summary.json").read_text())


def test_every_method_has_its_record(summary):
    rows = {r["method"]: r for r in summary["methods"]}
    assert set(rows) == {"full", "central_lora", "split_lora", "split_lora_spf", "split_ptuning",
                         "masked", "split_lora_plain"}
    for r in rows.values():
        assert all(k in r for k in FIELDS), r
        assert math.isfinite(r["val_metric"]) and r["tokens_per_s"] > 0


def test_only_split_methods_send_bytes_and_the_enclave_changes_no_number(summary):
    rows = {r["method"]: r for r in summary["methods"]}
    assert rows["full"]["wire_bytes_per_step"] == rows["central_lora"]["wire_bytes_per_step"] == 0
    assert rows["split_lora"]["wire_bytes_per_step"] > rows["split_lora_plain"][
        "wire_bytes_per_step"] > 0  # the session's tags and headers
    assert rows["split_lora"]["val_metric"] == rows["split_lora_plain"]["val_metric"]
    assert rows["masked"]["val_metric"] == pytest.approx(rows["split_lora"]["val_metric"],
                                                         rel=1e-4)
    assert rows["full"]["trainable_params"] > rows["split_lora_spf"]["trainable_params"] > \
        rows["split_lora"]["trainable_params"] > rows["split_ptuning"]["trainable_params"]


def test_the_masked_method_keeps_less_in_the_enclave_and_reports_both_costs(summary):
    rows = {r["method"]: r for r in summary["methods"]}
    masked, lora = rows["masked"], rows["split_lora"]
    assert masked["host_param_bytes"] > 0 and lora["host_param_bytes"] == 0
    assert masked["enclave_param_bytes"] + masked["host_param_bytes"] == \
        lora["enclave_param_bytes"]
    assert masked["masking_pool_misses"] == 0  # the measured step used precomputed masks
    assert masked["masking_offline_s_per_step"] > 0 and masked["masking_online_s_per_step"] > 0
    assert "security_cost_tokens_per_s" in summary and "spf_vs_central_lora" in summary
    assert lora["sealed_checkpoint_bytes"] > 0
    assert lora["seal_checkpoint_s"] > 0 and "seal_checkpoint_s" not in rows["split_lora_plain"]


def test_a_bad_step_count_is_one_line_exit_2(tmp_path, capsys):
    assert main(["experiment", "split", "--quick", "--steps", "0", "--out", str(tmp_path)]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
