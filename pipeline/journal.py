"""What has been answered, so a rerun resumes and never pays twice.

The store is SQLite in WAL mode, one row per request key (a hash of endpoint + exact body). Why SQLite: a
commit is atomic and survives ``kill -9`` at any instant (the WAL is replayed on open), lookups by key are
indexed (a resume checks a million keys in seconds without loading them into memory), and it ships with
Python. Commits are grouped: the executor adds outcomes as they arrive and commits once per event-loop turn,
before any of those rows reach the output, so a kill loses at most what was in flight. ``synchronous=NORMAL``
trades durability against power loss (not process death) for speed, as WAL allows.

Embeddings answers are kept by request, not by row (``VectorBlock``: the keys, token counts and costs of one
request in one record, its vectors in rows keyed by block and position). Why: a row per answer means a random
insert into the key index per row, and once the index outgrows one transaction every commit rewrites hundreds
of pages (measured: 6 µs per row at 20,000 rows, 16 µs at 300,000, before the vectors themselves). A block and
its vectors are appended; the keys it holds are found through an in-memory index of 64-bit key prefixes
(``_KeyIndex``, 16 bytes per row), loaded from the blocks when a lookup first needs it.

The Batch API's record of files and batches lives in the same file, in its own class (``ledger.BatchLedger``).
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.errors import JournalUnusable, OutputError
from pipeline.outcome import OUTCOME_FIELDS, Outcome, VectorBlock, embedding_row

SCHEMA_VERSION = 2  # 2: vector_blocks and vectors (a version-1 journal is read as is; they are added on open)


_DIGEST = 16  # request keys are 16-byte blake2b digests in hex (render.request_key)


def _digests(keys: Sequence[str]) -> bytes | None:
    """The keys as concatenated binary digests; None when one is not a request key (then no block holds it)."""
    try:
        raw = bytes.fromhex("".join(keys))
    except ValueError:
        return None
    return raw if len(raw) == _DIGEST * len(keys) else None


def _raw(a: np.ndarray) -> memoryview:
    """An array's bytes without copying them (``tobytes`` copies 0.5 MB per block, into fresh pages)."""
    return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))  # type: ignore[arg-type]


def _prefixes(digests: bytes) -> np.ndarray:
    """The first 8 bytes of each digest as one integer: what the in-memory index sorts and searches."""
    return np.frombuffer(digests, dtype="<u8")[::2]


_BLOCK_ROW_BITS = 20  # a location is block << 20 | row: up to a million rows per block (the API allows 2,048)


