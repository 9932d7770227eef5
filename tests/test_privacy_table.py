"""The exact search's ranking tables: one layer-by-layer pass equals a direct pass per cut, and
the disk cache is used only when it matches the model."""

from __future__ import annotations

import pytest
import torch

from phalanx.errors import ConfigError
from phalanx.models import ModelConfig, load_model
from phalanx.models.stages import blocks_of
from phalanx.privacy import ExactSearch, Prefix, context_free_tables
from phalanx.privacy.table import _direct

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    lm = load_model(ModelConfig(name="tiny"))
    lm.model.eval()
    return lm


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt2"])
def test_layered_tables_equal_each_tokens_own_pass_at_every_cut(name) -> None:
    lm = load_model(ModelConfig(name=name))
    lm.model.eval()
    prefix = Prefix(lm.model, lm.family, 2)
    anchor = 7
    tables = context_free_tables(prefix, [0, 1, 2], anchor, chunk=50)
    ids = torch.arange(prefix.vocab_size)
    for cut in (0, 1, 2):
        direct = _direct(prefix, cut, ids, anchor)
        assert torch.allclose(tables[cut].alone, direct.alone, atol=2e-3)
        assert torch.allclose(tables[cut].after, direct.after, atol=2e-3)
    # the alone table is what the exact search evaluates for a token at position 0
    search = ExactSearch(Prefix(lm.model, lm.family, 2))
    row = torch.nn.functional.normalize(search.candidates([], ids[:3]), dim=-1)
    assert torch.allclose(tables[2].alone[:3], row, atol=2e-3)
    assert not torch.allclose(tables[1].after, tables[2].after, atol=0.1)  # layers matter


def test_cached_tables_are_reused_only_for_the_same_weights(tiny, tmp_path) -> None:
    prefix = Prefix(tiny.model, tiny.family, 2)
    built = context_free_tables(prefix, [1, 2], 3, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("table-*.safetensors"))
    assert len(files) == 2
    calls = []
    again = context_free_tables(prefix, [1, 2], 3, cache_dir=tmp_path,
                                progress=lambda *a: calls.append(a))
    assert calls == []  # nothing recomputed
    assert all(torch.equal(built[c].alone, again[c].alone) for c in (1, 2))
    # another anchor is another table
    context_free_tables(prefix, [1], 4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("table-*.safetensors"))) == 3
    # a model whose layer 1 changed keeps its cut-1 table but rebuilds cut 2's
    with torch.no_grad():
        blocks_of(tiny.model, tiny.family)[1].mlp.up_proj.weight.mul_(1.5)
    try:
        fresh = context_free_tables(prefix, [1, 2], 3, cache_dir=tmp_path,
                                    progress=lambda *a: calls.append(a))
        assert calls  # rebuilt
        assert torch.equal(fresh[1].alone, built[1].alone)
        assert not torch.allclose(fresh[2].alone, built[2].alone, atol=1e-3)
    finally:
        with torch.no_grad():
            blocks_of(tiny.model, tiny.family)[1].mlp.up_proj.weight.div_(1.5)


def test_a_cache_file_with_the_right_name_but_wrong_rows_is_rebuilt(tiny, tmp_path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    prefix = Prefix(tiny.model, tiny.family, 1)
    good = context_free_tables(prefix, [1], 3, cache_dir=tmp_path)[1]
    path = next(tmp_path.glob("table-*.safetensors"))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    rows = load_file(str(path))
    save_file({k: v.flip(0).contiguous() for k, v in rows.items()}, str(path), metadata=meta)
    again = context_free_tables(prefix, [1], 3, cache_dir=tmp_path)[1]
    assert torch.equal(again.alone, good.alone)
    path.write_bytes(b"not a table")
    assert torch.equal(context_free_tables(prefix, [1], 3, cache_dir=tmp_path)[1].after,
                       good.after)


@pytest.mark.parametrize("kwargs", [{"cuts": [3]}, {"cuts": []}, {"cuts": [1], "chunk": 0},
                                    {"cuts": [1], "anchor": 10**6}])
def test_bad_table_settings_are_config_errors(tiny, kwargs) -> None:
    args = {"anchor": 3, **kwargs}
    with pytest.raises(ConfigError):
        context_free_tables(Prefix(tiny.model, tiny.family, 2), **args)
