"""Row prints: knowing a row was answered before without rendering and tokenizing it again.

A resume must know which rows are done. The exact way renders each row, builds its JSON body, hashes it into
the request key and finds the key in the journal: a million rows, most of them done, took 35 s before the
first new request. A row print is 128 bits of polars' row hash over the values of the columns the templates
read, a whole chunk at a time (nanoseconds a row). Each run records beside the print the request key the row
rendered to; the next run skips every row whose print leads to a settled answer, and renders the others.

Why it cannot pay twice or lose a row: a print stands for a key only under the same *basis* (the job's request
and API settings with the template texts, the template columns and their dtypes, the polars version, since its
hash is stable within one version only, and the key of the input's first row rendered by this code, so a change
in how bodies are built shows). Any difference and the recorded prints are dropped: rows are then recognised
the exact way, and recorded again. A row whose print is unknown is simply rendered; a false match would need two
different rows to agree on 128 bits. Online chat jobs only: the Batch API runner keeps every row's key, and an
embeddings answer lives in a block of many rows.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable

import numpy as np
import polars as pl

from pipeline.errors import OutputError
from pipeline.render import Renderer
from pipeline.rendered import RenderedChunk
from pipeline.source import ROW, Source, iter_chunks

_SEEDS = (0x5EED5EED, 0x0B0B0B0B)  # two 64-bit hashes of each row, seeded apart
# One record per chunk of prints, as arrays (as the journal keeps embeddings): a million rows load in
# milliseconds, where a row per print took 2-3 s to read back and join with the outcomes (bench/resume.py).
_CREATE = "CREATE TABLE IF NOT EXISTS row_prints (block INTEGER PRIMARY KEY, hi BLOB, lo BLOB, keys BLOB)"
_BASIS = "row_print_basis"
_DIGEST = 16


def basis(renderer: Renderer, source: Source) -> str:
    """What a print's meaning rests on; recorded prints count only under the same basis."""
    job = renderer.job
    probe = next(iter_chunks(source, renderer.columns, chunk_rows=1, limit=1))
    first = renderer.render_chunk(probe)
    spec = [repr(job.request), repr(job.api), repr(job.input.skip_nulls), pl.__version__,
            [(c, str(source.schema[c])) for c in renderer.template_columns],
            first.requests[0].key if first.requests else "skipped"]
    return hashlib.sha256(repr(spec).encode()).hexdigest()


def _as_pairs(digests: bytes) -> np.ndarray:
    """16-byte keys as rows of two 64-bit integers."""
    return np.frombuffer(digests, dtype="<i8").reshape(-1, 2)


