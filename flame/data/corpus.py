"""The embedded default corpus: the running Python's own standard library.

Every machine that runs flame has these files, so a debug run needs no network and no data
files in the repository. Documents, in sorted path order: each module's source text, then the
docstrings of that module (module, classes, functions) joined as one prose document.
"""

import ast
import hashlib
import os
import sysconfig
import tempfile
from pathlib import Path

# Packages left out: tests and demos are large, repetitive, and hold files in odd encodings.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib",
              "lib2to3", "turtledemo", "ensurepip", "config-3"}
_CORPUS_VERSION = 2


def cache_dir() -> Path:
    """Where flame keeps generated artifacts; FLAME_CACHE overrides ~/.cache/flame."""
    root = os.environ.get("FLAME_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flame")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_lock(path: Path):
    """Cross-process lock, so that the ranks of a job build a cached artifact once, not N times."""
    from filelock import FileLock

    return FileLock(str(path) + ".lock")


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def corpus_fingerprint() -> str:
    """Changes when the interpreter's standard library (or the corpus recipe) changes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    h = hashlib.sha256(f"v{_CORPUS_VERSION} {root}".encode())
    for p in stdlib_files():
        h.update(f"{p.relative_to(root).as_posix()}:{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _documented(body: list):
    """Classes and functions among these statements, nested ones included. Only statement
    lists are followed (not every expression node as ast.walk does): several times faster."""
    for node in body:
        if isinstance(node, _DEFS):
            yield node
        for name in ("body", "orelse", "finalbody", "handlers"):
            child = getattr(node, name, None)
            if isinstance(child, list) and child and isinstance(child[0], (ast.stmt, ast.excepthandler)):
                yield from _documented(child)


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    docs = []
    for node in [tree, *_documented(tree.body)]:
        doc = ast.get_docstring(node)
        if doc and len(doc) > 40:
            docs.append(doc)
    return "\n\n".join(docs)


def iter_documents():
    """Yields the corpus documents in a fixed order."""
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if source.strip():
            yield source
        docs = _docstrings(source)
        if docs:
            yield docs


def default_corpus_path() -> Path:
    """Builds the corpus once as an on-disk `datasets` table (memory-mapped by every reader)."""
    import datasets

    path = cache_dir() / f"corpus-stdlib-{corpus_fingerprint()}"
    with build_lock(path):
        if not (path / "dataset_info.json").exists():
            texts = list(iter_documents())
            ds = datasets.Dataset.from_dict({"text": texts})
            # Written beside the target and renamed, so that a crash never leaves half a table.
            tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".tmp"))
            ds.save_to_disk(str(tmp))
            os.replace(tmp, path)
    return path


def load_default_corpus():
    import datasets

    return datasets.load_from_disk(str(default_corpus_path()))
