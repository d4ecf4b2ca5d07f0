"""What the latest ``--sample`` of a job measured, read back from its manifest: the estimate's expected output
tokens come from it. Apart from ``sample.py`` (which runs samples) so that the estimate, which reads it, does not
depend on the runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.job import Job
from pipeline.sink import OutputPaths, read_manifest


def sample_paths(job: Job) -> OutputPaths:
    """Where a sample's answers and manifest go: beside the output, ``<output>.sample.parquet``."""
    out = Path(job.output.local)
    return OutputPaths(out.with_name(out.stem + ".sample.parquet"))


@dataclass(frozen=True)
class Measured:
    """What the sample's answered requests really used, per request."""

    rows: int
    requests: int
    output_tokens_mean: float
    output_tokens_sd: float
    prompt_tokens_mean: float
    latency_ms_mean: float | None
    latency_ms_p95: float | None
    cost_usd: float | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the sample's manifest."""
        return self.__dict__.copy()


def measured_output(job: Job) -> Measured | None:
    """The latest sample's measurement of this job, if one was taken (the estimate's expected output)."""
    try:
        data = (read_manifest(sample_paths(job)) or {}).get("sample")
    except Exception:  # an unreadable sample manifest only costs the estimate its measured figure
        return None
    if not data or not data.get("requests"):
        return None
    try:
        return Measured(**{k: data[k] for k in Measured.__dataclass_fields__})
    except (KeyError, TypeError):
        return None
