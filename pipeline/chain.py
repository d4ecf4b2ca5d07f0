"""Chained jobs: ``[input].from_job`` reads another job's output, so a pipeline of steps is a few small job files.

A job runs on its dependency's output only when that run completed (its manifest says so, and its reduce step
ended too): a half-written or stopped output is never read as if it were whole. ``pipeline run --with-deps`` runs
the steps not yet complete first, deepest first; ``pipeline estimate`` lists what the steps still to run will cost.

The estimate of a step whose input is still to come runs on a stand-in for it (``stand_in``): the rows the step
before it will write, with its input's real columns and every answer at its bound (``max_tokens`` tokens), so the
last job's estimate covers the chain, as a bound.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import UsageError
from pipeline.job import Job
from pipeline.sink import OutputPaths, read_manifest


def dependencies(job: Job) -> list[Job]:
    """The jobs this one reads from, deepest first (the order they must run in)."""
    out: list[Job] = []
    current = job
    while current.input.from_job is not None:
        current = Job.load(current.input.from_job)
        out.append(current)
    return out[::-1]


def complete(job: Job) -> bool:
    """Whether the job's last run ended with every row answered or failed for good, its reduce included."""
    manifest = read_manifest(OutputPaths(Path(job.output.local)))
    if manifest is None or manifest.get("status") != "complete" or (job.reduce is not None and (
            not manifest.get("reduce") or manifest["reduce"].get("stopped") or manifest["reduce"].get("pending"))):
        return False
    return not job.reduce or Path(job.reduce.output).is_file()


def check_ready(job: Job) -> None:
    """Refuse to run on a dependency's output that is not complete, naming what to run."""
    if job.input.from_job is None:
        return
    dep = Job.load(job.input.from_job)
    if not complete(dep):
        raise UsageError(f"{job.source}: [input].from_job = {job.input.from_job!r} has not completed a run yet: run "
                         f"`pipeline run {job.input.from_job}` first, or this job with --with-deps")


def _answers(height: int, max_tokens: int, schema: Any) -> dict[str, pl.Series]:
    """A chat step's answer columns at their bound: ``content``, and the schema's typed fields (text at
    ``max_tokens`` each, other types empty)."""
    from pipeline.reduce import FILLER

    text = FILLER * max_tokens
    cols = {"content": pl.Series("content", [text] * height, pl.String)}
    if schema is not None:
        from pipeline.structured import columns_of

        for name, dtype in columns_of(schema).items():
            cols[name] = pl.Series(name, [text if dtype == pl.String else None] * height, dtype)
    return cols


def input_frame(job: Job, limit: int | None = None) -> pl.DataFrame | None:
    """The job's input rows: its file's, or a stand-in for a step before it that has not completed (None when a
    step's output cannot be stood in for: its answers are not text)."""
    if job.input.from_job is not None:
        dep = Job.load(job.input.from_job)
        if not complete(dep):
            return stand_in(dep, limit)
    from pipeline.reduce import input_rows

    rows = input_rows(job, limit=limit)
    return rows if rows.width else None


def stand_in(dep: Job, limit: int | None = None) -> pl.DataFrame | None:
    """What ``dep``'s run will write, before it ran: its input's id and kept columns with each answer at the map's
    ``max_tokens``; for a step with ``[reduce]``, one row per group with the fold's answer at the reduce's."""
    from pipeline.endpoints import endpoint_of

    if dep.maps and not endpoint_of(dep.request.endpoint).text_answers:
        return None
    rows = input_frame(dep, limit)
    if rows is None:
        return None
    if dep.maps:
        kept = [c for c in dict.fromkeys((dep.input.id, *dep.input.keep)) if c and c in rows.columns]
        out = rows.select(kept).with_columns(**_answers(rows.height, dep.request.max_tokens,
                                                         dep.request.chat.response_schema))
        rows = out.with_columns(status=pl.lit("ok"))
    if dep.reduce is None:
        return rows
    spec = dep.reduce
    groups = (rows.select(spec.group_by).unique(maintain_order=True) if spec.group_by
              else pl.DataFrame({"items": [rows.height]}))
    return groups.with_columns(**_answers(groups.height, spec.max_tokens, spec.response_schema),
                               status=pl.lit("ok"))


def on_stand_in(job: Job, folder: Path, limit: int | None = None) -> Job | None:
    """The job reading a stand-in for its input (written in ``folder``), when a step before it has not completed;
    None when it needs none or its input cannot be stood in for."""
    if job.input.from_job is None or complete(Job.load(job.input.from_job)):
        return None
    frame = input_frame(job, limit)
    if frame is None:
        return None
    path = folder / "stand-in.parquet"
    frame.write_parquet(path)
    return replace(job, input=replace(job.input, path=str(path), from_job=None))
