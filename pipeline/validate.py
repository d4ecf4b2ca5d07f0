"""``pipeline validate``: exactly the offline checks a run makes (``plan.check``), plus a look at the first
requests as the provider will receive them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.job import Job
from pipeline.plan import check
from pipeline.providers import Provider
from pipeline.render import Request
from pipeline.source import Source, read_head


@dataclass(frozen=True)
class ValidationReport:
    """A valid job, its opened input and its first rendered requests."""

    job: Job
    source: Source
    requests: list[Request]
    provider: Provider
    warnings: list[str] = field(default_factory=list)


def validate_job(path: str | Path, rows: int = 3) -> ValidationReport:
    """Load the job, run the run plan's checks and render the first ``rows`` rows."""
    checked = check(Job.load(path))
    head = read_head(checked.source, checked.renderer.columns, max(rows, 1))
    rendered = checked.renderer.render_chunk(head)
    return ValidationReport(job=checked.job, source=checked.source, requests=rendered.requests[:rows],
                            provider=checked.provider, warnings=checked.warnings)
