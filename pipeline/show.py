"""``pipeline show``: some rows of an output beside the inputs they came from, for reading the answers.

The output holds the id, the kept columns and the answers; the columns the prompt read are in the input. The
manifest names the job file, so the input's template columns are joined back by id (or by row number when the
job has no id) where the job file and its input can still be read; otherwise the output alone is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import OutputError, PipelineError, UsageError
from pipeline.outcome import RESULT_SCHEMA
from pipeline.sink import OutputPaths, read_manifest

# Result columns worth reading beside an answer; the rest (tokens, latency, ...) are for `pipeline report`.
SHOWN_RESULTS = ("status", "error_type", "error")


@dataclass(frozen=True)
class Shown:
    """Rows to print: which columns are inputs, which are answers."""

    rows: pl.DataFrame
    id_column: str
    input_columns: list[str]
    answer_columns: list[str]
    total: int  # rows matching the filter


def show_rows(output: str | Path, *, rows: int = 10, where: str | None = None, seed: int | None = None) -> Shown:
    """``rows`` rows of ``output`` (the first, or random ones with ``seed``), filtered by a SQL ``where``."""
    path = Path(output)
    try:
        df = pl.read_parquet(path)
    except FileNotFoundError:
        raise OutputError(f"{path}: no such output file") from None
    except (OSError, pl.exceptions.PolarsError) as e:
        raise OutputError(f"{path}: cannot read the output: {e}") from None
    if where:
        try:
            df = df.filter(pl.sql_expr(where))
        except (pl.exceptions.PolarsError, ValueError) as e:
            raise UsageError(f"--where {where!r}: {str(e).splitlines()[0]}") from None
    total = df.height
    df = df.sample(min(rows, total), seed=seed) if seed is not None else df.head(rows)
    manifest = read_manifest(OutputPaths(path)) or {}
    # The output's columns: the id and the kept columns, the result columns, then the typed answer columns.
    first_result = next((i for i, c in enumerate(df.columns) if c in RESULT_SCHEMA), len(df.columns))
    kept = df.columns[:first_result]
    id_column = kept[0] if kept else "row"
    answers = [c for c in df.columns[first_result:] if c not in RESULT_SCHEMA]
    if "content" in df.columns and not answers:
        answers = ["content"]
    if "rounds" in df.columns and "content" in df.columns and df.get_column("content").null_count() < df.height:
        answers.insert(0, "content")  # a reduce's table: the fold's answer, then its items, rounds and requests
    if "tool_calls" in answers and len(answers) > 1:  # the raw calls, when their arguments have columns already
        answers.remove("tool_calls")
    if "embedding" in df.columns:
        answers = [c for c in answers if c != "embedding"] + ["embedding"]
    # Nothing to read in a hash, nor in a column no row has (the revised prompts of a model that makes none).
    answers = [c for c in answers if c != "image_sha256" and df.get_column(c).null_count() < df.height]
    if df.schema.get("image_path") == pl.String:  # shorter, and still a path the user can open from here
        df = df.with_columns(pl.col("image_path").map_elements(_near, return_dtype=pl.String))
    inputs = kept[1:]
    df, joined = _with_inputs(df, manifest, id_column)
    inputs = [*joined, *[c for c in inputs if c not in joined]]
    results = [c for c in SHOWN_RESULTS if c in df.columns and (c == "status" or df.get_column(c).null_count()
                                                                < df.height)]
    shown = [id_column, *inputs, *answers, *results]
    return Shown(df.select(shown), id_column, inputs, answers, total)


def _near(path: str) -> str:
    """``path`` relative to the working folder when that is shorter."""
    import os

    try:
        rel = os.path.relpath(path)
    except ValueError:  # another drive
        return path
    return rel if len(rel) < len(path) else path


def _with_inputs(df: pl.DataFrame, manifest: dict, id_column: str) -> tuple[pl.DataFrame, list[str]]:
    """The output rows with the input columns the job's templates read, joined by id; none if unreadable."""
    job_file = manifest.get("job_file")
    if not job_file or not df.height:
        return df, []
    try:
        from pipeline.job import Job
        from pipeline.render import Renderer
        from pipeline.source import open_source, scan_files

        job = Job.load(job_file)
        source = open_source(job.input.path, job.storage.endpoint_url)
        columns = [c for c in Renderer(job, source).template_columns if c not in df.columns]
        if not columns or source.remote:
            return df, []
        on = job.input.id or "row"
        inputs = scan_files(source.files, source.format)
        if job.input.id is None:
            inputs = inputs.with_row_index("row").with_columns(pl.col("row").cast(pl.Int64))
        wanted = inputs.select(on, *columns).filter(pl.col(on).is_in(df.get_column(id_column).implode()))
        found = wanted.unique(on, keep="first").collect()
        return df.join(found, left_on=id_column, right_on=on, how="left"), columns
    except (PipelineError, OSError, pl.exceptions.PolarsError):
        return df, []
