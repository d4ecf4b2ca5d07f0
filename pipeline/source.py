"""Input readers: Parquet, CSV and JSONL files (or a glob of one kind) streamed as polars chunks.

Inputs are scanned lazily and pulled through polars' streaming engine one chunk at a time, so memory stays
flat however large the input. Only the columns the job uses are read. Every polars failure becomes an
InputError naming the file, because a polars traceback tells a user nothing about what to fix.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError
from pipeline.storage import is_url, list_files, local_copy, open_input

ROW = "__row"  # the input position of a row; the default id, and the output order
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
DEFAULT_CHUNK_ROWS = 5_000  # rendered requests of a chunk live at once: keep that transient small


@dataclass(frozen=True)
class Source:
    """An opened input: its files, format and schema, checked before anything is sent."""

    pattern: str
    files: tuple[str, ...]
    format: str
    schema: dict[str, pl.DataType]
    endpoint_url: str | None = None  # object storage: the S3-compatible endpoint, if not AWS's
    origins: tuple[str, ...] = ()    # CSV/JSONL objects: their addresses (``files`` are the local copies)

    def origin(self, i: int) -> str:
        """Where the i-th file really lives (its address on object storage, or the local path)."""
        return self.origins[i] if self.origins else self.files[i]

    @property
    def remote(self) -> bool:
        """Whether the files are read in place on object storage (Parquet objects)."""
        return any(is_url(f) for f in self.files)

    @property
    def columns(self) -> list[str]:
        """The input's column names, in order."""
        return list(self.schema)


def open_source(pattern: str, endpoint_url: str | None = None) -> Source:
    """Find the input's files and read their schema; fails with the file named, before any row is read.

    On object storage, Parquet objects are read in place (footers and row groups, by ranged reads); a CSV or
    JSONL object is copied to the local cache first, since its reader needs a local file to stream from.
    """
    remote = is_url(pattern)
    if remote:
        matches = list_files(pattern, endpoint_url)
        files = tuple(matches)
    else:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        files = tuple(f for f in matches if Path(f).is_file())
    if not files:
        what = "no file matches the glob" if glob.has_magic(pattern) else "input file not found"
        raise InputError(f"{pattern}: {what}")
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in FORMATS)
        raise InputError(f"{bad}: unsupported input format {Path(bad).suffix!r} (use .parquet, .csv or .jsonl)")
    if len(kinds) > 1:
        raise InputError(f"{pattern}: the glob mixes formats ({', '.join(sorted(k for k in kinds if k))}); "
                         "use one format per job")
    fmt = kinds.pop()
    assert fmt is not None
    origins: tuple[str, ...] = ()
    if remote and fmt != "parquet":
        origins, files = files, tuple(local_copy(f, endpoint_url) for f in files)
    schema: dict[str, pl.DataType] | None = None
    for f in files:
        try:
            s = _remote_schema(f, endpoint_url) if is_url(f) else dict(scan_files([f], fmt).collect_schema())
        except Exception as e:  # polars raises several unrelated types for unreadable files
            where = _find_bad_jsonl_line([f]) if fmt == "jsonl" and not is_url(f) else None
            raise InputError(where or f"{f}: cannot read {fmt} input: {_polars_reason(e)}") from None
        if schema is None:
            schema = s
        elif set(s) != set(schema):
            raise InputError(f"{f}: columns differ from {files[0]} "
                             f"({sorted(set(s) ^ set(schema))}); all files of a glob need the same columns")
    assert schema is not None
    return Source(pattern=pattern, files=files, format=fmt, schema=schema, endpoint_url=endpoint_url,
                  origins=origins)