class RowPrints:
    """The prints recorded in a journal, loaded once per run, and the recording of new ones."""

    def __init__(self, db: sqlite3.Connection, where: str, renderer: Renderer, source: Source, *,
                 retry_failed: bool) -> None:
        self._db, self._where, self._columns = db, where, renderer.template_columns
        here = basis(renderer, source)
        try:
            db.execute(_CREATE)
            row = db.execute("SELECT value FROM meta WHERE name = ?", (_BASIS,)).fetchone()
            if row is None or row[0] != here:  # another basis: those prints mean nothing now
                db.execute("DELETE FROM row_prints")
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (_BASIS, here))
            blocks = db.execute("SELECT hi, lo, keys FROM row_prints ORDER BY block").fetchall()
            answered = settled_keys(db, retry_failed) if blocks else np.empty((0, 2), dtype="<i8")
        except sqlite3.Error as e:
            raise OutputError(f"{where}: cannot read the row prints: {e}") from None
        hi = np.frombuffer(b"".join(b[0] for b in blocks), dtype=np.int64)
        lo = np.frombuffer(b"".join(b[1] for b in blocks), dtype=np.int64)
        keys = _as_pairs(b"".join(b[2] for b in blocks))
        order = np.argsort(hi, kind="stable")
        self._hi, self._lo = hi[order], lo[order]
        self._settled = _contains(answered, keys[order])
        self._new: set[int] = set()
        self._pending: list[tuple[int, int, str]] = []

    def __len__(self) -> int:
        return len(self._hi)

    def of(self, chunk: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The prints of a chunk's rows (as signed 64-bit halves)."""
        values = chunk.select(self._columns) if self._columns else chunk.select(pl.lit(0))
        hi, lo = (values.hash_rows(seed).to_numpy().view(np.int64) for seed in _SEEDS)
        return hi, lo

    def find(self, hi: np.ndarray, lo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each print: whether it is recorded at all, and whether it leads to a settled answer."""
        if not len(self._hi):
            none = np.zeros(len(hi), dtype=bool)
            return none, none
        pos = np.minimum(np.searchsorted(self._hi, hi), len(self._hi) - 1)
        known = (self._hi[pos] == hi) & (self._lo[pos] == lo)  # a 64-bit clash of halves is just a miss
        return known, known & self._settled[pos]

    def record(self, rendered: RenderedChunk, prints: Iterable[tuple[int, int, int]]) -> None:
        """Remember the keys the rendered rows led to; ``prints`` is (row, hi, lo) of the rows not recorded."""
        at = {row: (hi, lo) for row, hi, lo in prints}
        new = self._new
        for r in rendered.requests:
            p = at.get(r.row)
            if p is not None and p[0] not in new:  # an identical row of this pass is recorded already
                new.add(p[0])
                self._pending.append((p[0], p[1], r.key))

    def flush(self) -> None:
        """Write what ``record`` collected as one block."""
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        hi = np.array([r[0] for r in rows], dtype=np.int64).tobytes()
        lo = np.array([r[1] for r in rows], dtype=np.int64).tobytes()
        keys = bytes.fromhex("".join(r[2] for r in rows))
        try:
            self._db.execute("INSERT INTO row_prints (hi, lo, keys) VALUES (?, ?, ?)", (hi, lo, keys))
        except sqlite3.Error as e:
            raise OutputError(f"{self._where}: cannot write the row prints: {e}") from None


def settled_keys(db: sqlite3.Connection, retry_failed: bool) -> np.ndarray:
    """Every settled key of the journal's outcomes as sorted pairs of integers: all keys (from the key index
    alone, concatenated by SQLite: a million in 0.2 s, where a Python string per key took 0.6 s), less the
    failures that are not settled (from the small index of failures). bench/resume.py checks the resume time."""
    unsettled = "status != 'ok'" + ("" if retry_failed else " AND retryable != 0")
    (joined,) = db.execute(f"SELECT group_concat(key, '') FROM outcomes WHERE length(key) = {2 * _DIGEST} AND "
                           f"key NOT IN (SELECT key FROM outcomes INDEXED BY outcomes_failed WHERE {unsettled})"
                           ).fetchone()
    try:
        pairs = _as_pairs(bytes.fromhex(joined or ""))
    except ValueError:  # a hand-made key that is not hex: then no print counts (rows are recognised by key)
        pairs = _as_pairs(b"")
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def _contains(sorted_pairs: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Whether each of ``pairs`` is among ``sorted_pairs`` (sorted by first, then second)."""
    if not len(sorted_pairs):
        return np.zeros(len(pairs), dtype=bool)
    # Searching in order walks the table once: 2.5x faster than at random (bench/resume.py)
    order = np.argsort(pairs[:, 0])
    pairs = pairs[order]
    first = np.ascontiguousarray(sorted_pairs[:, 0])
    lo = np.searchsorted(first, pairs[:, 0], side="left")
    hi = np.searchsorted(first, pairs[:, 0], side="right")
    found = np.zeros(len(pairs), dtype=bool)
    single = (hi - lo) == 1  # the usual case: one key with these first 64 bits
    idx = np.minimum(lo, len(first) - 1)
    found[single] = sorted_pairs[idx[single], 1] == pairs[single, 1]
    for i in np.flatnonzero((hi - lo) > 1):  # first halves shared: compare the second halves one by one
        found[i] = bool(np.any(sorted_pairs[lo[i]:hi[i], 1] == pairs[i, 1]))
    result = np.empty_like(found)
    result[order] = found
    return result


def split_done(prints: RowPrints, chunk: pl.DataFrame) -> tuple[pl.DataFrame, int, list[tuple[int, int, int]]]:
    """The rows of a chunk still to look at, how many are done by their print, and the prints not recorded."""
    hi, lo = prints.of(chunk)
    known, done = prints.find(hi, lo)
    n_done = int(done.sum())
    rest = chunk.filter(pl.Series(~done)) if n_done else chunk
    unknown = ~known
    rows = chunk.get_column(ROW).to_numpy()
    new = list(zip(rows[unknown].tolist(), hi[unknown].tolist(), lo[unknown].tolist(), strict=True))
    return rest, n_done, new
