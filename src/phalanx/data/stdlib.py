"""A larger bundled corpus: the docstrings of the Python standard library, read with ``ast``.

Every Python install has it (about 1.8 M characters and 0.46 M SmolLM2 tokens on CPython 3.11,
four times the pydoc topics), it is real English written by many authors, and nothing is
fetched. Test suites and third-party packages (``site-packages``) are left out; each docstring
appears once however many modules repeat it. Its content follows the Python version.

Reading it parses about 700 modules (some 13 s on two cores), so the result is cached in
``$PHALANX_CACHE/corpus`` (default ``~/.cache/phalanx``) under a key made of the Python version
and every source file's path, size and modification time; a cache file that is not exactly the
list of (name, text) pairs it should hold is read as no cache and rewritten.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import sys
import sysconfig
import warnings
from pathlib import Path

log = logging.getLogger(__name__)

SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})
MAX_CACHE_BYTES = 64 << 20  # the extracted text is ~2 MB; a bigger file is not ours
MIN_CHARS = 40  # shorter docstrings ("Return self.") are boilerplate, not text
_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def module_docstrings(source: str) -> list[str]:
    """The docstrings of a module, its classes and functions, in source order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old modules
        tree = ast.parse(source)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, _NODES):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_CHARS:
                out.append(doc)
    return out


def _sources(root: Path) -> list[Path]:
    return [p for p in sorted(root.rglob("*.py"))
            if not SKIP_PARTS & set(p.relative_to(root).parts)]


def cache_file(root: Path, sources: list[Path]) -> Path:
    """Where the documents of ``sources`` under ``root`` are cached."""
    h = hashlib.sha256(f"{sys.version}\0{root}".encode())
    for p in sources:
        st = p.stat()
        h.update(f"\0{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    base = Path(os.environ.get("PHALANX_CACHE") or Path.home() / ".cache" / "phalanx")
    return base.expanduser() / "corpus" / f"stdlib-{h.hexdigest()[:32]}.json"


def _read_cache(path: Path) -> list[tuple[str, str]] | None:
    """The cached documents, or ``None`` where the file is missing or not what it should be."""
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, list) or not all(
            isinstance(d, list) and len(d) == 2 and all(isinstance(x, str) for x in d)
            for d in data):
        return None
    return [(a, b) for a, b in data]


def stdlib_documents(root: Path | None = None, cache: bool = True) -> list[tuple[str, str]]:
    """(module path, its docstrings joined) for every standard-library source file, sorted
    (from the cache where it holds them)."""
    root = root or stdlib_root()
    sources = _sources(root)
    path = cache_file(root, sources) if cache else None
    if path is not None:
        cached = _read_cache(path)
        if cached is not None:
            return cached
        if path.exists():
            log.warning("the corpus cache %s is not a valid cache: rebuilding it", path)
    docs = _extract(root, sources)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(docs), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:  # a read-only home: no cache, the corpus all the same
            log.warning("could not cache the stdlib corpus in %s: %s", path, exc)
    return docs


def _extract(root: Path, sources: list[Path]) -> list[tuple[str, str]]:
    seen: set[str] = set()
    docs = []
    for path in sources:
        try:
            found = module_docstrings(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a file this Python cannot parse (lib2to3 fixtures) is no loss
        fresh = [d for d in found if d not in seen]
        seen.update(fresh)
        if fresh:
            docs.append((str(path.relative_to(root)), "\n\n".join(fresh)))
    return docs
