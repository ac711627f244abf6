"""Content fingerprints for resumable work.

Resumable work (sample batches, judge answers, ...) is keyed by what determines it: the bytes of
its inputs, its config and the source code that computes it. Never by paths or mtimes: a code
change can then never reuse stale work, and a workspace copied to another folder or machine keeps
everything that is still valid.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


@lru_cache(maxsize=256)
def _file_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    # The (size, mtime) pair only memoizes within one process; the digest is of the bytes.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes."""
    stat = Path(path).stat()
    return _file_digest_cached(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def folder_digest(path: str | Path) -> str:
    """SHA-256 over the relative names and bytes of every file under a folder (sorted)."""
    root = Path(path)
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(file.relative_to(root).as_posix().encode())
        h.update(file_digest(file).encode())
    return h.hexdigest()


def code_version(modules: Iterable[str]) -> str:
    """SHA-256 over the source files of the named modules (packages: every .py file in them)."""
    h = hashlib.sha256()
    for name in sorted(modules):
        module = importlib.import_module(name)
        origin = Path(module.__file__ or "")
        files = sorted(origin.parent.rglob("*.py")) if origin.name == "__init__.py" else [origin]
        for file in files:
            h.update(name.encode())
            h.update(file.relative_to(origin.parent).as_posix().encode())
            h.update(file_digest(file).encode())
    return h.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-able parts (configs, digests, versions)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]
