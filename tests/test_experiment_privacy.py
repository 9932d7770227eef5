"""``phalanx experiment privacy --quick``: recovery at each cut (exact search, decoder), the
gradient attacks, drifted victims, and noise / DP-Forward with their utility and tokens/s
cost; bad settings are one-line errors."""

from __future__ import annotations

import json

import pytest

from phalanx.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_quick_privacy_experiment_measures_recovery_and_the_price_of_noise(tmp_path):
    assert main(["experiment", "privacy", "--quick", "--out", str(tmp_path)]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert (tmp_path / "table.md").is_file() and (tmp_path / "recovery.png").stat().st_size > 0
    assert [r["cut"] for r in s["cuts"]] == [1, 2]
    assert all(r["exact_search"]["token_recovery"] == 1.0 for r in s["cuts"])  # undefended
    noise = {r["sigma"]: r for r in s["noise"]}
    assert noise[64.0]["exact_search"]["token_recovery"] < 0.1  # heavy noise hides the text
    assert noise[64.0]["val_ppl"] > s["val_ppl"]  # ... at a price in perplexity
    assert all(0 < r["tokens_per_s_ratio"] < 10 for r in s["noise"] + s["dp_forward"])
    dp = {r["noise_multiplier"]: r for r in s["dp_forward"]}
    assert dp[10.0]["epsilon"] < dp[0.1]["epsilon"]  # more noise, less epsilon ...
    assert dp[10.0]["exact_search"]["token_recovery"] < 0.1  # ... and less recovery
    assert all(0 <= r["decoder"]["token_recovery"] <= 1 for r in s["cuts"])
    g = s["gradients"]
    assert g["labels"]["token_recovery"] == 1.0  # the head's input gradient names each label
    assert g["weights"][0]["cut"] == 0 and g["weights"][0]["token_f1"] == 1.0
    lora = {(r["cut"], r["gradient"], tuple(r["targets"]), r["lora_steps"]): r for r in g["lora"]}
    qkv = ("q_proj", "k_proj", "v_proj")
    assert {c for c, *_ in lora} == {0, 1} and all(r["rank"] == 3 for r in g["lora"])
    assert all(0 <= r["token_f1"] <= 1 for r in g["lora"])
    assert lora[0, "A", qkv, 0]["token_f1"] == 0.0 and lora[0, "A", qkv, 0]["lora_b_norm"] == 0
    assert lora[0, "A", qkv, 5]["token_f1"] == 1.0 and lora[0, "A", qkv, 5]["lora_b_norm"] > 0
    assert (0, "B", ("v_proj",), 5) in lora and (1, "A", ("v_proj",), 5) in lora
    victims = {v.get("rel_std"): v for v in s["victims"]}
    assert victims[1e-3]["matched"] == 0.0  # no exact match once stage 0 drifted ...
    assert victims[1.0]["exact_search"]["token_recovery"] < 1.0  # ... and errors with drift
    assert s["encryption"]["exact_search"]["token_recovery"] <= 0.25  # ciphertext: ~chance
    assert 0 < s["encryption"]["tokens_per_s_ratio"] <= 1
    table = (tmp_path / "table.md").read_text()
    assert "DP-Forward" in table and "decoder" in table and "gradient" in table
    assert "LoRA grad A of q, k, v" in table and "LoRA grad B of v" in table


@pytest.mark.parametrize(("args", "message"), [
    (["--cuts", "1,9"], "cut"), (["--cuts", "0"], "cut"), (["--sigmas", "-1"], "sigma"),
    (["--sigmas", "nan"], "sigma"),
    (["--cuts", "one"], "comma-separated numbers"),
    (["--tactics", "drift", "--fresh"], "does not use --tactics, --fresh"),  # not ignored
    (["pipeline.stages=3"], "does not use config overrides"),
])
def test_bad_privacy_settings_are_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["experiment", "privacy", *args, "--quick", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
