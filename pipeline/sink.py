"""The output: a Parquet file with the input's id and kept columns next to each answer, and a manifest.

Rows go to the output as results arrive, in input order: whenever the rows buffered so far continue the
file without a gap, they are appended as row groups (answers mostly arrive in input order, so the file is
written while the run waits on the network, not after it). Rows that cannot be placed yet wait in memory; past
a part's worth they are written as a sorted Parquet part instead (memory stays flat), and the parts are merged
in order at the end. The file is written to a temporary name and renamed, so a reader never sees half a file.
The manifest beside it records the job, the totals, the estimate made before the run and the price source, and
marks the output as this job's: a different job's output is never overwritten.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import OutputError
from pipeline.outcome import RESULT_SCHEMA, Outcome, VectorBlock, output_values
from pipeline.source import ROW
from pipeline.structured import Checker

PART_ROWS = 10_000
PART_VECTOR_BYTES = 32 << 20  # vector answers: parts hold up to this much of vectors (more rows when they are small)
PART_GROUP_ROWS = 2_048
COMPACT_ROWS = 10_000  # rows per output row group (and held in memory at once while merging parts)
STREAM_EVERY = 4_096   # new rows between two looks for rows that can go to the output

@dataclass(frozen=True)
class OutputPaths:
    """The files that belong to one output: the table, its manifest, its parts folder and its journal."""

    output: Path

    @property
    def manifest(self) -> Path:
        """NAME.manifest.json beside the output."""
        return self.output.with_suffix(".manifest.json")

    @property
    def parts(self) -> Path:
        """The folder of Parquet parts written during a run."""
        return self.output.with_suffix(".parts")

    @property
    def batches(self) -> Path:
        """The folder of Batch API input files waiting to be uploaded (Batch API mode)."""
        return self.output.with_suffix(".batches")

    @property
    def journal(self) -> Path:
        """NAME.journal.sqlite beside the output."""
        return self.output.with_suffix(".journal.sqlite")

    @property
    def token_counts(self) -> Path:
        """NAME.token_counts.sqlite: exact prompt tokens by request key (``pipeline estimate --exact``)."""
        return self.output.with_suffix(".token_counts.sqlite")


def read_manifest(paths: OutputPaths) -> dict[str, Any] | None:
    """The output's manifest, or None when there is none yet."""
    try:
        return json.loads(paths.manifest.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise OutputError(f"{paths.manifest}: unreadable manifest: {e}") from None


MIN_FREE_BYTES = 64 * 1024 * 1024
BYTES_PER_ROW_FLOOR = 256  # journal + output, the least a row takes; real answers take more


def check_free_space(paths: OutputPaths, rows: int) -> None:
    """Refuse to start when the output's disk clearly cannot hold the run (a floor, not a promise).

    ``rows`` are the requests still to send: what this run adds to the journal and the output."""
    need = MIN_FREE_BYTES + rows * BYTES_PER_ROW_FLOOR
    free = shutil.disk_usage(paths.output.parent).free
    if free < need:
        raise OutputError(f"{paths.output.parent}: only {free / 2**20:,.1f} MiB free; a run keeps "
                          f"{MIN_FREE_BYTES / 2**20:,.0f} MiB free for rewriting the output, plus "
                          f"{BYTES_PER_ROW_FLOOR} bytes for each of the {rows:,} request(s) still to send "
                          f"({need / 2**20:,.1f} MiB in all); free some space first")


def answered_rows(output: Path) -> int:
    """How many rows of an output file were answered (status ok); 0 when it cannot be read."""
    try:
        return int(pl.scan_parquet(output).filter(pl.col("status") == "ok").select(pl.len()).collect().item())
    except (OSError, pl.exceptions.PolarsError):
        return 0


def output_rows(output: Path) -> int | None:
    """The rows of an output file, from its footer (None when there is no readable file)."""
    try:
        return int(pq.ParquetFile(output).metadata.num_rows)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid (not Parquet) is a ValueError
        return None


def claim_output(paths: OutputPaths, job_name: str, fingerprint: str, *, journal_owner: str | None = None) -> None:
    """Refuse an output that belongs to another job (or to no job of ours); check the folder is writable.

    An output whose manifest is gone is still this job's when the journal beside it says so (``journal_owner``,
    the fingerprint it records): the journal is what a resume needs, so the run goes on."""
    try:
        paths.output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{paths.output.parent}: cannot create the output folder: {e.strerror}") from None
    manifest = read_manifest(paths)
    if manifest is not None and manifest.get("fingerprint") != fingerprint:
        owner = manifest.get("job")
        whose = (f"job {owner!r}, not {job_name!r}" if owner != job_name else
                 f"job {owner!r} with another model, endpoint or provider (was {manifest.get('model')!r} on "
                 f"{manifest.get('provider', 'openai')!r})")
        raise OutputError(f"{paths.output}: belongs to {whose}; choose another [output].path or remove the old output")
    if manifest is None and paths.output.exists() and journal_owner != fingerprint:
        journal = (f"its journal {paths.journal.name} belongs to another job" if journal_owner is not None else
                   f"there is no journal of this job beside it ({paths.journal.name})")
        raise OutputError(f"{paths.output}: exists without its manifest ({paths.manifest.name}), and {journal}, so "
                          "nothing says it is this job's output. If it is (its manifest was deleted), restoring the "
                          "journal keeps its answers: the run then resumes from it. Otherwise move the file away or "
                          "choose another [output].path; either way, the rows in it are paid for again")
    if not os.access(paths.output.parent, os.W_OK):
        raise OutputError(f"{paths.output.parent}: the output folder is not writable")


class PartWriter:
    """Collects result rows and writes them as Parquet parts; ``finish`` compacts them into the output."""

    def __init__(self, paths: OutputPaths, key_schema: dict[str, pl.DataType], part_rows: int = PART_ROWS, *,
                 answer_columns: dict[str, pl.DataType] | None = None, checker: Checker | None = None,
                 vectors: bool = False, vector_dims: int | None = None, stage: bool = True) -> None:
        self.paths = paths
        self.vectors, self.vector_dims = vectors, vector_dims
        self.answer_columns = answer_columns or {}
        self.checker = checker
        self.schema: dict[str, pl.DataType] = {ROW: pl.Int64(), **key_schema, **RESULT_SCHEMA,
                                               **self.answer_columns}
        if vectors:  # float32 vectors; a fixed-size array when the size is known up front
            self.schema["embedding"] = (pl.Array(pl.Float32, vector_dims) if vector_dims
                                        else pl.List(pl.Float32))
        self._key_columns = list(key_schema)
        self._cols: dict[str, list[Any]] = {}
        self._result_columns: list[list[Any]] = []
        self._new_buffers()
        self._blocks: list[tuple[list[int], list[tuple[Any, ...]], VectorBlock]] = []  # requests of many rows' vectors
        self._n = 0                          # rows buffered (in _cols, _blocks and _waiting)
        self._waiting: pl.DataFrame | None = None  # rows sorted, but after a gap in the output
        self._next_row = 0                   # rows before this one are in the output file
        self._lowest = math.inf              # the first row buffered: nothing can go out until it is _next_row
        self._since_look = 0
        self._have = bytearray()             # by input position: 1 once the row was added (``missing_rows``)
        self._discarded = False
        self._writer: pq.ParquetWriter | None = None
        self._arrow_schema: Any = None
        self._tmp = paths.output.with_suffix(".parquet.tmp")
        self._part = 0
        self.rows_written = 0
        self.part_rows = part_rows
        if vectors and vector_dims:
            self.part_rows = max(part_rows, PART_VECTOR_BYTES // (4 * vector_dims))
        if not stage:  # a frame builder only (``take``): the Ray engine's commits write their own files
            return
        # A crashed run leaves parts of a table that the journal can rebuild: start clean.
        shutil.rmtree(paths.parts, ignore_errors=True)
        try:
            paths.parts.mkdir(parents=True)
        except OSError as e:
            raise OutputError(f"{paths.parts}: cannot create the parts folder: {e.strerror}") from None

    def add(self, row: int, keys: tuple[Any, ...], outcome: Outcome, *, deduplicated: bool = False) -> None:
        """One input row's result: its position, id and kept values, and its outcome (``deduplicated``: the
        answer of an identical earlier row, whose cost is on that row)."""
        c = self._cols
        c[ROW].append(row)
        if row < self._lowest:
            self._lowest = row
        have = self._have
        if row >= len(have):
            have.extend(bytes(row - len(have) + 4096))
        have[row] = 1
        for name, value in zip(self._key_columns, keys, strict=True):
            c[name].append(value)
        shown = outcome.as_duplicate() if deduplicated else outcome
        for column, value in zip(self._result_columns, output_values(shown), strict=True):
            column.append(value)
        c["deduplicated"].append(deduplicated)
        ok = outcome.status == "ok"
        if self.vectors:
            c["embedding"].append(outcome.embedding if ok else None)
        if self.checker is not None:
            values = self.checker.values(outcome.content, outcome.tool_calls) if ok else self.checker.values(None)
            for name, value in zip(self.answer_columns, values, strict=True):
                c[name].append(value)
        self._added(1)

    def missing_rows(self, total: int) -> np.ndarray:
        """The input positions below ``total`` that no row was added for yet (a stopped run fills them from the
        journal)."""
        have = np.frombuffer(bytes(self._have[:total]), dtype=np.uint8)
        return np.concatenate([np.flatnonzero(have == 0), np.arange(len(have), total)]).astype(np.int64)

    def _new_buffers(self) -> None:
        self._cols = {c: [] for c in self.schema}
        self._result_columns = [self._cols[c] for c in RESULT_SCHEMA if c != "deduplicated"]

    def _added(self, n: int) -> None:
        self._n += n
        self.rows_written += n
        self._since_look += n
        full = self._n >= self.part_rows
        if (full or self._since_look >= STREAM_EVERY) and self._part == 0 and self._lowest == self._next_row:
            self._stream()
        if self._n >= self.part_rows:  # what is still buffered cannot go out yet: it becomes a part
            self.flush()

    def add_block(self, rows: list[int], keys: list[tuple[Any, ...]], block: VectorBlock) -> None:
        """The rows of one request of many rows' vectors at once (all ``ok``), kept as arrays until the part is written:
        one DataFrame per part, not a Python value per cell (nor a DataFrame per request)."""
        self._blocks.append((rows, keys, block))
        self._lowest = min(self._lowest, min(rows))
        top = max(rows)
        if top >= len(self._have):
            self._have.extend(bytes(top - len(self._have) + 4096))
        for r in rows:
            self._have[r] = 1
        self._added(len(rows))

    def _blocks_frame(self) -> pl.DataFrame:
        """The buffered blocks as one frame in the output's schema."""
        blocks, self._blocks = self._blocks, []
        sizes = [len(rows) for rows, _, _ in blocks]
        data: dict[str, Any] = {ROW: [r for rows, _, _ in blocks for r in rows]}
        for i, name in enumerate(self._key_columns):
            data[name] = [k[i] for _, keys, _ in blocks for k in keys]
        data["status"] = ["ok"] * len(data[ROW])
        data["prompt_tokens"] = np.concatenate([b.prompt_tokens for _, _, b in blocks])
        costs = [b.cost_usd for _, _, b in blocks]
        data["cost_usd"] = None if any(c is None for c in costs) else np.concatenate(costs)  # type: ignore[arg-type]
        for name in ("cached_tokens", "completion_tokens", "reasoning_tokens", "cache_write_tokens"):
            data[name] = np.zeros(len(data[ROW]), dtype=np.int64)
        data["latency_ms"] = np.repeat([b.latency_ms for _, _, b in blocks], sizes)
        data["attempts"] = np.repeat([b.attempts for _, _, b in blocks], sizes)
        data["model"] = [b.model for _, _, b in blocks for _ in range(len(b.keys))]
        data["deduplicated"] = np.zeros(len(data[ROW]), dtype=bool)
        vectors = np.concatenate([b.vectors for _, _, b in blocks])
        # Unknown size up front: a list column, built from the fixed-size block (polars reads a 2-D array as one).
        data["embedding"] = (vectors if self.vector_dims else
                             pl.Series(vectors, dtype=pl.Array(pl.Float32, vectors.shape[1])).cast(pl.List(pl.Float32)))
        n = len(data[ROW])
        return pl.DataFrame([pl.Series(name, data[name] if data.get(name) is not None else [None] * n, dtype=dtype)
                             for name, dtype in self.schema.items()])

    def _buffered(self) -> pl.DataFrame:
        """The rows buffered since the last part, as one frame sorted by ROW (the buffers are emptied)."""
        frames = [self._waiting] if self._waiting is not None else []
        self._waiting = None
        if self._blocks:
            frames.append(self._blocks_frame())
        if self._cols[ROW]:
            if self.vectors:
                vectors = self._cols.pop("embedding")
                schema = {k: v for k, v in self.schema.items() if k != "embedding"}
                frames.append(pl.DataFrame(self._cols, schema=schema, strict=False)
                              .with_columns(self._vectors(vectors)))
            else:
                frames.append(pl.DataFrame(self._cols, schema=self.schema, strict=False))
        self._new_buffers()
        self._n = 0
        self._lowest = math.inf
        if not frames:
            return pl.DataFrame(schema=self.schema)
        return (frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical", rechunk=False)).sort(ROW)

    def take(self) -> pl.DataFrame:
        """The rows added so far as one frame in the output's schema, sorted by input position (with ``__row``);
        the buffers are emptied."""
        return self._buffered()

    def arrow_table(self, df: pl.DataFrame) -> Any:
        """A frame of ``take`` as the output file's Arrow table (without ``__row``)."""
        if self._arrow_schema is None:
            self._arrow_schema = pl.DataFrame(schema=self.schema).drop(ROW).to_arrow().schema
        table = df.drop(ROW).to_arrow()
        return table if table.schema.equals(self._arrow_schema) else table.cast(self._arrow_schema)

    def _stream(self) -> None:
        """Append the buffered rows that continue the output without a gap, in whole row groups; the rest
        waits (sorted) for the rows before it."""
        self._since_look = 0
        df = self._buffered()
        rows = df.get_column(ROW).to_numpy()
        # Rows are unique and sorted, so they continue the file exactly while rows[i] == next_row + i.
        breaks = np.flatnonzero(rows - np.arange(len(rows)) != self._next_row)
        ready = (int(breaks[0]) if len(breaks) else len(rows)) // COMPACT_ROWS * COMPACT_ROWS
        for lo in range(0, ready, COMPACT_ROWS):
            self._write(df.slice(lo, COMPACT_ROWS))
        self._next_row += ready
        self._n = df.height - ready
        self._waiting = df.slice(ready) if self._n else None
        self._lowest = int(rows[ready]) if self._n else math.inf

    def flush(self) -> None:
        """Write the buffered rows as one part (to a temporary name, then renamed: no half-written parts)."""
        if not self._n:
            return
        df = self._buffered()  # all after the rows already in the output: each row is added once
        self._part += 1
        final = self.paths.parts / f"part-{self._part:06d}.parquet"
        tmp = final.with_suffix(".tmp")
        try:
            # Sorted, with statistics and small row groups, so compaction can read one row range at a time;
            # lz4 because parts are read once and deleted (none with vectors: floats do not compress).
            df.write_parquet(tmp, compression="uncompressed" if self.vectors else "lz4",
                             statistics=True, row_group_size=PART_GROUP_ROWS)
            tmp.replace(final)
        except OSError as e:
            raise OutputError(f"{final}: cannot write output: {e.strerror}") from None

    def _vectors(self, raw: list[bytes | None]) -> pl.Series:
        """Float32 bytes to a vector column in one numpy step, not a Python float per element."""
        dims = self.vector_dims
        if dims:
            arr = np.zeros((len(raw), dims), dtype=np.float32)
            for i, b in enumerate(raw):
                if b is not None:
                    arr[i] = np.frombuffer(b, dtype="<f4")
            series = pl.Series("embedding", arr, dtype=pl.Array(pl.Float32, dims))
            if any(b is None for b in raw):  # rows without a vector get null, not zeros
                present = pl.Series([b is not None for b in raw])
                series = pl.select(pl.when(present).then(series).otherwise(None)).to_series()
            return series
        # polars cannot mix numpy arrays and None in one list column: rows without a vector stay Python None
        return pl.Series("embedding", [None if b is None else np.frombuffer(b, dtype="<f4").tolist() for b in raw],
                         dtype=pl.List(pl.Float32))

    def _write(self, df: pl.DataFrame) -> None:
        """Append rows (sorted, after every row written so far) to the output as one row group."""
        if self._writer is None:
            self._open()
        assert self._writer is not None
        if df.height:
            table = df.drop(ROW).to_arrow()
            # cast only when needed: Table.cast imports pyarrow.compute, a tenth of a second per run
            try:
                self._writer.write_table(table if table.schema.equals(self._arrow_schema)
                                         else table.cast(self._arrow_schema))
                # what Arrow's pool took for the row group goes back to the system (a library caller's process
                # keeps Arrow's mimalloc, which holds it otherwise: map's peak 352 MiB, 341 with this, against the
                # command's 282-290 MiB; bench/frames.py)
                pa.default_memory_pool().release_unused()
            except OSError as e:
                raise OutputError(f"{self.paths.output}: cannot write output: {e.strerror}") from None

    def _open(self) -> None:
        self._arrow_schema = pl.DataFrame(schema=self.schema).drop(ROW).to_arrow().schema
        # zstd at level 1: nearly the ratio of the default on text. Float vectors are stored plain: no
        # dictionary (one never pays off on floats), no min/max statistics (no reader prunes on a vector element;
        # computing them took 40% of the write) and no compression. Measured on 100,000 x 256 vectors: zstd made
        # the file 9% smaller and the write twice as long; byte-stream-split + zstd 17% smaller, 3.3x as long
        # (bench/embed.py times the write).
        options: dict[str, Any] = {"compression": "zstd", "compression_level": 1}
        if self.vectors:
            columns = _leaf_columns(self._arrow_schema)
            scalars = [c for c in columns if not c.startswith("embedding.")]
            options = {"use_dictionary": scalars, "write_statistics": scalars,
                       "compression": {c: "zstd" if c in scalars else "none" for c in columns},
                       "compression_level": dict.fromkeys(scalars, 1)}
        try:
            self._writer = pq.ParquetWriter(self._tmp, self._arrow_schema, **options)
        except OSError as e:
            raise OutputError(f"{self.paths.output}: cannot write output: {e.strerror}") from None

    def _merge(self, parts: list[Path]) -> None:
        """Write the parts in input order, one row range at a time: memory stays flat however many rows.

        A global sort would hold the whole table; instead each range is read with the parts' row-group
        statistics (so only the groups that hold it are read), sorted, and appended as a row group. Every
        row in the parts comes after the rows already streamed to the output.
        """
        lf = pl.scan_parquet(parts)
        top = lf.select(pl.col(ROW).max()).collect().item()
        for lo in range(self._next_row, int(top) + 1, COMPACT_ROWS):
            self._write(lf.filter(pl.col(ROW).is_between(lo, lo + COMPACT_ROWS - 1)).collect().sort(ROW))

    @property
    def discarded(self) -> bool:
        """Whether ``discard`` gave up this run's output."""
        return self._discarded

    def discard(self) -> None:
        """Give up this run's output: its temporary file and parts are deleted (freeing their disk); the output
        file from before, if any, stays as it was, and ``finish`` writes nothing."""
        self._discarded = True
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        self._tmp.unlink(missing_ok=True)
        shutil.rmtree(self.paths.parts, ignore_errors=True)

    def finish(self, *, never_smaller: bool = False) -> int:
        """Write what is left and close the output file; returns the number of rows in the output.

        Without parts the buffered rows go straight to the output; otherwise they become a last part and the
        parts are merged. ``never_smaller`` (a run that did not end well): an existing output with more rows is
        kept as it is rather than replaced (its answers are in the journal too, and a rerun writes them all).
        """
        if self._discarded:
            return output_rows(self.paths.output) or 0
        if self._part == 0:
            df = self._buffered()
            for lo in range(0, df.height, COMPACT_ROWS):
                self._write(df.slice(lo, COMPACT_ROWS))
        else:
            self.flush()
            self._merge(sorted(self.paths.parts.glob("part-*.parquet")))
        if self._writer is None:
            self._open()  # no rows at all: an empty table with the output's columns
        assert self._writer is not None
        try:
            self._writer.close()
            before = output_rows(self.paths.output) if never_smaller else None
            if before is not None and before > self.rows_written:
                self._tmp.unlink()
                shutil.rmtree(self.paths.parts, ignore_errors=True)
                return before
            self._tmp.replace(self.paths.output)
        except OSError as e:
            raise OutputError(f"{self.paths.output}: cannot write output: {e.strerror}") from None
        shutil.rmtree(self.paths.parts, ignore_errors=True)
        return self.rows_written


def _leaf_columns(schema: Any) -> list[str]:
    """Parquet's dotted leaf column paths of an Arrow schema (what per-column writer options name)."""
    import pyarrow as pa

    buf = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_batches([], schema=schema), buf)
    meta = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    return [meta.column(i).path for i in range(len(meta))]


def write_manifest(paths: OutputPaths, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically; it never contains the API key (nothing here ever holds it)."""
    tmp = paths.manifest.with_suffix(".json.tmp")
    try:
        tmp.write_text(json.dumps(manifest, indent=2, default=str, sort_keys=False))
        tmp.replace(paths.manifest)
    except OSError as e:
        raise OutputError(f"{paths.manifest}: cannot write the manifest: {e.strerror}") from None


def move_aside(path: Path, stamp: str | None = None) -> Path | None:
    """Rename a file or folder to NAME.STAMP.SUFFIX beside it (``--fresh`` keeps what it sets aside; None when
    there is nothing there), with its SQLite sidecars."""
    if not path.exists():
        return None
    stamp = stamp or datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while aside.exists():  # never overwrite an older journal set aside in the same second
        aside = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    path.replace(aside)
    for extra in ("-wal", "-shm"):
        sidecar = Path(str(path) + extra)
        if sidecar.exists():
            sidecar.replace(Path(str(aside) + extra))
    return aside
