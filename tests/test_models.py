"""Loading and cutting models: stage boundaries, names, tied weights, errors."""

from __future__ import annotations

import json

import pytest
import torch

from phalanx.errors import PhalanxError
from phalanx.models import ModelConfig, load_model, partition, resolve_bounds
from phalanx.models.loading import prepare
from phalanx.models.stages import balanced_bounds, lm_loss


def test_balanced_bounds_by_hand():
    assert balanced_bounds(30, 4) == [8, 16, 23]
    assert balanced_bounds(4, 4) == [1, 2, 3]
    assert balanced_bounds(5, 1) == []


@pytest.mark.parametrize(
    ("layers", "stages", "cuts", "message"),
    [
        (4, 5, None, "more than the model's 4 layers"),
        (4, 0, None, "at least 1"),
        (4, 2, [1, 2], "1 \\(the first layer"),
        (4, 3, [2, 2], "strictly increasing"),
        (4, 2, [4], "strictly increasing"),
    ],
)
def test_bad_bounds(layers, stages, cuts, message):
    with pytest.raises(PhalanxError, match=message):
        resolve_bounds(layers, stages, cuts)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_chained_stages_equal_the_model(name):
    lm = load_model(ModelConfig(name=name))
    ids = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        ref = lm.model(ids, labels=ids)
        for cuts in (None, [3], [1, 2, 3]):
            n = 1 + len(cuts or [])
            x = ids
            for s in partition(lm.model, lm.family, n, cuts):
                x = s(x)
            assert torch.equal(x, ref.logits)
            assert lm_loss(x, ids).item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_names_and_tied_copies():
    lm = load_model(ModelConfig(name="tiny"))
    first, mid, last = partition(lm.model, lm.family, 3, [1, 3])
    bounds = (first.start, first.stop, mid.start, mid.stop, last.start, last.stop)
    assert bounds == (0, 1, 1, 3, 3, 4)
    assert first.names["blocks.0.mlp.up_proj.weight"] == "model.layers.0.mlp.up_proj.weight"
    assert mid.names["blocks.1.mlp.up_proj.weight"] == "model.layers.2.mlp.up_proj.weight"
    assert first.tied == {"embed.weight": "model.embed_tokens.weight"}
    assert last.tied == {"head.weight": "model.embed_tokens.weight"} and not mid.tied
    assert last.head.weight is not first.embed.weight  # separate copies across stages
    assert torch.equal(last.head.weight, first.embed.weight)
    (only,) = partition(lm.model, lm.family, 1)
    assert only.head.weight is only.embed.weight and not only.tied  # one stage: still tied


def test_only_builds_one_stage():
    lm = load_model(ModelConfig(name="tiny"))
    (s,) = partition(lm.model, lm.family, 4, only=2)
    assert s.index == 2 and s.embed is None and s.head is None and len(s.blocks) == 1


def test_missing_and_unsupported_models(tmp_path):
    with pytest.raises(PhalanxError, match="not found"):
        load_model(ModelConfig(name=str(tmp_path / "nothing")))
    with pytest.raises(PhalanxError, match="no config.json"):
        prepare(ModelConfig(name=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PhalanxError, match="not supported"):
        prepare(ModelConfig(name=str(tmp_path)))


def test_local_hf_directory_round_trip(tmp_path):
    """A Llama-family directory saved by transformers loads through the path branch."""
    lm = load_model(ModelConfig(name="tiny"))
    lm.model.save_pretrained(tmp_path)
    again = load_model(ModelConfig(name=str(tmp_path)))
    assert again.family == "llama" and prepare(ModelConfig(name=str(tmp_path))) == 4
    ids = torch.randint(0, 257, (1, 8))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, lm.model(ids).logits)


def test_dropout_setting():
    lm = load_model(ModelConfig(name="tiny-gpt2", dropout=0.1))
    drops = [m.p for m in lm.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(p == 0.1 for p in drops)
    with pytest.raises(PhalanxError):
        load_model(ModelConfig(name="tiny", dtype="float8"))


def _model_dir_with_tokenizer(path, vocab_size: int, tokenizer_vocab: dict | None):  # noqa: ANN001, ANN202
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from phalanx.models.loading import tiny_config

    AutoModelForCausalLM.from_config(tiny_config(vocab_size=vocab_size)).save_pretrained(path)
    if tokenizer_vocab is not None:  # a tokenizer that loads but knows no words
        tok = Tokenizer(models.WordLevel(vocab=tokenizer_vocab, unk_token="[UNK]"))
        PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(path)
    return path


@pytest.mark.parametrize("vocab", [None, {"[UNK]": 0}], ids=["no files", "empty tokenizer"])
def test_unusable_tokenizer_falls_back_to_bytes_with_a_warning(tmp_path, caplog, vocab):
    """An empty tokenizer used to encode the corpus to almost nothing, and the user was told
    the corpus was too small."""
    from phalanx.data import DataConfig, build_data
    from phalanx.models.loading import load_tokenizer
    from phalanx.models.tokenizer import ByteTokenizer

    path = _model_dir_with_tokenizer(tmp_path / "m", 300, vocab)
    with caplog.at_level("WARNING"):
        tok = load_tokenizer(ModelConfig(name=str(path)))
    assert isinstance(tok, ByteTokenizer)
    assert "no usable tokenizer" in caplog.text and "byte-level" in caplog.text
    assert isinstance(load_model(ModelConfig(name=str(path))).tokenizer, ByteTokenizer)
    data = build_data(DataConfig(corpus="pydoc", seq_len=128), tok)
    assert data.train.shape[0] > 1000  # the corpus is large: bytes, not 79 tokens


def test_unusable_tokenizer_with_a_small_vocabulary_is_an_error(tmp_path):
    from phalanx.models.loading import load_tokenizer

    path = _model_dir_with_tokenizer(tmp_path / "m", 100, {"[UNK]": 0})
    with pytest.raises(PhalanxError, match="too small for byte-level tokens"):
        load_tokenizer(ModelConfig(name=str(path)))


def test_usable_tokenizer_probe_accepts_a_real_tokenizer():
    from phalanx.models.loading import load_tokenizer, prepare, usable

    cfg = ModelConfig(name="smollm2")
    prepare(cfg)
    tok = load_tokenizer(cfg)
    assert usable(tok, tok.vocab_size) is None
    assert tok.vocab_size == 49152


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_a_stage_forward_keeps_nothing_of_its_input_or_its_graph(name):
    """A forward must not hold on to what it computed once its caller lets go (a cache on the
    block runner once kept every micro-batch's input, output and autograd graph of a run)."""
    import gc
    import weakref

    lm = load_model(ModelConfig(name=name))
    first, last = partition(lm.model, lm.family, 2, [2])
    x = first(torch.randint(0, 257, (2, 16)))
    gone = weakref.ref(x)
    out = weakref.ref(last(x))
    lm_loss(last(x), torch.zeros(2, 16, dtype=torch.long)).backward()
    del x
    gc.collect()
    assert gone() is None and out() is None