def _remote_schema(url: str, endpoint_url: str | None) -> dict[str, pl.DataType]:
    """A Parquet object's schema as polars sees it, from its footer alone."""
    import pyarrow.parquet as pq

    arrow = pq.read_schema(open_input(url, endpoint_url))
    frame = pl.from_arrow(arrow.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return dict(frame.schema)


def parquet_file(source: Source, f: str) -> Any:
    """A ``pq.ParquetFile`` of one of the source's files, local or on object storage."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(open_input(f, source.endpoint_url) if is_url(f) else f)


def scan_files(files: Sequence[str], fmt: str) -> pl.LazyFrame:
    """The files of one format as a lazy frame, read the way every input is read."""
    if fmt == "parquet":
        return pl.scan_parquet(list(files))
    if fmt == "csv":
        return pl.scan_csv(list(files), infer_schema_length=10_000)
    return pl.scan_ndjson(list(files), infer_schema_length=10_000)


def _polars_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    reason = text[0] if text else type(e).__name__
    return reason[:300]


def check_columns(source: Source, needed: Sequence[str], what: str) -> None:
    """Fail with the missing and available columns when ``needed`` names a column the input lacks."""
    missing = [c for c in needed if c not in source.schema]
    if missing:
        raise InputError(f"{source.pattern}: {what} names column(s) the input lacks: {', '.join(missing)} "
                         f"(available: {', '.join(source.columns)})")


def iter_chunks(source: Source, columns: Sequence[str], *, chunk_rows: int = DEFAULT_CHUNK_ROWS,
                limit: int | None = None, rows: Sequence[int] | None = None,
                except_rows: Sequence[int] | None = None) -> Iterator[pl.DataFrame]:
    """Stream the input as DataFrames of ``columns`` plus ``__row`` (the row's input position).

    ``rows`` keeps only those positions, ``except_rows`` drops them (a resume sends the unanswered rows first).

    Raises InputError for an empty input or for data polars cannot parse (a ragged CSV row, a corrupt page).
    """
    wanted = [ROW, *dict.fromkeys(columns)]
    if source.format == "parquet" and (source.remote or _parquet_rows(source) >= PYARROW_FROM_ROWS):
        yield from _parquet_chunks(source, wanted, chunk_rows=chunk_rows, limit=limit, rows=rows,
                                   except_rows=except_rows)
        return
    lf = scan_files(source.files, source.format)
    # A CSV reader that reads only some columns does not notice a ragged row, and would silently shift data:
    # read every column of a CSV and select afterwards.
    project_late = source.format == "csv"
    if not project_late:
        lf = lf.select(wanted[1:])
    lf = lf.with_row_index(ROW)
    if limit is not None:
        lf = lf.head(limit)
    if rows is not None:
        lf = lf.filter(pl.col(ROW).is_in(pl.Series(rows, dtype=pl.UInt32).implode()))
    if except_rows is not None and len(except_rows):
        lf = lf.filter(~pl.col(ROW).is_in(pl.Series(except_rows, dtype=pl.UInt32).implode()))
    seen = 0
    try:
        for chunk in lf.collect_batches(chunk_size=chunk_rows, lazy=True):
            if chunk.height:
                seen += chunk.height
                yield chunk.select(wanted) if project_late else chunk
    except pl.exceptions.PolarsError as e:
        where = (_find_ragged_csv_row(source) if source.format == "csv" else
                 _find_bad_jsonl_line(source.files) if source.format == "jsonl" else None)
        raise InputError(where or f"{source.pattern}: cannot read {source.format} input after row {seen}: "
                                  f"{_polars_reason(e)}") from None
    if seen == 0 and rows is None and except_rows is None:
        raise InputError(f"{source.pattern}: the input has no rows")


# Below this, polars' reader is lighter (pyarrow's pool and modules: +19 MiB at 20k; bench/throughput.py)
PYARROW_FROM_ROWS = 250_000


def _parquet_rows(source: Source) -> int:
    """Rows of a Parquet input, from the footers alone."""
    try:
        return int(pl.scan_parquet(list(source.files)).select(pl.len()).collect().item())
    except pl.exceptions.PolarsError:
        return 0  # the polars path then reports what is wrong with the file


def _parquet_chunks(source: Source, wanted: list[str], *, chunk_rows: int, limit: int | None,
                    rows: Sequence[int] | None, except_rows: Sequence[int] | None) -> Iterator[pl.DataFrame]:
    """Large Parquet inputs through pyarrow's batch reader, a row group's pages at a time: polars' streaming
    engine held ~100 MB more for a 1M-row file (measured 269 against 217 MiB peak), which an estimate feels
    (bench/estimate.py).

    Positions count across the files in order; ``rows`` / ``except_rows`` (sorted, as a plan makes them) keep
    or drop positions, and what is kept is gathered into chunks of ``chunk_rows``.
    """
    import numpy as np

    schema = {c: source.schema[c] for c in wanted[1:]}
    picked = None if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    dropped = None if except_rows is None or not len(except_rows) else np.sort(np.asarray(except_rows, np.int64))
    start, total, held, held_rows = 0, 0, [], 0
    for f in source.files:
        try:
            batches = parquet_file(source, f).iter_batches(batch_size=chunk_rows, columns=wanted[1:])
            for batch in batches:
                if limit is not None and start >= limit:
                    break
                df = pl.from_arrow(batch)
                assert isinstance(df, pl.DataFrame)
                if df.schema != schema:
                    df = df.cast(dict(schema))  # type: ignore[arg-type]  # polars' Mapping is invariant  # the types the job was checked against (polars' view of the file)
                end = start + df.height
                df = df.with_columns(pl.int_range(start, end, dtype=pl.UInt32).alias(ROW)).select(wanted)
                if limit is not None and end > limit:
                    df, end = df.head(limit - start), limit
                for sel, keep in ((picked, True), (dropped, False)):
                    if sel is not None:
                        at = sel[np.searchsorted(sel, start):np.searchsorted(sel, end)] - start
                        mask = np.zeros(df.height, dtype=bool)
                        mask[at] = True
                        df = df.filter(pl.Series(mask if keep else ~mask))
                total += end - start
                start = end
                if df.height:
                    held.append(df)
                    held_rows += df.height
                if held_rows >= chunk_rows:
                    yield pl.concat(held) if len(held) > 1 else held[0]
                    held, held_rows = [], 0
        except (OSError, ValueError, pl.exceptions.PolarsError) as e:  # pyarrow's errors are OSError/ValueError
            raise InputError(f"{f}: cannot read parquet input after row {start}: {_polars_reason(e)}") from None
    if held:
        yield pl.concat(held) if len(held) > 1 else held[0]
    if total == 0 and rows is None and except_rows is None:
        raise InputError(f"{source.pattern}: the input has no rows")


def _find_bad_jsonl_line(files: Sequence[str]) -> str | None:
    """Polars does not say which JSONL line it could not parse; find it, since that is what the user fixes."""
    import orjson

    for f in files:
        with open(f, "rb") as fh:
            for n, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    value = orjson.loads(line)
                except orjson.JSONDecodeError as e:
                    return f"{f}: line {n} is not valid JSON ({e})"
                if not isinstance(value, dict):
                    return f"{f}: line {n} is not a JSON object (each line must be one record)"
    return None


def _find_ragged_csv_row(source: Source) -> str | None:
    """Polars does not say which line is ragged; find it, since that is what the user has to fix."""
    import csv

    for f in source.files:
        with open(f, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                continue
            for record in reader:
                if record and len(record) != len(header):
                    return (f"{f}: line {reader.line_num} has {len(record)} fields but the header has "
                            f"{len(header)}")
    return None


def read_head(source: Source, columns: Sequence[str], n: int) -> pl.DataFrame:
    """The first ``n`` rows, for ``validate`` to render."""
    for chunk in iter_chunks(source, columns, chunk_rows=max(n, 1), limit=n):
        return chunk
    raise InputError(f"{source.pattern}: the input has no rows")  # pragma: no cover - iter_chunks raises


def input_warnings(source: Source, id_column: str | None) -> list[str]:
    """What the input holds that a run would take as it is but a user would not expect: duplicate or null ids
    (rows that cannot be told apart in the output) and repeated CSV header names (polars renames all but the
    first, so a template naming one reads the first). Reads the id column once: for ``validate``, not runs."""
    warnings: list[str] = []
    if source.format == "csv":
        import csv

        for f in source.files:
            try:
                with open(f, newline="", encoding="utf-8", errors="replace") as fh:
                    header = next(csv.reader(fh), [])
            except OSError:
                continue
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                warnings.append(f"{f}: the header repeats column name(s) {', '.join(map(repr, repeated))}; "
                                "only the first of each is read under that name (rename the others)")
    if id_column is not None and id_column in source.schema and not source.remote:
        counts = scan_files(source.files, source.format).select(
            pl.col(id_column).null_count().alias("nulls"), pl.len().alias("rows"),
            pl.col(id_column).drop_nulls().n_unique().alias("unique"),
            (pl.len() - pl.col(id_column).null_count()).alias("present")).collect().row(0, named=True)
        if counts["nulls"]:
            warnings.append(f"{source.pattern}: {counts['nulls']:,} row(s) have a null [input].id "
                            f"({id_column!r}); the output cannot tell them apart by id")
        if counts["unique"] < counts["present"]:
            warnings.append(f"{source.pattern}: [input].id ({id_column!r}) repeats: {counts['present']:,} ids, "
                            f"{counts['unique']:,} distinct; the output will hold several rows with one id")
    return warnings
