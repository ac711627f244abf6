"""The persistent judge response cache: one SQLite file, one row per answer a judge ever gave.

Keyed by `judge.request_key` (a SHA-256 of backend, model, messages, prefill, decoding settings
and prompt version), so a rerun — or a run killed half-way and started again by `dvc repro` —
never asks a judge the same thing twice. Each answer is committed on arrival with
`synchronous=FULL`, so it is on disk before the next request is sent: a kill loses nothing that
was received. Malformed answers are stored too: they are what the judge said, and the retry
that follows them is a different request with a different key.

The file lives outside the stage's DVC outs on purpose (DVC deletes outs before a stage runs,
which would throw the answers away). Delete it to ask every judge afresh.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS answers (
    key TEXT PRIMARY KEY,
    completion TEXT NOT NULL,
    request TEXT NOT NULL,
    created REAL NOT NULL
)
"""


class ResponseCache:
    """A durable key -> answer store. Use as a context manager, or call `close()`."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # autocommit mode: every statement is its own transaction, durable when it returns.
        self._db = sqlite3.connect(self.path, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(_SCHEMA)

    def get_many(self, keys: Iterable[str]) -> dict[str, str]:
        """The cached answers among `keys` (absent keys are left out)."""
        unique = list(dict.fromkeys(keys))
        found: dict[str, str] = {}
        chunk = 500  # stay under SQLite's limit on bound parameters
        for start in range(0, len(unique), chunk):
            part = unique[start : start + chunk]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT key, completion FROM answers WHERE key IN ({marks})", part)
            found.update(dict(rows.fetchall()))
        return found

    def put(self, key: str, completion: str, request: dict[str, Any]) -> None:
        """Store one answer durably; the request is kept beside it for audit."""
        blob = json.dumps(request, sort_keys=True, ensure_ascii=False)
        self._db.execute(
            "INSERT OR IGNORE INTO answers (key, completion, request, created) VALUES (?, ?, ?, ?)",
            (key, completion, blob, time.time()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResponseCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
