"""The input cut into partitions, planned from listings and Parquet footers; and a partition's rows, read back.

The driver plans and the tasks read: no row passes through the driver. A Parquet file is cut at row-group
boundaries (whole groups, up to about ``partition_rows``), since a row group is the unit a reader fetches; a
CSV or JSONL file is one partition (its rows are counted by streaming it once, to number the next file's rows as
the local engine does). A partition's id hashes the job's fingerprint, the file, its size and modification
stamp, and the row range: the same input planned again gives the same ids (a rerun skips what is finished),
and a file that changed gives new ones.

Rows are numbered across the files in order, as the local engine numbers them, so both engines give the same
``row`` for the same input row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from pipeline.errors import InputError
from pipeline.source import ROW, Source, iter_chunks, parquet_file
from pipeline.storage import is_url, size_and_tag


@dataclass(frozen=True)
class Partition:
    """A slice of the input one task runs: a file's row groups (Parquet) or a whole file (CSV, JSONL)."""

    id: str
    file: str
    row_start: int                       # the input position of its first row (across every file)
    rows: int
    row_groups: tuple[int, ...] | None   # Parquet: the row groups; None: the whole file

    @property
    def row_end(self) -> int:
        """One past its last input position."""
        return self.row_start + self.rows


def _stamp(source: Source, f: str) -> tuple[int, str]:
    if is_url(f):
        return size_and_tag(f, source.endpoint_url)
    st = os.stat(f)
    return st.st_size, str(st.st_mtime_ns)


def partition_id(fingerprint: str, f: str, size: int, tag: str, row_start: int, rows: int) -> str:
    """The deterministic id of a partition (what the driver's journal and the committed chunks are keyed by)."""
    text = "\0".join((fingerprint, f, str(size), tag, str(row_start), str(rows)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_partitions(source: Source, fingerprint: str, partition_rows: int) -> list[Partition]:
    """Every partition of the input, in row order."""
    parts: list[Partition] = []
    start = 0
    for i, local in enumerate(source.files):
        f = source.origin(i)  # a partition names where the file lives: a task elsewhere reads it from there
        size, tag = _stamp(source, f)
        if source.format == "parquet":
            try:
                meta = parquet_file(source, f).metadata
            except (OSError, ValueError) as e:
                raise InputError(f"{f}: cannot read the Parquet footer: {e}") from None
            groups: list[int] = []
            held = 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                held += meta.row_group(g).num_rows
                if held >= partition_rows or g == meta.num_row_groups - 1:
                    parts.append(Partition(partition_id(fingerprint, f, size, tag, start, held), f, start, held,
                                           tuple(groups)))
                    start += held
                    groups, held = [], 0
        else:
            one = Source(pattern=local, files=(local,), format=source.format, schema=source.schema)
            rows = sum(c.height for c in iter_chunks(one, [next(iter(source.schema))], chunk_rows=100_000))
            parts.append(Partition(partition_id(fingerprint, f, size, tag, start, rows), f, start, rows, None))
            start += rows
    return [p for p in parts if p.rows]


def iter_partition(source: Source, part: Partition, columns: Sequence[str], *, chunk_rows: int,
                   skip: Sequence[tuple[int, int]] = ()) -> Iterator[pl.DataFrame]:
    """The partition's rows as the renderer takes them (``columns`` plus ``__row``), less the ``skip`` ranges
    (input positions ``[lo, hi)`` already committed)."""
    wanted = [ROW, *dict.fromkeys(columns)]
    if part.row_groups is not None:
        frames = _parquet_groups(source, part, wanted, chunk_rows)
    else:
        one = Source(pattern=part.file, files=(part.file,), format=source.format, schema=source.schema)
        frames = (c.with_columns((pl.col(ROW) + part.row_start).cast(pl.UInt32))
                  for c in iter_chunks(one, columns, chunk_rows=chunk_rows))
    for df in frames:
        if skip:
            rows = df.get_column(ROW).to_numpy()
            keep = np.ones(len(rows), dtype=bool)
            for lo, hi in skip:
                keep &= (rows < lo) | (rows >= hi)
            if not keep.all():
                df = df.filter(pl.Series(keep))
        if df.height:
            yield df


def _parquet_groups(source: Source, part: Partition, wanted: list[str], chunk_rows: int) -> Iterator[pl.DataFrame]:
    schema = {c: source.schema[c] for c in wanted[1:]}
    start = part.row_start
    assert part.row_groups is not None
    try:
        for batch in parquet_file(source, part.file).iter_batches(batch_size=chunk_rows, row_groups=part.row_groups,
                                                                  columns=wanted[1:]):
            df = pl.from_arrow(batch)
            assert isinstance(df, pl.DataFrame)
            if df.schema != schema:
                df = df.cast(dict(schema))  # type: ignore[arg-type]  # polars' Mapping is invariant
            end = start + df.height
            yield df.with_columns(pl.int_range(start, end, dtype=pl.UInt32).alias(ROW)).select(wanted)
            start = end
    except (OSError, ValueError, pl.exceptions.PolarsError) as e:
        raise InputError(f"{part.file}: cannot read parquet input after row {start}: {e}") from None
