"""The ``pipeline`` command: parsing and printing only; the work happens in the library.

This is the one place that turns PipelineErrors into messages and exit codes:
0 all rows answered, 1 some rows failed, 2 usage or validation error, 3 aborted or stopped.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.errors import PipelineError

F = TypeVar("F", bound=Callable[..., Any])


def _err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def _out_console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def handle_errors(fn: F) -> F:
    """Turn a PipelineError into one line on stderr and its exit code: no tracebacks for user mistakes."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PipelineError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main() -> None:
    """Send every row of a table to an OpenAI-compatible API and get a clean Parquet table back."""


def _money(v: float | None) -> str:
    if v is None:
        return "n/a (no price)"
    return f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "not bounded by limits (set [limits] to see it)"
    if s < 90:
        return f"{s:,.0f} s"
    if s < 5400:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def print_estimate(est: Any, console: Console) -> None:
    """The estimate as a table for people."""
    t = Table(title=f"Estimate for job {est.job!r} ({est.model})", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("rows", f"{est.rows:,}")
    if est.rows_skipped:
        t.add_row("rows skipped (null cells)", f"{est.rows_skipped:,}")
    if est.duplicate_rows:
        t.add_row("duplicate rows (sent once)", f"{est.duplicate_rows:,}")
    t.add_row("requests to send", f"{est.requests:,}")
    t.add_row("prompt tokens (exact)", f"{est.prompt_tokens:,}")
    t.add_row("output tokens (upper bound)", f"{est.max_output_tokens:,}")
    if est.expected_output_tokens is not None:
        t.add_row("output tokens (expected)", f"{est.expected_output_tokens:,}")
    t.add_row("cost, upper bound", _money(est.cost_usd_max))
    if est.cost_usd_expected is not None:
        t.add_row("cost, expected", _money(est.cost_usd_expected))
    t.add_row("cost at Batch API price, upper bound", _money(est.batch_cost_usd_max))
    if est.batch_cost_usd_expected is not None:
        t.add_row("cost at Batch API price, expected", _money(est.batch_cost_usd_expected))
    limit = f" (bound by {est.binding_limit})" if est.binding_limit else ""
    t.add_row(f"duration under the limits{limit}", _duration(est.duration_s))
    t.add_row("Batch API duration", "up to 24 h (usually much less)")
    if est.context_window:
        t.add_row("rows over the context window", f"{est.over_context_rows:,} (window {est.context_window:,})")
    console.print(t)
    if est.price:
        console.print(f"prices: ${est.price['input_per_mtok']}/M input, ${est.price['cached_input_per_mtok']}/M "
                      f"cached, ${est.price['output_per_mtok']}/M output; source: {est.price['source']}"
                      + (f", prices as of {est.price['source_date']}" if est.price.get("source_date") else ""))
    if est.over_context_ids:
        shown = ", ".join(str(i) for i in est.over_context_ids[:20])
        more = f" and {est.over_context_rows - 20:,} more" if est.over_context_rows > 20 else ""
        console.print(f"[yellow]rows over the context window:[/] {shown}{more}")
    for w in est.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


@main.command()
@click.argument("job_path", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--rows", "n", default=3, show_default=True, help="How many rendered requests to show.")
@handle_errors
def validate(job_path: str, n: int) -> None:
    """Check the job and its input, and show the first rendered requests."""
    from pipeline.validate import validate_job

    report = validate_job(job_path, n)
    console = _out_console()
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    for req in report.requests:
        body = json.loads(req.body)
        console.rule(f"row {req.row_id} - {req.prompt_tokens} prompt tokens")
        console.print_json(data=body)
    console.print(f"[green]ok:[/] {job_path} is valid ({len(report.source.files)} input file(s), "
                  f"{len(report.source.columns)} columns)")


@main.command()
@click.argument("job_path", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--limit", type=click.IntRange(min=1), help="Estimate only the first N rows.")
@handle_errors
def estimate(job_path: str, as_json: bool, limit: int | None) -> None:
    """Tokens, cost (also at the Batch API price) and duration of a run, without sending anything."""
    from pipeline.estimate import estimate as run_estimate
    from pipeline.job import Job

    est = run_estimate(Job.load(job_path), limit=limit)
    if as_json:
        click.echo(json.dumps(est.to_dict(), indent=2, default=str))
    else:
        print_estimate(est, _out_console())
