"""Chained jobs: ``[input].from_job`` reads another job's output, so a pipeline of steps is a few small job files.

A job runs on its dependency's output only when that run completed (its manifest says so, and its reduce step
ended too): a half-written or stopped output is never read as if it were whole. ``pipeline run --with-deps`` runs
the steps not yet complete first, deepest first; ``pipeline estimate`` lists what the steps still to run will cost.
"""

from __future__ import annotations

from pathlib import Path

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
