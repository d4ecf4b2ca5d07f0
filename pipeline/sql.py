"""The SQL door: ``SELECT id, llm(text) FROM reviews`` in DuckDB, through the same engine, limits, journal and cost
accounting as ``pipeline.map``.

Shape: a vectorised Arrow UDF. DuckDB hands it a column of up to 2,048 values at a time, and each such call is one
``map`` of those rows, so they are all in flight together under the job's concurrency and limits (a scalar UDF
would send one request per call, one at a time). Every call shares one work folder, so the journal spans the
whole query: an identical question is sent once, and running the query again pays only for rows not answered
yet. DuckDB may call the function from several threads; the calls take turns (one run per work folder at a time).
The price is one short run per 2,048 rows (the estimate pass, the journal's check): measured in
``bench/frames.py``. For a whole table at once, ``map_query`` is the other shape: the query's result is one
``map`` (one run, every row in flight under the limits), returned as a DuckDB relation to query on.

DuckDB is not a dependency of the package: ``pip install duckdb`` to use this.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import UsageError


def register(connection: Any, name: str = "llm", *, answer: str = "content", workdir: str | Path | None = None,
             base_url: str | None = None, **keys: Any) -> None:
    """Add ``name(text)`` to a DuckDB connection: the model's answer to the job's prompt for each value.

    The prompt (``prompt=``, default ``"{{ text }}"``) reads the argument as ``text``; the other keywords are
    ``map``'s (``model=``, ``system=``, ``max_tokens=``, ``schema=``, limits, budget...). ``answer`` is the column
    returned: ``content`` (with a schema, the answer's JSON), or one typed field of the schema. A row that failed
    gives NULL; its error is in the work folder's output (``pipeline show``)."""
    from pipeline.frames import map as map_frame

    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise UsageError("the SQL door needs pyarrow") from None
    keys.setdefault("prompt", "{{ text }}")
    keys.setdefault("progress", False)  # one run per 2,048 rows: a progress line each would be noise
    turn = threading.Lock()

    def call(values: Any) -> Any:
        frame = pl.DataFrame({"text": pl.Series("text", values.to_pylist(), dtype=pl.String)})
        with turn:
            out = map_frame(frame, workdir=workdir, base_url=base_url, name=name, **keys)
        if answer not in out.columns:
            raise UsageError(f"{name}(): answer={answer!r} is not a column of the answers "
                             f"({', '.join(c for c in out.columns if c != 'text')})")
        return pa.array(out.get_column(answer).cast(pl.String).to_list(), type=pa.string())

    connection.create_function(name, call, ["VARCHAR"], "VARCHAR", type="arrow", null_handling="special",
                               side_effects=True)


def map_query(connection: Any, query: str, *, workdir: str | Path | None = None, base_url: str | None = None,
              **keys: Any) -> Any:
    """The rows of ``query`` with the answers as new columns, as a DuckDB relation: one ``map`` of the whole
    result (the prompt reads the query's columns by name), so it runs as one job rather than one per 2,048 rows.
    ``SELECT ... FROM`` the relation, or ``.create("table")`` it."""
    from pipeline.frames import map as map_frame

    frame = connection.sql(query).pl()
    out = map_frame(frame, workdir=workdir, base_url=base_url, **keys)
    return connection.from_arrow(out.to_arrow())
