"""What has been answered, so a rerun resumes and never pays twice.

The store is SQLite in WAL mode, one row per request key (a hash of endpoint + exact body). Why SQLite: a
commit is atomic and survives ``kill -9`` at any instant (the WAL is replayed on open), lookups by key are
indexed (a resume checks a million keys in seconds without loading them into memory), and it ships with
Python. Commits are grouped: the executor adds outcomes as they arrive and commits once per event-loop turn,
before any of those rows reach the output, so a kill loses at most what was in flight. ``synchronous=NORMAL``
trades durability against power loss (not process death) for speed, as WAL allows.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
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
CREATE TABLE IF NOT EXISTS batch_parts (
    part INTEGER PRIMARY KEY, path TEXT, requests INTEGER, bytes INTEGER, file_id TEXT, batch_id TEXT,
    status TEXT, counts TEXT, output_file_id TEXT, error_file_id TEXT, created_at REAL, collected INTEGER
);
CREATE TABLE IF NOT EXISTS batch_items (key TEXT PRIMARY KEY, part INTEGER);
"""
_SELECT = ", ".join(_COLUMNS)
_INSERT = f"INSERT OR REPLACE INTO outcomes VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})"
_PART_COLUMNS = ("part, path, requests, bytes, file_id, batch_id, status, counts, output_file_id, error_file_id, "
                 "created_at, collected")


@dataclass(frozen=True)
class BatchPart:
    """One Batch API input file of a job and what became of it: written locally, uploaded, submitted as a
    batch, then collected (its results are outcomes). Recorded at each step, so a rerun picks up where the
    last one stopped and never submits a file twice."""

    part: int
    path: str
    requests: int
    bytes: int
    file_id: str | None = None
    batch_id: str | None = None
    status: str | None = None          # the provider's batch status
    counts: str | None = None          # the provider's request_counts, as JSON
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float | None = None
    collected: bool = False
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
        try:
            with self._transaction():
                self._db.executemany(_INSERT, rows)
        except OutputError:
            self._pending = rows + self._pending
            raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One atomic write: all of it is committed, or none of it (and the error names the journal)."""
        try:
            self._db.execute("BEGIN")
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error as e:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise OutputError(f"{self.path}: cannot write the journal: {e}") from None

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``. Transient failures are never settled; with ``retry_failed``,
        no failure is."""
        return _lookup(self._db, keys, retry_failed)

    def reader(self, *, retry_failed: bool = False, any_outcome: bool = False) -> JournalReader:
        """A lookup function with its own connection, for another thread (WAL lets it read while we write).
        With ``any_outcome`` it finds every recorded outcome, settled or not (for writing the output)."""
        return JournalReader(self.path, retry_failed=retry_failed, any_outcome=any_outcome)

    def get(self, key: str) -> Outcome | None:
        """The recorded outcome of ``key``, settled or not."""
        row = self._db.execute(f"SELECT {_SELECT} FROM outcomes WHERE key = ?", (key,)).fetchone()
        return None if row is None else _outcome(row)

    # -- Batch API parts ---------------------------------------------------------------------------------------

    def add_part(self, path: str, keys: Sequence[str], size: int) -> BatchPart:
        """Record a written batch input file and the request keys in it, in one transaction."""
        with self._transaction():
            cur = self._db.execute("INSERT INTO batch_parts (path, requests, bytes, created_at, collected) "
                                   "VALUES (?, ?, ?, ?, 0)", (path, len(keys), size, time.time()))
            part = int(cur.lastrowid or 0)
            self._db.executemany("INSERT OR REPLACE INTO batch_items VALUES (?, ?)", ((k, part) for k in keys))
        found = self.part(part)
        assert found is not None
        return found

    def update_part(self, part: int, **values: Any) -> BatchPart:
        """Record what the provider said about a part (its file id, batch id, status, counts)."""
        names = ", ".join(f"{k} = ?" for k in values)
        with self._transaction():
            self._db.execute(f"UPDATE batch_parts SET {names} WHERE part = ?", (*values.values(), part))
        found = self.part(part)
        assert found is not None
        return found

    def part(self, part: int) -> BatchPart | None:
        """One part by number."""
        row = self._db.execute(f"SELECT {_PART_COLUMNS} FROM batch_parts WHERE part = ?", (part,)).fetchone()
        return None if row is None else BatchPart(*row[:-1], collected=bool(row[-1]))

    def parts(self, *, active: bool = False) -> list[BatchPart]:
        """Every part in order; with ``active``, those whose results are not collected yet."""
        where = " WHERE collected = 0" if active else ""
        rows = self._db.execute(f"SELECT {_PART_COLUMNS} FROM batch_parts{where} ORDER BY part")
        return [BatchPart(*r[:-1], collected=bool(r[-1])) for r in rows]

    def part_keys(self, part: int) -> list[str]:
        """The request keys a part carries."""
        return [str(r[0]) for r in self._db.execute("SELECT key FROM batch_items WHERE part = ?", (part,))]

    def drop_part(self, part: int) -> None:
        """Forget a part that never reached the provider (its local file is gone): its rows are planned again."""
        with self._transaction():
            self._db.execute("DELETE FROM batch_items WHERE part = ?", (part,))
            self._db.execute("DELETE FROM batch_parts WHERE part = ?", (part,))

    def collect_part(self, part: int, outcomes: Sequence[Outcome]) -> None:
        """Record a finished batch's outcomes and mark it collected, in one transaction: a kill during
        collection leaves it uncollected, and the rerun downloads its results again."""
        now = time.time()
        with self._transaction():
            self._db.executemany(_INSERT, ((*_as_row(o), now) for o in outcomes))
            self._db.execute("UPDATE batch_parts SET collected = 1 WHERE part = ?", (part,))

    def count(self) -> dict[str, int]:
        """Outcomes by status, for reports."""
        return {str(s): int(n) for s, n in self._db.execute("SELECT status, COUNT(*) FROM outcomes GROUP BY status")}


class JournalReader:
    """``reader(keys) -> {key: Outcome}`` on a connection of its own; close it when the run ends."""

    def __init__(self, path: Path, *, retry_failed: bool, any_outcome: bool = False) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.retry_failed, self.any_outcome = retry_failed, any_outcome

    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``."""
        return _lookup(self._db, keys, self.retry_failed, self.any_outcome)

    def close(self) -> None:
        """Release the connection."""
        self._db.close()


def _outcome(row: Sequence[Any]) -> Outcome:
    return Outcome(*row[:-1], retryable=bool(row[-1]))  # SQLite hands the flag back as 0/1


def _lookup(db: sqlite3.Connection, keys: Sequence[str], retry_failed: bool,
            any_outcome: bool = False) -> dict[str, Outcome]:
    found: dict[str, Outcome] = {}
    cond = "1" if any_outcome else "status = 'ok'" if retry_failed else "(status = 'ok' OR retryable = 0)"
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

    def reader(self, *, retry_failed: bool = False, any_outcome: bool = False) -> Any:
        """A lookup that finds nothing."""
        return _NullReader()


class _NullReader:
    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        return {}

    def close(self) -> None:
        pass
