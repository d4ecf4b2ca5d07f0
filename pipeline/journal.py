"""What has been answered, so a rerun resumes and never pays twice.

The store is SQLite in WAL mode, one row per request key (a hash of endpoint + exact body). Why SQLite: a
commit is atomic and survives ``kill -9`` at any instant (the WAL is replayed on open), lookups by key are
indexed (a resume checks a million keys in seconds without loading them into memory), and it ships with
Python. Commits are grouped: the executor adds outcomes as they arrive and commits once per event-loop turn,
before any of those rows reach the output, so a kill loses at most what was in flight. ``synchronous=NORMAL``
trades durability against power loss (not process death) for speed, as WAL allows.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

from pipeline.errors import OutputError

SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final answer to one request key: answered, or failed with its error after its attempts."""

    key: str
    status: str  # "ok" | "error"
    content: str | None = None
    finish_reason: str | None = None
    refusal: str | None = None
    model: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None
    reasoning_tokens: int | None = None
    cost_usd: float | None = None
    latency_ms: float | None = None
    attempts: int = 0
    error: str | None = None
    error_type: str | None = None
    embedding: bytes | None = None  # float32 little-endian, for embeddings jobs
    retryable: bool = False  # failed on transient trouble (retries ran out): a plain rerun tries again


_COLUMNS = [f.name for f in fields(Outcome)]
_as_row = attrgetter(*_COLUMNS)  # dataclasses.astuple deep-copies every field: too slow per answer
_CREATE = f"""
CREATE TABLE IF NOT EXISTS outcomes (
    {', '.join(f'{c} {"TEXT PRIMARY KEY" if c == "key" else ""}' for c in _COLUMNS)},
    recorded_at REAL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""
_SELECT = ", ".join(_COLUMNS)
_LOOKUP_BATCH = 900  # under SQLite's default limit of host parameters


class Journal:
    """The durable record of outcomes beside an output file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints are where WAL mode pays for fsync; fewer, larger ones keep commits cheap.
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.executescript(_CREATE)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as e:
            raise OutputError(f"{self.path}: cannot open the journal: {e}") from None
        self._pending: list[tuple[object, ...]] = []

    def close(self) -> None:
        """Release the connection (flushing what is buffered, where there is a buffer)."""
        self.flush()
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_meta(self, name: str) -> str | None:
        """A value of the journal's meta table (e.g. the job fingerprint)."""
        row = self._db.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, name: str, value: str) -> None:
        """Record a meta value."""
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (name, value))

    def add(self, outcome: Outcome) -> None:
        """Buffer an outcome; it is durable after the next ``flush``."""
        self._pending.append((*_as_row(outcome), time.time()))

    def flush(self) -> None:
        """Commit every buffered outcome in one transaction."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        marks = ", ".join("?" * (len(_COLUMNS) + 1))
        try:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR REPLACE INTO outcomes VALUES ({marks})", rows)
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            self._pending = rows + self._pending
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutputError(f"{self.path}: cannot write the journal: {e}") from None

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``. Transient failures are never settled; with ``retry_failed``,
        no failure is."""
        return _lookup(self._db, keys, retry_failed)

    def reader(self, *, retry_failed: bool = False) -> JournalReader:
        """A lookup function with its own connection, for another thread (WAL lets it read while we write)."""
        return JournalReader(self.path, retry_failed=retry_failed)

    def get(self, key: str) -> Outcome | None:
        """The recorded outcome of ``key``, settled or not."""
        row = self._db.execute(f"SELECT {_SELECT} FROM outcomes WHERE key = ?", (key,)).fetchone()
        return None if row is None else _outcome(row)

    def count(self) -> dict[str, int]:
        """Outcomes by status, for reports."""
        return {str(s): int(n) for s, n in self._db.execute("SELECT status, COUNT(*) FROM outcomes GROUP BY status")}


class JournalReader:
    """``reader(keys) -> {key: Outcome}`` on a connection of its own; close it when the run ends."""

    def __init__(self, path: Path, *, retry_failed: bool) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.retry_failed = retry_failed

    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``."""
        return _lookup(self._db, keys, self.retry_failed)

    def close(self) -> None:
        """Release the connection."""
        self._db.close()


def _outcome(row: Sequence[Any]) -> Outcome:
    return Outcome(*row[:-1], retryable=bool(row[-1]))  # SQLite hands the flag back as 0/1


def _lookup(db: sqlite3.Connection, keys: Sequence[str], retry_failed: bool) -> dict[str, Outcome]:
    found: dict[str, Outcome] = {}
    cond = "status = 'ok'" if retry_failed else "(status = 'ok' OR retryable = 0)"
    unique = list(dict.fromkeys(keys))
    for i in range(0, len(unique), _LOOKUP_BATCH):
        batch = unique[i:i + _LOOKUP_BATCH]
        q = f"SELECT {_SELECT} FROM outcomes WHERE {cond} AND key IN ({', '.join('?' * len(batch))})"
        for row in db.execute(q, batch):
            found[row[0]] = _outcome(row)
    return found


class NullJournal(Journal):
    """Remembers nothing: for measuring what the journal costs (``bench/resume.py``), never for real runs."""

    def __init__(self) -> None:
        self.path = Path("/dev/null")

    def close(self) -> None:
        """Nothing to release."""

    def get_meta(self, name: str) -> str | None:
        """No meta values are kept."""
        return None

    def set_meta(self, name: str, value: str) -> None:
        """Drop the value."""

    def add(self, outcome: Outcome) -> None:
        """Drop the outcome."""

    def flush(self) -> None:
        """Nothing to commit."""

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]:
        """Nothing is ever settled."""
        return {}

    def get(self, key: str) -> Outcome | None:
        """Nothing is ever recorded."""
        return None

    def reader(self, *, retry_failed: bool = False) -> Any:
        """A lookup that finds nothing."""
        return _NullReader()


class _NullReader:
    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        return {}

    def close(self) -> None:
        pass
