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
    with pytest.raises(PhalanxError, match="holds no files"):
        load_documents(str(tmp_path))
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(PhalanxError, match="UTF-8"):
        load_documents(str(tmp_path / "bad.txt"))
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(PhalanxError, match="too few"):
        build_data(DataConfig(corpus=str(tmp_path / "short.txt"), seq_len=64), ByteTokenizer())


@pytest.mark.parametrize("corpus", ["", "  "])
def test_empty_corpus_setting_is_an_error_not_the_current_folder(corpus):
    with pytest.raises(PhalanxError, match="data.corpus is empty"):
        load_documents(corpus)


def test_folder_reads_text_files_without_extensions_and_skips_hidden_and_binary(tmp_path):
    """Like /usr/share/common-licenses: plain text files named GPL-3, Apache-2.0, ..."""
    (tmp_path / "GPL-3").write_text("GNU GENERAL PUBLIC LICENSE " * 20)
    (tmp_path / "Apache-2.0").write_text("Apache License " * 20)
    (tmp_path / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (tmp_path / "latin1").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    (tmp_path / ".venv" / "lib" / "LICENSE.txt").write_text("not part of the corpus")
    (tmp_path / ".notes").write_text("hidden")
    names = [n.split("/")[-1] for n, _ in load_documents(str(tmp_path))]
    assert names == ["Apache-2.0", "GPL-3"]
    (tmp_path / "readme.txt").write_text("a text file " * 20)
    assert [n.split("/")[-1] for n, _ in load_documents(str(tmp_path), suffixes=["txt"])] == [
        "readme.txt"]
    with pytest.raises(PhalanxError, match="no files with suffix .md"):
        load_documents(str(tmp_path), suffixes=[".md"])


def test_corpus_larger_than_the_limit_is_refused(tmp_path):
    (tmp_path / "big.txt").write_text("x" * (2 * 2**20))
    with pytest.raises(PhalanxError, match="larger than data.max_mb=1"):
        load_documents(str(tmp_path), max_mb=1.0)
    assert len(load_documents(str(tmp_path), max_mb=3.0)) == 1


def test_stdlib_corpus_is_real_english_larger_than_pydoc_and_deduplicated():
    from phalanx.data.stdlib import module_docstrings, stdlib_documents

    docs = stdlib_documents(cache=False)
    assert stdlib_documents() == docs  # (written to the cache, or read from it)
    names = [n for n, _ in docs]
    assert names == sorted(names) and not any("/test/" in n or n.startswith("test/")
                                               for n in names)
    text = "\n".join(t for _, t in docs)
    pydoc = sum(len(t) for _, t in load_documents("pydoc"))
    assert len(text) > 3 * pydoc
    assert " the " in text and "Return" in text  # English prose, not code
    data = build_data(DataConfig(corpus="stdlib", seq_len=256), ByteTokenizer())
    assert data.train.shape[0] > 6000 and data.val.shape[0] > 600
    assert dict(docs)["json/__init__.py"].startswith("JSON (JavaScript Object Notation)")
    text3 = "A class that does things. " * 3
    src = 'def f():\n    """Short."""\n\nclass A:\n    """' + text3 + '"""\n'
    assert module_docstrings(src) == [text3]


@pytest.mark.parametrize("content", ["not json", '[["a.py", 3]]', '{"a.py": "x"}', "[1e999]"])
def test_a_stdlib_cache_that_is_not_one_is_rebuilt(tmp_path, monkeypatch, content):
    from phalanx.data.stdlib import _sources, cache_file, stdlib_documents

    monkeypatch.setenv("PHALANX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "lib"
    root.mkdir()
    (root / "m.py").write_text('"""' + "Words about a module, long enough to count. " + '"""')
    fresh = stdlib_documents(root)
    path = cache_file(root, _sources(root))
    assert path.is_file() and stdlib_documents(root) == fresh
    path.write_text(content)
    assert stdlib_documents(root) == fresh and stdlib_documents(root, cache=False) == fresh
    assert stdlib_documents(root) == fresh  # rewritten
    (root / "n.py").write_text('"""' + "Another module's words, long enough too. " + '"""')
    assert [n for n, _ in stdlib_documents(root)] == ["m.py", "n.py"]  # a new key


def test_stdlib_documents_keep_a_repeated_docstring_once_and_skip_tests(tmp_path):
    from phalanx.data.stdlib import stdlib_documents

    doc = '"""' + "Shared words about a module that two files both carry. " + '"""\n'
    (tmp_path / "a.py").write_text(doc)
    (tmp_path / "b.py").write_text(doc + 'def g():\n    """' + "Own text " * 6 + '"""\n')
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text('"""' + "Test words " * 6 + '"""\n')
    (tmp_path / "bad.py").write_text("def (:\n")
    docs = stdlib_documents(tmp_path)
    assert [n for n, _ in docs] == ["a.py", "b.py"]
    assert dict(docs)["b.py"].startswith("Own text")
