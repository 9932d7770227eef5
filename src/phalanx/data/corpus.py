"""Corpora to fixed-length token blocks, split deterministically into train and validation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from phalanx.errors import PhalanxError
from phalanx.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class DataConfig:
    """Where the text comes from and how it is cut."""

    corpus: str = "pydoc"  # pydoc (Python reference docs), stdlib (standard-library docstrings,
    # 4x larger) or a text file / folder
    suffixes: list[str] = field(default_factory=list)  # in a folder, read only these (".txt");
    # empty: every file that is UTF-8 text
    max_mb: float = 1024.0  # refuse a corpus larger than this (MiB read from disk)
    seq_len: int = 128  # tokens per sequence
    val_fraction: float = 0.1  # share of blocks held out for validation
    seed: int = 0  # split and shuffling seed


def _hidden(path: Path, root: Path) -> bool:
    """Whether ``path`` is, or sits in, a dot-folder or dot-file below ``root`` (.git, .venv)."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _text(data: bytes) -> str | None:
    """``data`` as text if it is UTF-8 without NUL bytes (binary files have them), else None."""
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def corpus_files(corpus: str, suffixes: list[str] | None = None) -> list[Path]:
    """The files a corpus setting names, in a deterministic order (before reading them).

    A file is itself; a folder is every regular file below it, hidden ones (and those in
    hidden folders such as ``.git`` or ``.venv``) left out, restricted to ``suffixes`` when
    given. Which of them are text is decided on reading (:func:`load_documents`).
    """
    if not corpus.strip():
        raise PhalanxError("data.corpus is empty: use data.corpus=pydoc or a text file / folder")
    path = Path(corpus).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PhalanxError(
            f"data.corpus={corpus!r} does not exist: use data.corpus=pydoc, stdlib, or a text "
            "file / folder"
        )
    want = {s if s.startswith(".") else "." + s for s in (suffixes or [])}
    files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)
                   and (not want or p.suffix in want))
    if not files:
        only = f" with suffix {', '.join(sorted(want))}" if want else ""
        raise PhalanxError(f"data.corpus={corpus!r} holds no files{only}")
    return files


def load_documents(corpus: str, suffixes: list[str] | None = None,
                   max_mb: float = 1024.0) -> list[tuple[str, str]]:
    """(name, text) pairs of the corpus, in a deterministic order.

    A single file must be UTF-8 text. In a folder, files that are not (binary, another
    encoding) are skipped with one logged line that counts them; none left is an error.
    """
    if corpus == "pydoc":
        from pydoc_data.topics import topics

        return sorted(topics.items())
    if corpus == "stdlib":
        from phalanx.data.stdlib import stdlib_documents

        return stdlib_documents()
    if not max_mb > 0:
        raise PhalanxError(f"data.max_mb={max_mb} must be positive")
    files = corpus_files(corpus, suffixes)
    single = len(files) == 1 and Path(corpus).expanduser().is_file()
    budget = int(max_mb * 2**20)
    docs, skipped, total = [], [], 0
    for f in files:
        try:
            size = f.stat().st_size
            if total + size > budget:
                raise PhalanxError(
                    f"data.corpus={corpus!r} is larger than data.max_mb={max_mb:g} MiB: raise "
                    "data.max_mb, or point at a smaller file or folder")
            text = _text(f.read_bytes())
        except OSError as exc:
            raise PhalanxError(f"cannot read {f} ({exc}); fix or remove it") from None
        total += size
        if text is None:
            if single:
                raise PhalanxError(f"cannot read {f} as UTF-8 text; convert it to UTF-8")
            skipped.append(f)
            continue
        docs.append((str(f), text))
    if skipped:
        log.warning("data.corpus=%r: skipped %d file(s) that are not UTF-8 text, e.g. %s",
                    corpus, len(skipped), skipped[0])
    if not docs:
        raise PhalanxError(f"data.corpus={corpus!r} holds no UTF-8 text files")
    return docs


@dataclass
class TokenData:
    """Train and validation blocks, each row ``seq_len`` tokens."""

    train: torch.Tensor  # (N_train, T) int64
    val: torch.Tensor  # (N_val, T) int64
    seed: int

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The training batch (B, T) of ``step``: a deterministic function of the step, so a
        resumed run sees exactly the batches an uninterrupted one would."""
        n = self.train.shape[0]
        if batch_size > n:
            raise PhalanxError(
                f"train.batch_size={batch_size} exceeds the {n} training sequences: lower it, "
                "shorten data.seq_len or use a larger corpus"
            )
        per_epoch = n // batch_size
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        return self.train[order[k * batch_size : (k + 1) * batch_size]]

    def val_batches(self, batch_size: int, max_batches: int) -> list[torch.Tensor]:
        """Fixed validation batches (the same every time)."""
        count = min(max_batches, self.val.shape[0] // batch_size)
        if count == 0:
            raise PhalanxError(
                f"the validation split has {self.val.shape[0]} sequences, fewer than "
                f"train.batch_size={batch_size}: raise data.val_fraction or lower the batch size"
            )
        return [self.val[i * batch_size : (i + 1) * batch_size] for i in range(count)]


def build_data(cfg: DataConfig, tokenizer: Tokenizer) -> TokenData:
    """Tokenize the corpus, cut it into blocks and split them into train / validation."""
    if cfg.seq_len < 2:
        raise PhalanxError(f"data.seq_len={cfg.seq_len} must be at least 2")
    if not 0.0 < cfg.val_fraction < 1.0:
        raise PhalanxError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    ids: list[int] = []
    for _, text in load_documents(cfg.corpus, cfg.suffixes, cfg.max_mb):
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    n = len(ids) // cfg.seq_len
    if n < 2:
        raise PhalanxError(
            f"data.corpus={cfg.corpus!r} yields {len(ids)} tokens, too few for two sequences of "
            f"data.seq_len={cfg.seq_len}"
        )
    blocks = torch.tensor(ids[: n * cfg.seq_len], dtype=torch.int64).view(n, cfg.seq_len)
    blocks = _unique_rows(blocks)  # a repeated passage must not sit in both splits
    n = blocks.shape[0]
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(n, generator=g)
    n_val = max(1, round(n * cfg.val_fraction))
    return TokenData(train=blocks[perm[n_val:]], val=blocks[perm[:n_val]], seed=cfg.seed)


def _unique_rows(blocks: torch.Tensor) -> torch.Tensor:
    """The rows of ``blocks`` without repeats, first occurrences in their original order."""
    seen: set[bytes] = set()
    keep = []
    for i, row in enumerate(blocks.numpy()):
        key = row.tobytes()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return blocks[keep]
