"""A larger bundled corpus: the docstrings of the Python standard library, read with ``ast``.

Every Python install has it (about 1.8 M characters and 0.46 M SmolLM2 tokens on CPython 3.11,
four times the pydoc topics), it is real English written by many authors, and nothing is
fetched. Test suites and third-party packages (``site-packages``) are left out; each docstring
appears once however many modules repeat it. Its content follows the Python version.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
from pathlib import Path

SKIP_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__"})
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


def stdlib_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """(module path, its docstrings joined) for every standard-library source file, sorted."""
    root = root or stdlib_root()
    seen: set[str] = set()
    docs = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            found = module_docstrings(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue  # a file this Python cannot parse (lib2to3 fixtures) is no loss
        fresh = [d for d in found if d not in seen]
        seen.update(fresh)
        if fresh:
            docs.append((str(path.relative_to(root)), "\n\n".join(fresh)))
    return docs