class _KeyIndex:
    """Which block, and which row in it, holds a request key: 64-bit key prefixes kept sorted in numpy
    (16 bytes per row), plus a small dict of recent additions merged in when it grows. A prefix match is
    confirmed against the block's full key before it is trusted."""

    def __init__(self) -> None:
        self._keys = np.empty(0, dtype="<u8")
        self._locs = np.empty(0, dtype=np.int64)
        self._recent: dict[int, int] = {}
        self.last_block = 0

    def add(self, block: int, digests: bytes) -> None:
        """Index a block's keys."""
        for row, prefix in enumerate(_prefixes(digests).tolist()):
            self._recent.setdefault(prefix, block << _BLOCK_ROW_BITS | row)
        self.last_block = max(self.last_block, block)
        if len(self._recent) > max(4096, len(self._keys) // 8):
            self._merge()

    def _merge(self) -> None:
        keys = np.fromiter(self._recent.keys(), dtype="<u8", count=len(self._recent))
        locs = np.fromiter(self._recent.values(), dtype=np.int64, count=len(self._recent))
        keys, locs = np.concatenate([self._keys, keys]), np.concatenate([self._locs, locs])
        order = np.argsort(keys, kind="stable")
        self._keys, self._locs, self._recent = keys[order], locs[order], {}

    def refresh(self, db: sqlite3.Connection) -> None:
        """Index the blocks committed since the last look (by any connection)."""
        for block, digests in db.execute("SELECT block, keys FROM vector_blocks WHERE block > ? ORDER BY block",
                                          (self.last_block,)):
            self.add(int(block), bytes(digests))

    def find(self, digests: bytes) -> list[int]:
        """The location of each key (-1 where no block holds it)."""
        queries = _prefixes(digests)
        found = np.full(len(queries), -1, dtype=np.int64)
        if len(self._keys):
            pos = np.minimum(np.searchsorted(self._keys, queries), len(self._keys) - 1)
            hit = self._keys[pos] == queries
            found[hit] = self._locs[pos[hit]]
        out = found.tolist()
        if self._recent:
            recent = self._recent
            for i, prefix in enumerate(queries.tolist()):
                if out[i] < 0:
                    out[i] = recent.get(prefix, -1)
        return out


class _RecentBlocks:
    """The last blocks committed, kept in memory (up to ``budget`` bytes of vectors): a duplicate row usually
    asks for an answer that just arrived, and reading one row out of a stored block costs ~0.1 ms."""

    def __init__(self, budget: int = 32 << 20) -> None:
        self._blocks: dict[int, VectorBlock] = {}
        self._bytes, self._budget = 0, budget

    def add(self, block: int, b: VectorBlock) -> None:
        """Keep a committed block, forgetting the oldest beyond the budget."""
        self._blocks[block] = b
        self._bytes += b.vectors.nbytes
        while self._bytes > self._budget and len(self._blocks) > 1:
            oldest = next(iter(self._blocks))
            self._bytes -= self._blocks.pop(oldest).vectors.nbytes

    def get(self, block: int) -> VectorBlock | None:
        """The block if it is still held (safe from another thread: one dict read)."""
        return self._blocks.get(block)


_BLOCK_META = ("SELECT dims, model, latency_ms, attempts, keys, prompt_tokens, cost_usd FROM vector_blocks "
               "WHERE block = ?")


def _block_outcomes(db: sqlite3.Connection, index: _KeyIndex, keys: Sequence[str],
                    recent: _RecentBlocks | None = None) -> dict[str, Outcome]:
    """The outcomes of ``keys`` that blocks hold: from the blocks still in memory, else from the journal."""
    digests = _digests(keys)
    if digests is None or not keys:
        return {}
    wanted: dict[int, list[tuple[int, int]]] = {}
    for i, loc in enumerate(index.find(digests)):
        if loc >= 0:
            wanted.setdefault(loc >> _BLOCK_ROW_BITS, []).append((i, loc & ((1 << _BLOCK_ROW_BITS) - 1)))
    found: dict[str, Outcome] = {}
    for block, rows in wanted.items():
        held = recent.get(block) if recent is not None else None
        if held is not None:
            found.update((keys[i], held.outcome(row)) for i, row in rows if held.keys[row] == keys[i])
            continue
        meta = db.execute(_BLOCK_META, (block,)).fetchone()
        if meta is None:
            continue
        dims, model, latency_ms, attempts, stored, tokens, costs = meta
        rows = [(i, row) for i, row in rows
                if stored[row * _DIGEST:(row + 1) * _DIGEST] == digests[i * _DIGEST:(i + 1) * _DIGEST]]
        base = block << _BLOCK_ROW_BITS
        vectors: dict[int, bytes] = {}
        for n in range(0, len(rows), _LOOKUP_BATCH):
            locs = [base | row for _, row in rows[n:n + _LOOKUP_BATCH]]
            vectors.update(db.execute(f"SELECT loc, v FROM vectors WHERE loc IN ({', '.join('?' * len(locs))})",
                                      locs).fetchall())
        tok = np.frombuffer(tokens, "<i8")
        cost = None if costs is None else np.frombuffer(costs, "<f8")
        for i, row in rows:
            vec = vectors.get(base | row)
            if vec is None or len(vec) != 4 * dims:
                continue  # not expected from a committed block; then the row is simply sent again
            found[keys[i]] = embedding_row(keys[i], vec, model=model, prompt_tokens=int(tok[row]),
                                           cost_usd=None if cost is None else float(cost[row]),
                                           latency_ms=latency_ms, attempts=int(attempts))
    return found


_COLUMNS = list(OUTCOME_FIELDS)
_as_row = attrgetter(*_COLUMNS)  # dataclasses.astuple deep-copies every field: too slow per answer
# outcomes_failed: the failures alone (an answer that is ok never enters it), so a resume finds what is not
# settled without reading every outcome (rowprints.settled_keys).
# A block's vectors are rows of their own, keyed block << 20 | row: appended in key order (so a commit writes
# about the vectors' bytes, no more), and one is read without the rest. Stored as one 0.5 MB blob per block
# instead, reading one row for a duplicate walked SQLite's overflow chain: 80 us a row against 6.
_CREATE = f"""
CREATE TABLE IF NOT EXISTS outcomes (
    {', '.join(f'{c} {"TEXT PRIMARY KEY" if c == "key" else ""}' for c in _COLUMNS)},
    recorded_at REAL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS vector_blocks (
    block INTEGER PRIMARY KEY, dims INTEGER, model TEXT, latency_ms REAL, attempts INTEGER, recorded_at REAL,
    keys BLOB, prompt_tokens BLOB, cost_usd BLOB
);
CREATE TABLE IF NOT EXISTS vectors (loc INTEGER PRIMARY KEY, v BLOB);
CREATE INDEX IF NOT EXISTS outcomes_failed ON outcomes (key, retryable) WHERE status != 'ok';
"""
_SELECT = ", ".join(_COLUMNS)
# One statement splits a block's vectors into rows inside SQLite: a Python tuple per row cost twice as much.
_INSERT_VECTORS = ("WITH RECURSIVE r(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM r WHERE i + 1 < :n) "
                   "INSERT OR REPLACE INTO vectors SELECT :base + i, substr(:data, i * :w + 1, :w) FROM r")
# Columns by name: a journal written before a field was added to Outcome gets the column on open.
_INSERT = (f"INSERT OR REPLACE INTO outcomes ({', '.join(_COLUMNS)}, recorded_at) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})")
_LOOKUP_BATCH = 900  # under SQLite's default limit of host parameters


class Journal:
    """The durable record of outcomes beside an output file."""

    def __init__(self, path: str | Path, *, check: bool = False) -> None:
        """``check``: verify every page first (``PRAGMA quick_check``), as a run does before it sends anything:
        a damaged page is otherwise found only when a lookup or a commit reaches it, mid-run, after paying."""
        self.path = Path(path)
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            if check and existed:
                self._check()
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Checkpoints are where WAL mode pays for fsync; fewer, larger ones keep commits cheap.
            self._db.execute("PRAGMA wal_autocheckpoint=10000")
            self._db.executescript(_CREATE)
            have = {str(r[1]) for r in self._db.execute("PRAGMA table_info(outcomes)")}
            for name in (c for c in _COLUMNS if c not in have):  # a field added to Outcome since it was made
                self._db.execute(f"ALTER TABLE outcomes ADD COLUMN {name}")
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(AttributeError):
                self._db.close()
            if type(e) is sqlite3.DatabaseError:  # "file is not a database", "disk image is malformed"
                raise JournalUnusable(f"{self.path}: the journal is damaged ({e}); nothing was sent") from None
            raise OutputError(f"{self.path}: cannot open the journal: {e}") from None
        self._pending: list[tuple[object, ...]] = []
        self._pending_blocks: list[tuple[VectorBlock, bytes]] = []  # with their keys as binary digests
        self._index: _KeyIndex | None = None  # loaded when a lookup first needs it
        self._recent = _RecentBlocks()

    def _check(self) -> None:
        """Raise JournalUnusable unless every page and index of the file is sound."""
        problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            self._db.close()
            raise JournalUnusable(f"{self.path}: the journal is damaged ({'; '.join(problems)[:300]}); "
                                  "nothing was sent")

    def is_empty(self) -> bool:
        """Whether nothing was ever recorded: no outcome, no embeddings block, no Batch API file."""
        for table in ("outcomes", "vector_blocks", "batch_parts"):
            try:
                if self._db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                    return False
            except sqlite3.OperationalError:  # batch_parts exists once a batch run made it
                continue
        return True

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

    def add_block(self, block: VectorBlock) -> None:
        """Buffer the answers of one embeddings request; durable after the next ``flush``."""
        digests = _digests(block.keys)
        if digests is None:  # not request keys (hand-made in a test): keep them row by row
            for i in range(len(block.keys)):
                self.add(block.outcome(i))
            return
        self._pending_blocks.append((block, digests))

    def flush(self) -> None:
        """Commit every buffered outcome and block in one transaction."""
        if not self._pending and not self._pending_blocks:
            return
        rows, self._pending = self._pending, []
        blocks, self._pending_blocks = self._pending_blocks, []
        added: list[tuple[int, bytes, VectorBlock]] = []
        now = time.time()
        try:
            with self.transaction():
                self._db.executemany(_INSERT, rows)
                for b, digests in blocks:
                    cur = self._db.execute(
                        "INSERT INTO vector_blocks (dims, model, latency_ms, attempts, recorded_at, keys, "
                        "prompt_tokens, cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (b.vectors.shape[1], b.model, b.latency_ms, b.attempts, now, digests,
                         b.prompt_tokens.astype("<i8", copy=False).tobytes(),
                         None if b.cost_usd is None else b.cost_usd.astype("<f8", copy=False).tobytes()))
                    block = int(cur.lastrowid or 0)
                    self._db.execute(_INSERT_VECTORS, {"n": len(b.keys), "base": block << _BLOCK_ROW_BITS,
                                                       "w": 4 * b.vectors.shape[1],
                                                       "data": _raw(b.vectors.astype("<f4", copy=False))})
                    added.append((block, digests, b))
        except OutputError:
            self._pending = rows + self._pending
            self._pending_blocks = blocks + self._pending_blocks
            raise
        for block, digests, b in added:
            self._recent.add(block, b)
            if self._index is not None:
                self._index.add(block, digests)

    def _blocks(self) -> _KeyIndex:
        if self._index is None:
            self._index = _KeyIndex()
            self._index.refresh(self._db)
        return self._index

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, for the stores that share this file (the Batch API ledger)."""
        return self._db

    def insert(self, outcomes: Sequence[Outcome]) -> None:
        """Write outcomes now, inside the caller's ``transaction()`` (not buffered)."""
        now = time.time()
        self._db.executemany(_INSERT, ((*_as_row(o), now) for o in outcomes))

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic write: all of it is committed, or none of it (and the error names the journal)."""
        try:
            self._db.execute("BEGIN")
            yield
            self._db.execute("COMMIT")
        except BaseException as e:  # any exception (a signal's too): never leave a BEGIN open
            if self._db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self._db.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise OutputError(f"{self.path}: cannot write the journal: {e}") from None
            raise

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``. Transient failures are never settled; with ``retry_failed``,
        no failure is."""
        return _lookup(self._db, self._blocks(), keys, retry_failed, recent=self._recent)

    def reader(self, *, retry_failed: bool = False, any_outcome: bool = False) -> JournalReader:
        """A lookup function with its own connection, for another thread (WAL lets it read while we write).
        With ``any_outcome`` it finds every recorded outcome, settled or not (for writing the output)."""
        return JournalReader(self.path, retry_failed=retry_failed, any_outcome=any_outcome, recent=self._recent)

    def get(self, key: str) -> Outcome | None:
        """The recorded outcome of ``key``, settled or not."""
        held = _block_outcomes(self._db, self._blocks(), [key], self._recent)
        if held:
            return held[key]
        row = self._db.execute(f"SELECT {_SELECT} FROM outcomes WHERE key = ?", (key,)).fetchone()
        return None if row is None else _outcome(row)

    def count(self) -> dict[str, int]:
        """Outcomes by status, for reports."""
        counts = {str(s): int(n) for s, n in self._db.execute("SELECT status, COUNT(*) FROM outcomes GROUP BY status")}
        in_blocks = self._db.execute(f"SELECT SUM(LENGTH(keys)) / {_DIGEST} FROM vector_blocks").fetchone()[0]
        if in_blocks:
            counts["ok"] = counts.get("ok", 0) + int(in_blocks)
        return counts


