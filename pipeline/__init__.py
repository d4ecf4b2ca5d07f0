"""pipeline: send every row of a table to an OpenAI-compatible API and get a clean Parquet table back."""

from pipeline.errors import PipelineError
from pipeline.estimate import Estimate, estimate
from pipeline.job import Job
from pipeline.run import RunResult, run

__all__ = ["Estimate", "Job", "PipelineError", "RunResult", "estimate", "run"]
