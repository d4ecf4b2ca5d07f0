"""``pipeline validate``: every check a run makes before its first request, plus a look at the first requests."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.job import Job
from pipeline.pricing import price_for
from pipeline.render import Renderer, Request
from pipeline.source import Source, open_source, read_head


@dataclass(frozen=True)
class ValidationReport:
    """A valid job, its opened input and its first rendered requests."""

    job: Job
    source: Source
    requests: list[Request]
    warnings: list[str] = field(default_factory=list)


def validate_job(path: str | Path, rows: int = 3) -> ValidationReport:
    """Load the job, open its input, check templates against the schema and render the first ``rows`` rows."""
    job = Job.load(path)
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    head = read_head(source, renderer.columns, max(rows, 1))
    rendered = renderer.render_chunk(head)
    warnings = []
    if price_for(job) is None:
        warnings.append(f"no price known for model {job.request.model!r}: cost columns will be null "
                        "(add a [pricing] table with input_per_mtok and output_per_mtok)")
    return ValidationReport(job=job, source=source, requests=rendered.requests[:rows], warnings=warnings)