def journal_fingerprint(path: Path) -> str | None:
    """The job fingerprint a journal records, read without writing to it (None: no journal, or unreadable)."""
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name = 'fingerprint'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return None
    return None if row is None else str(row[0])


class JournalReader:
    """``reader(keys) -> {key: Outcome}`` on a connection of its own; close it when the run ends."""

    def __init__(self, path: Path, *, retry_failed: bool, any_outcome: bool = False,
                 recent: _RecentBlocks | None = None) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.retry_failed, self.any_outcome = retry_failed, any_outcome
        self._index = _KeyIndex()
        self._recent = recent  # the writer's blocks still in memory

    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        """The settled outcomes among ``keys``."""
        self._index.refresh(self._db)
        return _lookup(self._db, self._index, keys, self.retry_failed, self.any_outcome, self._recent)

    def close(self) -> None:
        """Release the connection."""
        self._db.close()


_FLAG = OUTCOME_FIELDS.index("usage_estimated")


def _outcome(row: Sequence[Any]) -> Outcome:
    values = list(row[:-1])
    if values[_FLAG] is not None:  # SQLite hands flags back as 0/1
        values[_FLAG] = bool(values[_FLAG])
    return Outcome(*values, retryable=bool(row[-1]))  # type: ignore[misc]  # values stop before retryable


