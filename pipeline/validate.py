"""``pipeline validate``: exactly the offline checks a run makes (``plan.check``), plus a look at the first
requests as the provider will receive them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.estimate import Estimate
from pipeline.job import Job
from pipeline.plan import check
from pipeline.planning import planning_pass
from pipeline.providers import Provider
from pipeline.render import IMAGE_CHUNK_ROWS
from pipeline.rendered import Request
from pipeline.source import Source, input_warnings, iter_chunks, read_head


@dataclass(frozen=True)
class ValidationReport:
    """A valid job, its opened input and its first rendered requests."""

    job: Job
    source: Source
    requests: list[Request]
    provider: Provider
    path: str  # where the requests go, after the base URL (the endpoint's path at this provider)
    warnings: list[str] = field(default_factory=list)
    bad_images: list[tuple[Any, str]] = field(default_factory=list)  # (row id, why): every row's images checked
    estimate: Estimate | None = None  # every row rendered and counted: the largest rows, the rows over the limits


def validate_job(path: str | Path, rows: int = 3) -> ValidationReport:
    """Load the job, run the run plan's checks and render the first ``rows`` rows."""
    checked = check(Job.load(path))
    renderer = checked.renderer
    head = read_head(checked.source, renderer.columns, max(rows, 1))
    rendered = renderer.render_chunk(head)
    bad: list[tuple[Any, str]] = []
    if renderer.image_parts:  # every image is read and checked (a run would find a bad one only when it got there)
        for chunk in iter_chunks(checked.source, renderer.columns, chunk_rows=IMAGE_CHUNK_ROWS):
            bad.extend(renderer.check_images(chunk))
    warnings = [*checked.warnings, *input_warnings(checked.source, checked.job.input.id)]
    est = planning_pass(checked.job, checked.source, renderer, checked.price).estimate
    est.warnings = [w for w in est.warnings if w not in warnings]
    return ValidationReport(job=checked.job, source=checked.source, requests=rendered.requests[:rows],
                            provider=checked.provider, path=renderer.codec.path, warnings=warnings, bad_images=bad,
                            estimate=est)
