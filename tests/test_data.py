"""Corpora: the bundled one, user files and folders, deterministic splits and batches."""

from __future__ import annotations

import pytest
import torch

from phalanx.data import DataConfig, build_data, load_documents
from phalanx.errors import PhalanxError
from phalanx.models.tokenizer import ByteTokenizer


def test_bundled_corpus_is_real_text():
    docs = load_documents("pydoc")
    text = "".join(t for _, t in docs)
    assert len(docs) > 50 and len(text) > 400_000 and "assignment" in dict(docs)


def test_split_and_batches_are_deterministic():
    cfg = DataConfig(seq_len=64, val_fraction=0.1)
    a, b = build_data(cfg, ByteTokenizer()), build_data(cfg, ByteTokenizer())
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.train.shape[1] == 64 and a.val.shape[0] == pytest.approx(0.1 * (a.train.shape[0]
                                                                           + a.val.shape[0]), abs=1)
    assert torch.equal(a.batch(5, 8), b.batch(5, 8))
    assert not torch.equal(a.batch(5, 8), a.batch(6, 8))
    train_rows = {tuple(r.tolist()) for r in a.train}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val)  # no overlap


def test_user_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("more text " * 50)
    (tmp_path / "ignored.bin").write_bytes(b"\0\1")
    docs = load_documents(str(tmp_path))
    assert [n.split("/")[-1] for n, _ in docs] == ["a.txt", "b.md"]
    data = build_data(DataConfig(corpus=str(tmp_path / "a.txt"), seq_len=16), ByteTokenizer())
    assert data.train.shape[1] == 16


def test_bad_corpora(tmp_path):
    with pytest.raises(PhalanxError, match="does not exist"):
        load_documents(str(tmp_path / "missing"))
    with pytest.raises(PhalanxError, match="no text files"):
        load_documents(str(tmp_path))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(PhalanxError, match="UTF-8"):
        load_documents(str(tmp_path / "bad.txt"))
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(PhalanxError, match="too few"):
        build_data(DataConfig(corpus=str(tmp_path / "short.txt"), seq_len=64), ByteTokenizer())
