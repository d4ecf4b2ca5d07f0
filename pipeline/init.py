"""``pipeline init DATA``: a commented job file for a table, so a first job starts from the real columns.

The skeleton lists every column with its type and a sample value, guesses the id (a column named ``id`` or ending
in ``_id`` whose values are unique), keeps it, and writes a prompt that names the text columns, each in the
syntax its name needs (``{{ name }}`` or ``{{ row["odd name"] }}``). It validates as written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl

from pipeline.errors import OutputError
from pipeline.source import iter_chunks, open_source

SAMPLE_ROWS = 1000


def _reference(column: str) -> str:
    """How a template names a column."""
    return f"{{{{ {column} }}}}" if column.isidentifier() else f"{{{{ row['{column}'] }}}}"


def skeleton(data: str | Path, job_path: str | Path) -> str:
    """The job file's text for ``data``, with paths relative to where the job will be written."""
    source = open_source(str(data))
    head = next(iter_chunks(source, source.columns, chunk_rows=SAMPLE_ROWS, limit=SAMPLE_ROWS)).drop("__row")
    folder = Path(job_path).resolve().parent
    rel = os.path.relpath(Path(data).resolve(), folder)
    name = Path(data).stem.replace(" ", "-")
    ids = [c for c in head.columns if (c.lower() == "id" or c.lower().endswith("_id"))
           and head.get_column(c).null_count() == 0 and head.get_column(c).n_unique() == head.height]
    texts = [c for c, t in head.schema.items() if t == pl.String and c not in ids]
    lines = [f"# A job for {data}: edit the prompt and the model, then `pipeline validate` and `pipeline estimate`.",
             "# Columns (type: first value):"]
    for c, t in head.schema.items():
        first = head.get_column(c)[0] if head.height else None
        shown = json.dumps(first if isinstance(first, str | int | float | bool) or first is None else str(first))
        lines.append(f"#   {c} ({t}): {shown[:70]}")
    prompt = "\\n\\n".join(f"{c}: {_reference(c)}" for c in texts) or "Describe this row."
    lines += ["", f'name = "{name}"', "", "[input]", f"path = {json.dumps(rel)}"]
    if ids:
        lines += [f"id = {json.dumps(ids[0])}", "# keep = [...]                   # input columns copied to the output"]
    else:
        lines.append('# id = "..."                     # a unique column; without one, the row number is the id')
    lines += ["# skip_nulls = true               # skip rows with a null in a column the prompt reads", "",
              "[request]", 'model = "gpt-4o-mini"', 'system = "You are a careful analyst. Answer in one sentence."',
              f'prompt = "{prompt}"', "max_tokens = 200",
              "# [request.response_schema]      # JSON Schema: one typed output column per property", "",
              "[output]", f'path = "out/{name}.parquet"', "",
              "[limits]                           # your account's limits: the run stays under them",
              "concurrency = 32", "# requests_per_minute = 500", "# tokens_per_minute = 200_000", "",
              "# [budget]", "# max_cost_usd = 5.0               # ask before starting above it, stop before it", ""]
    return "\n".join(lines)


def write_skeleton(data: str | Path, job_path: str | Path) -> Path:
    """Write the skeleton to ``job_path``; never over an existing file."""
    path = Path(job_path)
    if path.exists():
        raise OutputError(f"{path}: exists; choose another name with --out")
    text = skeleton(data, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
