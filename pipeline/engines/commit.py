"""A task's answers committed in chunks to the output dataset: what makes a killed or rerun task pay nothing twice.

A task on another node cannot write the driver's journal, so the committed chunks are the record: each is one
Parquet file named for its partition and the input positions it covers, ``part-<partition>-<lo>-<hi>.parquet``
(every row of ``[lo, hi)`` that the partition still had to do). It is written under a temporary name and renamed
on a local disk, or put in one request on object storage (atomic there): a reader sees all of it or none. A
task, retried or rerun, lists its partition's chunks and skips the rows they cover.

Rows are committed in input order, as soon as ``commit_rows`` of them are answered with no gap before them, so
a task killed mid-partition loses at most the rows it had in flight and those answered but not yet committed:
fewer than ``commit_rows`` plus the rows answered out of order (bounded by one rendered chunk, which a task
keeps at ``commit_rows``). That is the most a kill re-sends.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.outcome import Outcome, VectorBlock
from pipeline.sink import PartWriter
from pipeline.storage import filesystem, is_url, list_names

CHUNK = re.compile(r"^part-([0-9a-f]{16})-(\d{12})-(\d{12})\.parquet$")


def chunk_name(partition: str, lo: int, hi: int) -> str:
    """The file name of a committed chunk."""
    return f"part-{partition}-{lo:012d}-{hi:012d}.parquet"


def committed(dataset: str, endpoint_url: str | None = None) -> dict[str, list[tuple[int, int]]]:
    """Every committed chunk of a dataset, as row ranges by partition id."""
    if is_url(dataset):
        names = list_names(dataset, endpoint_url)
    else:
        try:
            names = sorted(os.listdir(dataset))
        except FileNotFoundError:
            names = []
        except OSError as e:
            raise OutputError(f"{dataset}: cannot list the output dataset: {e.strerror}") from None
    found: dict[str, list[tuple[int, int]]] = {}
    for name in names:
        m = CHUNK.match(name)
        if m:
            found.setdefault(m.group(1), []).append((int(m.group(2)), int(m.group(3))))
    return found


def covered(ranges: Iterable[tuple[int, int]]) -> int:
    """How many input positions some ranges cover (they never overlap: a row is committed once)."""
    return sum(hi - lo for lo, hi in ranges)


def write_chunk(dataset: str, name: str, table: Any, endpoint_url: str | None = None) -> None:
    """Write one chunk atomically: a temporary name renamed locally, one put on object storage."""
    options: dict[str, Any] = {"compression": "zstd", "compression_level": 1}
    if is_url(dataset):
        fs, path = filesystem(dataset, endpoint_url)
        try:
            pq.write_table(table, f"{path.rstrip('/')}/{name}", filesystem=fs, **options)
        except OSError as e:
            raise OutputError(f"{dataset}/{name}: cannot write the chunk: {e}") from None
        return
    final = Path(dataset) / name
    tmp = final.with_suffix(".tmp")
    try:
        pq.write_table(table, tmp, **options)
        os.replace(tmp, final)
    except OSError as e:
        raise OutputError(f"{final}: cannot write the chunk: {e.strerror}") from None


class ChunkSink:
    """The scheduler's sink in a task: rows held until a gap-free run of them can be committed as a chunk.

    ``frame`` builds a chunk's rows in the output's exact schema (the local engine's writer, without its parts),
    so both engines' outputs have the same columns.
    """

    def __init__(self, frame: PartWriter, *, dataset: str, partition: str, row_start: int, rows: int,
                 done: Iterable[tuple[int, int]], commit_rows: int, endpoint_url: str | None = None) -> None:
        self._frame = frame
        self.checker = frame.checker
        self.dataset, self.partition, self.endpoint_url = dataset, partition, endpoint_url
        self.row_start, self.commit_rows = row_start, commit_rows
        self._settled = bytearray(rows)      # 1: committed before, or held now
        for lo, hi in done:
            self._settled[lo - row_start:hi - row_start] = b"\x01" * (hi - lo)
        self._held: dict[int, tuple[tuple[Any, ...], Outcome, bool]] = {}
        self._cursor = 0                     # every position before it is settled
        while self._cursor < rows and self._settled[self._cursor]:  # a retried task: past what was committed
            self._cursor += 1
        self._ready = 0                      # held rows before the cursor
        self.rows_committed = 0
        self.chunks = 0

    def add(self, row: int, keys: tuple[Any, ...], outcome: Outcome, *, deduplicated: bool = False) -> None:
        """One row's result; commits once ``commit_rows`` rows are held with no gap before them."""
        self._held[row] = (keys, outcome, deduplicated)
        i = row - self.row_start
        self._settled[i] = 1
        if i == self._cursor:
            settled, n, start = self._settled, len(self._settled), self._cursor
            j = start
            while j < n and settled[j]:
                j += 1
            self._ready += sum(1 for r in range(start, j) if r + self.row_start in self._held)
            self._cursor = j
        elif i < self._cursor:  # pragma: no cover - a row is added once, and never before the cursor
            self._ready += 1
        if self._ready >= self.commit_rows:
            self._commit(upto=self.row_start + self._cursor)

    def add_block(self, rows: list[int], keys: list[tuple[Any, ...]], block: VectorBlock) -> None:
        """A request's rows' vectors, one by one (chunks are small; the local writer's arrays are not needed)."""
        for i, (row, key) in enumerate(zip(rows, keys, strict=True)):
            self.add(row, key, block.outcome(i))

    def _commit(self, upto: int | None = None) -> None:
        """Commit the held rows below ``upto`` (all of them when None), one chunk per gap-free run."""
        rows = sorted(r for r in self._held if upto is None or r < upto)
        runs: list[list[int]] = []
        for r in rows:
            if runs and r == runs[-1][-1] + 1:
                runs[-1].append(r)
            else:
                runs.append([r])
        for run in runs:
            frame = self._frame
            for r in run:
                keys, outcome, dedup = self._held.pop(r)
                frame.add(r, keys, outcome, deduplicated=dedup)
            table = frame.arrow_table(frame.take())
            write_chunk(self.dataset, chunk_name(self.partition, run[0], run[-1] + 1), table, self.endpoint_url)
            self.rows_committed += len(run)
            self.chunks += 1
        self._ready = sum(1 for r in self._held if r < self.row_start + self._cursor)

    def flush(self) -> None:
        """Nothing to do between commits (the scheduler's sinks may be flushed)."""

    def finish(self) -> int:
        """Commit every row still held (the task ended, or is stopping); returns the rows this task committed."""
        self._commit()
        return self.rows_committed