def _lookup(db: sqlite3.Connection, index: _KeyIndex, keys: Sequence[str], retry_failed: bool,
            any_outcome: bool = False, recent: _RecentBlocks | None = None) -> dict[str, Outcome]:
    """Blocks first: a key answered there is ok, whatever failure an earlier attempt left in ``outcomes``."""
    unique = list(dict.fromkeys(keys))
    found = _block_outcomes(db, index, unique, recent)
    if found:
        unique = [k for k in unique if k not in found]
    cond = "1" if any_outcome else "status = 'ok'" if retry_failed else "(status = 'ok' OR retryable = 0)"
    for i in range(0, len(unique), _LOOKUP_BATCH):
        batch = unique[i:i + _LOOKUP_BATCH]
        q = f"SELECT {_SELECT} FROM outcomes WHERE {cond} AND key IN ({', '.join('?' * len(batch))})"
        for row in db.execute(q, batch):
            found[row[0]] = _outcome(row)
    return found


class Reader(Protocol):
    """``reader(keys) -> {key: Outcome}`` on its own connection, for another thread."""

    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]: ...

    def close(self) -> None: ...


class OutcomeStore(Protocol):
    """What a run needs of its record of outcomes: the journal, or nothing at all (``NullJournal``)."""

    def get_meta(self, name: str) -> str | None: ...

    def set_meta(self, name: str, value: str) -> None: ...

    def add(self, outcome: Outcome) -> None: ...

    def add_block(self, block: VectorBlock) -> None: ...

    def flush(self) -> None: ...

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]: ...

    def reader(self, *, retry_failed: bool = False, any_outcome: bool = False) -> Reader: ...

    def get(self, key: str) -> Outcome | None: ...

    def close(self) -> None: ...


class NullJournal:
    """Remembers nothing: for measuring what the journal costs (``bench/resume.py``), never for real runs."""

    def close(self) -> None:
        """Nothing to release."""

    def get_meta(self, name: str) -> str | None:
        """No meta values are kept."""
        return None

    def set_meta(self, name: str, value: str) -> None:
        """Drop the value."""

    def add(self, outcome: Outcome) -> None:
        """Drop the outcome."""

    def add_block(self, block: VectorBlock) -> None:
        """Drop the block."""

    def flush(self) -> None:
        """Nothing to commit."""

    def lookup(self, keys: Sequence[str], *, retry_failed: bool = False) -> dict[str, Outcome]:
        """Nothing is ever settled."""
        return {}

    def get(self, key: str) -> Outcome | None:
        """Nothing is ever recorded."""
        return None

    def reader(self, *, retry_failed: bool = False, any_outcome: bool = False) -> Reader:
        """A lookup that finds nothing."""
        return _NullReader()


class _NullReader:
    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        return {}

    def close(self) -> None:
        pass
