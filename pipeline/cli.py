"""The ``pipeline`` command: parsing and printing only; the work happens in the library.

This is the one place that turns PipelineErrors into messages and exit codes:
0 all rows answered, 1 some rows failed, 2 usage or validation error, 3 aborted or stopped.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.errors import Interrupted, JournalUnusable, PipelineError, UsageError

if TYPE_CHECKING:
    from pipeline.interrupts import StopSignals

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
@click.version_option(package_name="llm-pipeline")
def main() -> None:
    """Send every row of a table to an OpenAI-compatible API and get a clean Parquet table back."""


def _money(v: float | None) -> str:
    if v is None:
        return "n/a (no price)"
    return f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def _duration(s: float | None) -> str:
    if s is None:
        return "not bounded by limits (set \\[limits] to see it)"
    if s < 10:
        return f"{s:.1f} s"
    if s < 90:
        return f"{s:,.0f} s"
    if s < 5400:
        return f"{s / 60:,.1f} min"
    return f"{s / 3600:,.1f} h"


def print_chain(est: Any, console: Console) -> None:
    """The reduce step's rounds as a small table: what each round sends, its cost bound, the chain's total; after a
    ``--sample`` of the map, the rounds expected from the measured answer lengths beside them."""
    chain = est.chain
    expected = chain.get("expected")
    t = Table(title="Reduce: the fold, round by round", title_justify="left")
    columns = ["step", "round", "requests", "prompt tokens", "cost bound"]
    if expected:
        columns += ["expected requests", "expected prompt tokens"]
    for col in columns:
        t.add_column(col, justify="right" if col != "step" else "left")
    map_cost = (est.batch_cost_usd_max if chain.get("map_batch") else est.cost_usd_max) if est.rows else None
    if est.rows:
        t.add_row("map", "", f"{est.http_requests:,}", f"{est.prompt_tokens:,}", _money(map_cost),
                  *([f"{est.http_requests:,}", f"{est.prompt_tokens:,}"] if expected else []))
    guessed = {r["round"]: r for r in expected["rounds"]} if expected else {}
    for r in chain["rounds"]:
        more = []
        if expected:
            e = guessed.get(r["round"])
            more = [f"{e['requests']:,}", f"{e['prompt_tokens']:,}"] if e else ["0", "0"]
        t.add_row("reduce", str(r["round"]), f"{r['requests']:,}", f"{r['prompt_tokens']:,}",
                  _money(r.get("cost_usd_max")), *more)
    console.print(t)
    basis = ("the items' own tokens" if chain["exact_first_round"] else
             "the map's max_tokens per answer") + "; later rounds at the reduce's max_tokens per partial answer"
    total = None if chain["cost_usd_max"] is None else chain["cost_usd_max"] + (map_cost or 0.0)
    price = " at the Batch API price" if chain.get("batch") else ""
    console.print(f"{chain['groups']:,} groups of {chain['items']:,} items; reduce cost bound "
                  f"{_money(chain['cost_usd_max'])}{price}, whole chain {_money(total)} (round 1 from {basis})")
    if expected:
        console.print(f"expected after the sample: {expected['requests']:,} reduce requests, "
                      f"{_money(expected['cost_usd'])} ({expected['basis']})")


def print_estimate(est: Any, console: Console) -> None:
    """The estimate as a table for people."""
    if est.chain is not None and not est.rows and not est.requests:  # a job of [reduce] alone
        print_chain(est, console)
        return
    t = Table(title=f"Estimate for job {est.job!r} ({est.model})", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("rows", f"{est.rows:,}")
    if est.input_files > 1 or est.input_remote:
        where = "on object storage" if est.input_remote else "local"
        t.add_row("  from", f"{est.input_files:,} file(s), {where}")
    if est.rows_skipped:
        t.add_row("rows skipped (null cells)", f"{est.rows_skipped:,}")
    if est.rows_bad_image:
        t.add_row("rows failing before the run (a file that cannot be sent)", f"{est.rows_bad_image:,}")
    if est.duplicate_rows:
        t.add_row("duplicate rows (sent once)", f"{est.duplicate_rows:,}")
    t.add_row("requests to send", f"{est.http_requests:,}" + (f" ({est.requests:,} inputs)"
                                                                if est.http_requests != est.requests else ""))
    if est.made is not None:
        t.add_row(*est.made)
    kind = "exact" if est.prompt_tokens_exact else est.prompt_tokens_basis.split(" (")[0]
    t.add_row(f"prompt tokens ({kind})", f"{est.prompt_tokens:,}")
    if est.image_tokens_basis is not None:
        t.add_row("  of which text", f"{est.prompt_tokens - est.image_tokens:,}")
        t.add_row("  of which images", f"{est.image_tokens:,}")
    t.add_row("output tokens (upper bound)", f"{est.max_output_tokens:,}")
    if est.expected_output_tokens is not None:
        t.add_row("output tokens (expected)", f"{est.expected_output_tokens:,}")
        if est.expected_output_basis and "sample" in est.expected_output_basis:
            t.add_row("  expected from", "the latest --sample")
    t.add_row("cost, upper bound", _money(est.cost_usd_max))
    if est.cost_usd_expected is not None:
        t.add_row("cost, expected", _money(est.cost_usd_expected))
    if est.batch_available:
        t.add_row("cost at Batch API price, upper bound", _money(est.batch_cost_usd_max))
        if est.batch_cost_usd_expected is not None:
            t.add_row("cost at Batch API price, expected", _money(est.batch_cost_usd_expected))
    limit = f" (bound by {est.binding_limit})" if est.binding_limit else ""
    t.add_row(f"duration under the limits{limit}", _duration(est.duration_s))
    if est.batch_available:
        t.add_row("Batch API duration", "up to 24 h (usually much less)")
    if est.context_window:
        t.add_row("rows over the input limit" if est.http_requests != est.requests or est.max_output_tokens == 0
                  else "rows over the context window", f"{est.over_context_rows:,} (window {est.context_window:,})")
    console.print(t)
    if (line := largest_line(est)) is not None:
        console.print(escape(line))
    if not est.prompt_tokens_exact:
        console.print(f"[yellow]prompt tokens, and the costs from them, are approximate:[/] "
                      f"{escape(est.prompt_tokens_basis)}")
    if est.image_tokens_basis is not None:
        console.print(f"image tokens: {escape(est.image_tokens_basis)}")
    if est.expected_cached_tokens:
        saved = f", about {_money(est.cache_saved_usd_expected)} off" if est.cache_saved_usd_expected else ""
        console.print(f"prompt caching: every request shares a {est.cache_prefix_tokens:,}-token static prefix; "
                      f"about {est.expected_cached_tokens:,} prompt tokens expected from the provider's cache{saved} "
                      "(in the expected cost only; the bounds assume no cache)")
    if est.expected_output_basis and "sample" in est.expected_output_basis:
        console.print(f"expected output tokens: {escape(est.expected_output_basis)}")
    if est.price:
        per_minute = est.price.get("per_audio_minute_usd")
        rates = (f"${per_minute:g} per minute of audio" if per_minute and not est.price["input_per_mtok"] else
                 f"${est.price['input_per_mtok']}/M input, ${est.price['cached_input_per_mtok']}/M cached, "
                 f"${est.price['output_per_mtok']}/M output" + (f" (estimated ${per_minute:g} per minute of audio)"
                                                               if per_minute else ""))
        console.print(f"prices: {rates}; source: {est.price['source']}"
                      + (f", prices as of {est.price['source_date']}" if est.price.get("source_date") else ""))
    if est.over_context_ids:
        shown = ", ".join(str(i) for i in est.over_context_ids[:20])
        more = f" and {est.over_context_rows - 20:,} more" if est.over_context_rows > 20 else ""
        console.print(f"[yellow]rows over the context window:[/] {shown}{more}")
    if est.bad_images:
        print_bad_images(est.bad_images, est.rows_bad_image, console)
    if est.chain is not None:
        print_chain(est, console)
    for w in est.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}")


def largest_line(est: Any) -> str | None:
    """The rows with the most prompt tokens and their share of the job's: one huge row can be most of the cost."""
    if not est.largest_requests or not est.prompt_tokens:
        return None
    shown = ", ".join(f"row {row_id}: {tokens:,} ({tokens / est.prompt_tokens:.0%})"
                      for row_id, tokens in est.largest_requests)
    return f"largest requests (prompt tokens, share of the job's {est.prompt_tokens:,}): {shown}"


def print_bad_images(bad: list[tuple[Any, str]], total: int, console: Console, shown: int = 20) -> None:
    """The rows whose image cannot be sent, with why."""
    console.print(f"[yellow]rows with an image that cannot be sent ({total:,}; they fail alone, nothing else "
                  "is held up):[/]")
    for row_id, why in bad[:shown]:
        console.print(f"  row {escape(str(row_id))}: {escape(why)}")
    if total > shown:
        console.print(f"  and {total - shown:,} more")


def _shortened(value: Any) -> Any:
    """A request body with inline images cut to a note of their size: base64 is not for reading."""
    if isinstance(value, dict):
        return {k: _shortened(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shortened(v) for v in value]
    if isinstance(value, str) and len(value) > 200 and (value.startswith("data:image/") or " " not in value[:200]):
        return f"{value[:48]}... ({len(value):,} characters of base64)"
    return value


@main.command()
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--out", "job_path", type=click.Path(dir_okay=False), help="Where to write the job (default: "
              "NAME.toml beside the data).")
@handle_errors
def init(data: str, job_path: str | None) -> None:
    """Write a commented job file for a table: its columns listed, a prompt naming them."""
    from pipeline.init import write_skeleton

    written = write_skeleton(data, job_path or Path(data).with_suffix(".toml"))
    click.echo(f"wrote {written}; edit its prompt and model, then `pipeline validate {written}`")


@main.command()
@click.argument("job_path", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--rows", "n", default=3, show_default=True, help="How many rendered requests to show.")
@handle_errors
def validate(job_path: str, n: int) -> None:
    """Check the job and its input, and show the first rendered requests."""
    from pipeline.job import Job
    from pipeline.validate import validate_job

    job = Job.load(job_path)
    if job.reduce is not None and not job.maps:  # [reduce] alone: its check is planning the fold over the input
        from pipeline.planning import estimate as run_estimate

        print_chain(run_estimate(job), _out_console())
        click.echo(f"ok: {job_path} is valid (a reduce of the input's rows)")
        return
    report = validate_job(job_path, n)
    console = _out_console()
    for w in report.warnings:
        click.echo(f"warning: {w}", err=True)
    job = report.job
    provider = report.provider
    import os

    address = os.environ.get("PIPELINE_BASE_URL") or job.api.base_url
    where = (provider.base_url(address) if address else "(the address --base-url or PIPELINE_BASE_URL gives)") \
        + report.path
    console.print(f"requests as {job.api.provider} receives them: POST {escape(where)}")
    for req in report.requests:
        body = _shortened(json.loads(req.body))
        console.rule(f"row {req.row_id} - {req.prompt_tokens} prompt tokens")
        console.print_json(data=body)
    if report.bad_images:
        print_bad_images(report.bad_images, len(report.bad_images), console)
        console.print(f"[yellow]{job_path} is valid; {len(report.bad_images):,} row(s) will fail for their image[/] "
                      f"({len(report.source.files)} input file(s), {len(report.source.columns)} columns)")
        return
    if report.estimate is not None:
        console.print(escape(estimate_line(report.estimate)))
        if (line := largest_line(report.estimate)) is not None:
            console.print(escape(line))
        for w in report.estimate.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")
    console.print(f"[green]ok:[/] {job_path} is valid ({len(report.source.files)} input file(s), "
                  f"{len(report.source.columns)} columns)")


@main.command()
@click.argument("job_path", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
@click.option("--limit", type=click.IntRange(min=1), help="Estimate only the first N rows.")
@click.option("--exact", is_flag=True, help="Count prompt tokens with the provider's free counting endpoint "
                                            "(Anthropic), where no exact offline tokenizer exists; needs the key.")
@click.option("--base-url", help="With --exact: override [api].base_url (also PIPELINE_BASE_URL).")
@handle_errors
def estimate(job_path: str, as_json: bool, limit: int | None, exact: bool, base_url: str | None) -> None:
    """Tokens, cost (also at the Batch API price) and duration of a run; nothing is sent (but with --exact,
    the token counts)."""
    from pipeline.chain import complete, dependencies
    from pipeline.job import Job
    from pipeline.planning import estimate as run_estimate

    job = Job.load(job_path)
    waiting = [dep for dep in dependencies(job) if not complete(dep)]
    if waiting:  # the chain's steps still to run, each on a stand-in for its input where that is still to come
        _estimate_chain(job, waiting, limit, as_json)
        return
    est = run_estimate(job, limit=limit, exact=exact, base_url=base_url)
    if as_json:
        click.echo(json.dumps(est.to_dict(), indent=2, default=str))
    else:
        print_estimate(est, _out_console())


def _estimate_chain(job: Any, waiting: list[Any], limit: int | None, as_json: bool) -> None:
    """The estimate of a chain whose first steps have not run: each step still to run, then this one, the steps
    after the first on a stand-in for their input (the answers before them at ``max_tokens``), and the chain's
    total bound."""
    import tempfile

    from pipeline.chain import complete, on_stand_in
    from pipeline.job import Job
    from pipeline.planning import estimate as run_estimate

    steps, total = [], 0.0
    with tempfile.TemporaryDirectory(prefix="pipeline-chain-") as tmp:
        for n, step in enumerate([*waiting, job]):
            folder = Path(tmp) / str(n)
            folder.mkdir()
            stood = on_stand_in(step, folder, limit)
            if stood is None and step.input.from_job is not None and not complete(Job.load(step.input.from_job)):
                raise UsageError(f"{job.source}: {step.source} reads {step.input.from_job}, whose answers are not "
                                 "text: it is estimated once that step ran (`pipeline run "
                                 f"{job.source} --with-deps` runs the chain)")
            est = run_estimate(stood or step, limit=limit)
            mapped = est.batch_cost_usd_max if step.maps and step.request.mode == "batch" else est.cost_usd_max
            total += (mapped or 0.0) + ((est.chain or {}).get("cost_usd_max") or 0.0)
            steps.append((step, est, stood is not None))
    if as_json:
        click.echo(json.dumps({"steps": [{"job": s.source, "input_stood_in": on, "estimate": e.to_dict()}
                                         for s, e, on in steps], "cost_usd_max": total}, indent=2, default=str))
        return
    console = _out_console()
    for step, est, on in steps:
        console.rule(escape(f"{step.source}" + (" (its input: the step before it, answers at max_tokens)"
                                                if on else "")))
        print_estimate(est, console)
    console.print(f"[bold]the chain's {len(steps)} steps: up to {_money(total)}[/] (steps after the first estimated "
                  "on their input's bound; `pipeline run "
                  f"{escape(str(job.source))} --with-deps` runs them in order)")


def estimate_line(est: Any, *, batch: bool = False) -> str:
    """The estimate in one line, for the start of a run."""
    done = (f"{est.rows_already_done:,} already answered{' or in open batches' if batch else ''}, "
            if est.rows_already_done else "")
    if batch:
        expected = (f" (expected {_money(est.batch_cost_usd_expected)})"
                    if est.batch_cost_usd_expected is not None else "")
        bound = "" if est.prompt_tokens_exact else f" ({est.prompt_tokens_basis.split(' (')[0]})"
        return (f"estimate: {est.rows:,} rows, {done}{est.requests:,} requests to submit, {est.prompt_tokens:,} "
                f"prompt tokens{bound}, up to {_money(est.batch_cost_usd_max)}{expected} at the Batch API price "
                f"(online: up to {_money(est.cost_usd_max)}); results within 24 h")
    expected = f" (expected {_money(est.cost_usd_expected)})" if est.cost_usd_expected is not None else ""
    bound = "" if est.prompt_tokens_exact else f" ({est.prompt_tokens_basis.split(' (')[0]})"
    return (f"estimate: {est.rows:,} rows, {done}{est.requests:,} requests to send, {est.prompt_tokens:,} prompt "
            f"tokens{bound}, up to {_money(est.cost_usd_max)}{expected}; "
            + (f"{_duration(est.duration_s)} under the limits" if est.duration_s is not None
               else "duration not bounded (no [limits] set)"))


def _confirm_estimate(est: Any, job: Any, yes: bool, *, batch: bool = False) -> bool:
    """Ask before spending more than the budget (or $1 without one); refuse when nobody can answer."""
    click.echo(estimate_line(est, batch=batch), err=True)
    cost = est.batch_cost_usd_max if batch else est.cost_usd_max
    limit = job.budget.max_cost_usd
    threshold = limit if limit is not None else 1.0
    if yes or cost is None or cost <= threshold:
        return True
    what = f"[budget].max_cost_usd (${limit:g})" if limit is not None else "$1 (no [budget] set)"
    question = f"The estimate (up to ${cost:,.2f}) is above {what}. Start anyway?"
    if not sys.stdin.isatty():
        from pipeline.errors import BudgetExceeded

        raise BudgetExceeded(f"not started: the estimate (up to ${cost:,.2f}) is above {what}; "
                             "pass --yes to run anyway")
    return click.confirm(question, default=False, err=True)


def _interrupts_stop(job_path: str) -> StopSignals:
    """SIGINT or SIGTERM outside the run's own handlers (loading the job, printing at the end) stops with exit 3
    and one line, like an interrupt during the run: never click's bare "Aborted!"."""
    from pipeline.interrupts import StopSignals

    return StopSignals(resume_hint=f"; everything answered is saved, run `pipeline run {job_path}` again to resume")


@main.command()
@click.argument("job_path", metavar="JOB", type=click.Path(dir_okay=False))
@click.option("--fresh", is_flag=True, help="Start over: move the output, its manifest and its journal aside "
              "(kept, renamed with the time) instead of resuming; every row is paid for again.")
@click.option("--retry-failed", is_flag=True, help="Re-send rows that ended in an error (not only unanswered).")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N rows (a trial run).")
@click.option("--sample", type=click.IntRange(min=1), help="Send N random rows, show them and project the full run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which random rows --sample picks.")
@click.option("--base-url", help="Override [api].base_url (also PIPELINE_BASE_URL).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before spending above the budget.")
@click.option("--allow-insecure", is_flag=True, help="Allow sending the key over plain http:// to a remote host.")
@click.option("--plain", is_flag=True, help="Log lines instead of a progress bar.")
@click.option("--mode", type=click.Choice(["online", "batch"]),
              help="Override [request].mode: batch sends through the Batch API (half the price, within 24 h).")
@click.option("--no-wait", is_flag=True, help="Batch mode: submit (and collect what has ended), then exit.")
@click.option("--engine", type=click.Choice(["local", "ray"]), help="Override [engine].kind: ray runs the job's "
              "partitions on a Ray cluster under one global rate budget.")
@click.option("--address", help="Ray engine: the cluster's address (default [engine].address, else a local Ray).")
@click.option("--workers", type=click.IntRange(min=1), help="Ray engine: tasks at once (default [engine].workers).")
@click.option("--with-deps", is_flag=True, help="Run first the jobs whose output this one reads ([input].from_job) "
              "that have not completed.")
@handle_errors
def run(job_path: str, fresh: bool, retry_failed: bool, limit: int | None, sample: int | None, seed: int,
        base_url: str | None, yes: bool, allow_insecure: bool, plain: bool, mode: str | None, no_wait: bool,
        engine: str | None, address: str | None, workers: int | None, with_deps: bool) -> None:
    """Send every row's request and write the results; resumes where the last run stopped."""
    if with_deps:
        _run_dependencies(job_path, base_url, yes, allow_insecure, plain)
    if engine == "ray" or (engine is None and (address is not None or _job_engine(job_path) == "ray")):
        if sample is not None or limit or mode == "batch" or no_wait or retry_failed:
            raise click.UsageError("the Ray engine runs online over whole partitions: not with --sample, --limit, "
                                   "--mode batch, --no-wait or --retry-failed")
        with _interrupts_stop(job_path):
            _run_ray(job_path, fresh, base_url, allow_insecure, address, workers)
        return
    if sample is not None:
        if fresh or limit or mode == "batch" or no_wait:
            raise click.UsageError("--sample runs online, on the rows still to do: not with --fresh, --limit, "
                                   "--mode batch or --no-wait")
        with _interrupts_stop(job_path):
            _sample(job_path, sample, seed, base_url, allow_insecure)
        return
    with _interrupts_stop(job_path):
        _run(job_path, fresh, retry_failed, limit, base_url, yes, allow_insecure, plain, mode, no_wait)


def _run_dependencies(job_path: str, base_url: str | None, yes: bool, allow_insecure: bool, plain: bool) -> None:
    """Run, deepest first, the jobs this one reads from that have not completed; stop at one that stops."""
    from pipeline.chain import complete, dependencies
    from pipeline.job import Job

    for dep in dependencies(Job.load(job_path)):
        if complete(dep):
            continue
        click.echo(f"--with-deps: running {dep.source} first", err=True)
        try:
            with _interrupts_stop(dep.source):
                _run(dep.source, False, False, None, base_url, yes, allow_insecure, plain, None, False)
        except SystemExit as e:
            if e.code not in (0, 1, None):  # stopped, refused or aborted: the next step would read a partial output
                raise
        if not complete(dep):
            raise UsageError(f"--with-deps: {dep.source} did not complete; {job_path} was not run")


def _job_engine(job_path: str) -> str:
    from pipeline.job import Job

    return Job.load(job_path).engine.kind


def _run_ray(job_path: str, fresh: bool, base_url: str | None, allow_insecure: bool, address: str | None,
             workers: int | None) -> None:
    from pipeline.engines.ray_engine import run_ray
    from pipeline.job import Job

    job = Job.load(job_path)
    err = _err_console()
    err.print(f"Ray engine: planning partitions of {escape(job.input.path)} ...")

    def progress(s: Any, done: int, total: int) -> None:
        err.print(f"  {done:,}/{total:,} partitions done; {s.rows_done:,} rows ({s.ok:,} ok, {s.failed:,} failed), "
                  f"{s.requests_sent:,} requests, {s.rate_limited:,} 429s, ${s.cost_usd:,.4f}")

    result = run_ray(job, base_url=base_url, address=address, workers=workers, fresh=fresh,
                     allow_insecure=allow_insecure, on_progress=progress)
    s = result.stats
    click.echo(f"wrote {result.output} ({result.partitions_done:,} of {result.partitions:,} partitions complete; this "
               f"run: {s.rows_done:,} rows, {s.ok:,} ok, {s.failed:,} failed, {s.skipped:,} skipped, "
               f"{s.requests_sent:,} requests, {s.rate_limited:,} 429s; ${s.cost_usd:,.4f} spent)")
    if s.errors:
        click.echo("errors: " + ", ".join(f"{k} {v:,}" for k, v in s.errors.most_common()), err=True)
    if result.stopped is not None:
        click.echo(f"stopped: {result.stopped}", err=True)
        again = rerun_command(job_path, base_url=base_url, engine="ray", address=address, workers=workers)
        click.echo(f"every committed chunk is kept; run `{again}` again to resume", err=True)
    sys.exit(result.exit_code)


def _sample(job_path: str, n: int, seed: int, base_url: str | None, allow_insecure: bool) -> None:
    """Run a sample, print its rows beside their inputs, and the projection of the full run."""
    from pipeline.job import Job
    from pipeline.sample import run_sample

    job = Job.load(job_path)
    result = run_sample(job, n, seed=seed, base_url=base_url, allow_insecure=allow_insecure)
    console = _out_console()
    console.rule(f"sample of {result.rows.height} row(s), seed {seed}: inputs, then the answer")
    for row in result.rows.iter_rows(named=True):
        cost = "" if row.get("cost_usd") is None else f", ${row['cost_usd']:.6f}"
        console.print(f"[bold]{escape(str(row.get(result.id_column)))}[/] " + escape(
            f"[{row['status']}, {row.get('prompt_tokens') or 0} + {row.get('completion_tokens') or 0} tokens{cost}]"))
        for c in result.input_columns:
            console.print(f"  {escape(c)}: {escape(_cell(row.get(c)))}")
        if row["status"] != "ok":
            console.print(f"  [red]-> {escape(str(row.get('error_type')))}: {escape(_cell(row.get('error')))}[/]")
        elif result.answer_columns:
            console.print("  -> " + "  ".join(f"{escape(c)}: {escape(_cell(row.get(c)))}"
                                              for c in result.answer_columns))
        else:
            console.print(f"  -> {escape(_cell(row.get('content')))}")
    m, p = result.measured, result.projection
    console.print(f"sent {result.sent:,} request(s); answers in {result.output} and in the journal (the full run "
                  "does not pay for them again)")
    if m is None or p is None:
        console.print("[yellow]no answered request in the sample: nothing to project from[/]")
        sys.exit(result.exit_code or 1)
    lo, mid, hi = p.output_tokens
    console.print(f"[bold]projection of the full run[/] ({p.requests_left:,} request(s) left): output tokens "
                  f"{mid:,.0f} (95%: {lo:,.0f} - {hi:,.0f})")
    if p.cost_usd is not None:
        console.print(f"  cost {_money(p.cost_usd[1])} (95%: {_money(p.cost_usd[0])} - {_money(p.cost_usd[2])})")
    console.print(f"  duration {_duration(p.duration_s[0])} - {_duration(p.duration_s[1])} (the sample's mean and "
                  "p95 latency at the job's concurrency, or the limits, whichever is slower)")
    console.print(f"  basis: {escape(p.basis)}")
    uses = ("`pipeline estimate` now uses this sample's output tokens for its expected cost"
            if job.estimate.output_tokens is None else
            "[estimate].output_tokens stays the estimate's expected figure (remove it to use the sample's)")
    console.print(f"run `{escape(rerun_command(job_path, base_url=base_url))}` for the rest; {uses}")
    sys.exit(result.exit_code)


def _cell(value: Any, width: int = 160) -> str:
    text = "" if value is None else f"{value:.6f}" if isinstance(value, float) else str(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _run(job_path: str, fresh: bool, retry_failed: bool, limit: int | None, base_url: str | None, yes: bool,
         allow_insecure: bool, plain: bool, mode: str | None, no_wait: bool) -> None:
    from pipeline.job import Job
    from pipeline.progress import BatchDisplay, ProgressDisplay
    from pipeline.run import run as run_job

    job = Job.load(job_path)
    again = rerun_command(job_path, base_url=base_url, mode=mode)
    given, mode = mode, mode or job.request.mode
    batches = mode == "batch" or (given is None and job.reduce is not None and job.reduce.mode == "batch")
    if no_wait and not batches:
        raise click.UsageError("--no-wait applies to --mode batch only")
    click.echo(f"checking {job_path} and counting every row's tokens (nothing is sent yet) ...", err=True)
    try:
        with ProgressDisplay(force_plain=plain or mode == "batch") as progress:
            result = run_job(job, base_url=base_url, limit=limit, fresh=fresh, retry_failed=retry_failed,
                             allow_insecure=allow_insecure, on_progress=progress.update,
                             on_estimate=lambda est: _confirm_estimate(est, job, yes, batch=mode == "batch"),
                             handle_signals=True, mode=given, wait=not no_wait, on_batches=BatchDisplay().update,
                             release_memory=True, engine="local")  # `run` chose the engine already
    except JournalUnusable as e:
        raise JournalUnusable(f"{e}{_fresh_cost(job, limit)}") from None
    except Interrupted as e:  # before anything was sent, or a second signal while the output was written
        raise Interrupted(f"{e}; everything answered is saved, run `{again}` again to resume") from None
    for path in result.set_aside:
        click.echo(f"--fresh: set aside (kept, not deleted): {path}", err=True)
    s = result.stats
    spent = "at the Batch API price " if mode == "batch" else ""
    cost = (f"${s.cost_usd:,.4f} spent {spent}this run" if result.manifest_data.get("price") is not None
            else f"cost unknown: no price for {job.request.model!r}")
    took = result.manifest_data.get("duration_s")
    took_text = f" in {_duration(took)}" if isinstance(took, int | float) else ""
    if job.maps:
        click.echo(f"wrote {result.output}{took_text} ({s.rows_done:,} rows: {s.ok:,} ok, {s.failed:,} failed, "
                   f"{s.skipped:,} skipped, {s.resumed:,} from the journal, {s.deduplicated:,} deduplicated; {cost})")
    if result.reduce is not None:
        r = result.reduce
        click.echo(f"wrote {r.output} ({r.groups:,} groups: {r.ok:,} ok, {r.failed:,} failed; {r.rounds} round(s), "
                   f"{r.requests_sent:,} requests sent this run; ${r.cost_usd:,.4f} over the folds)")
        if r.stopped is not None:
            click.echo(f"stopped: {r.stopped}", err=True)
        elif r.pending:
            collect = rerun_command(job_path, base_url=base_url, mode=given)
            click.echo(f"reduce round {r.pending_round}: {r.pending:,} packs are still in batches at the provider; "
                       f"run `{collect}` again to collect them and go on to the next round", err=True)
    if s.errors:
        click.echo("errors: " + ", ".join(f"{k} {v:,}" for k, v in s.errors.most_common()), err=True)
    for name, server in (result.manifest_data.get("paced_by_server_limits") or {}).items():
        mine = getattr(job.limits, name)
        click.echo(f"note: the server's own limit ({server:,} {name.replace('_', ' ')}, from its rate-limit headers) "
                   f"is below the job's ({'none set' if mine is None else f'{mine:,}'}): the run went at the server's "
                   f"pace; set [limits].{name} = {server} for estimates that match", err=True)
    if s.pending and result.stopped is None:
        collect = rerun_command(job_path, base_url=base_url, mode="batch")
        click.echo(f"{s.pending:,} rows are still in batches at the provider; run `{collect}` again to collect them "
                   f"(`pipeline batches {job_path}` shows them)", err=True)
    if result.stopped is not None:
        click.echo(f"stopped: {result.stopped}", err=True)
        click.echo(f"everything answered is saved; run `{again}` again to resume", err=True)
    sys.exit(result.exit_code)


def rerun_command(job_path: str, *, base_url: str | None = None, mode: str | None = None,
                  engine: str | None = None, address: str | None = None, workers: int | None = None) -> str:
    """The command to run the job again, with the flags that chose where and how it was sent: copied as
    printed, it must reach the same server the same way."""
    import shlex

    words = ["pipeline", "run", job_path]
    for flag, value in (("--base-url", base_url), ("--mode", mode), ("--engine", engine), ("--address", address),
                        ("--workers", workers)):
        if value:
            words += [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def _fresh_cost(job: Any, limit: int | None) -> str:
    """What paying again for every row would cost (for a journal that cannot be used), as a clause."""
    from pipeline.planning import estimate as run_estimate

    try:
        est = run_estimate(job, limit=limit)
    except PipelineError:
        return ""
    return f" (by the estimate, --fresh would send {est.requests:,} requests: up to {_money(est.cost_usd_max)})"


@main.command()
@click.argument("args", metavar="[cancel] [JOB]...", nargs=-1)
@click.option("--base-url", help="Override [api].base_url (also PIPELINE_BASE_URL).")
@click.option("--offline", is_flag=True, help="Show what the journal recorded; do not ask the provider.")
@handle_errors
def batches(args: tuple[str, ...], base_url: str | None, offline: bool) -> None:
    """List a job's Batch API batches with status and counts (every job in jobs/ without JOB);
    `pipeline batches cancel JOB` cancels the job's open batches (their finished rows are kept)."""
    from pathlib import Path

    from pipeline.batch import cancel_batches, list_batches

    cancel = bool(args) and args[0] == "cancel"
    jobs = list(args[1:] if cancel else args)
    if cancel and not jobs:
        raise click.UsageError("name the job whose batches to cancel: pipeline batches cancel JOB")
    if not jobs:
        jobs = sorted(str(p) for p in Path("jobs").glob("*.toml"))
        if not jobs:
            raise click.UsageError("no JOB given and no jobs/*.toml here")
    console = _out_console()
    for job_path in jobs:
        if cancel:
            for line in cancel_batches(job_path, base_url=base_url):
                console.print(escape(line))
            console.print(f"run `pipeline run {job_path} --mode batch` to collect what they finished")
            continue
        listing = list_batches(job_path, base_url=base_url, refresh=not offline)
        console.print(f"[bold]{escape(job_path)}[/]: " + (f"{len(listing.parts)} batch file(s)"
                                                          if listing.parts else "no batches"))
        for w in listing.warnings:
            console.print(f"[yellow]warning:[/] {escape(w)}")
        if listing.parts:
            t = Table(show_header=True, header_style="bold", box=box.SIMPLE)  # fits 80 columns
            for col in ("part", "batch", "status", "total", "completed", "failed", "collected"):
                t.add_column(col, justify="right" if col in ("part", "total", "completed", "failed") else "left",
                             no_wrap=col in ("batch", "status"))
            for p in listing.parts:
                counts = json.loads(p.counts) if p.counts else {}
                t.add_row(str(p.part), p.batch_id or (f"(file {p.file_id})" if p.file_id else "(not uploaded)"),
                          p.status or "-", f"{counts.get('total') or p.requests:,}",
                          f"{counts.get('completed', 0):,}", f"{counts.get('failed', 0):,}",
                          "yes" if p.collected else "no")
            console.print(t)


@main.command()
@click.argument("output", type=click.Path(dir_okay=False))
@click.option("--rows", "n", default=10, show_default=True, type=click.IntRange(min=1), help="How many rows.")
@click.option("--where", help="Only rows matching this SQL condition, e.g. \"status != 'ok'\".")
@click.option("--random", "seed", type=int, default=None, metavar="SEED",
              help="Random rows (picked with this seed) instead of the first ones.")
@handle_errors
def show(output: str, n: int, where: str | None, seed: int | None) -> None:
    """Rows of an output beside the inputs the prompt read: the answers, to read."""
    from pipeline.show import show_rows

    shown = show_rows(output, rows=n, where=where, seed=seed)
    console = _out_console()
    t = Table(title=f"{shown.rows.height} of {shown.total:,} row(s) of {output}" + (f" where {where}" if where else ""),
              title_justify="left", show_lines=True, box=box.SIMPLE_HEAD)
    for c in shown.rows.columns:
        style = "cyan" if c in shown.input_columns else "green" if c in shown.answer_columns else None
        t.add_column(c, style=style, overflow="fold", max_width=60 if c in shown.answer_columns else 40)
    widths = [100 if c in shown.answer_columns else 60 for c in shown.rows.columns]
    for row in shown.rows.iter_rows():
        t.add_row(*[escape(_cell(v, w)) for v, w in zip(row, widths, strict=True)])
    console.print(t)
    console.print("inputs in [cyan]cyan[/], answers in [green]green[/]")


@main.command()
@click.argument("output", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--html", "html_path", is_flag=False, flag_value="", default=None, metavar="[FILE]",
              help="Write a self-contained HTML report with charts (default: beside the output).")
@handle_errors
def report(output: str, as_json: bool, html_path: str | None) -> None:
    """Totals, cost, errors by type and latency percentiles of an output file."""
    from pipeline.report import build_report
    from pipeline.storage import fetch_output, is_url

    shown = output
    if is_url(output):  # copied here first (the manifest too); an HTML report lands in this folder
        output = str(fetch_output(output))
        if html_path == "":
            html_path = Path(output).with_suffix(".report.html").name
    r = build_report(output)
    r["output"] = shown
    if html_path is not None:
        from pipeline.report_html import write_html_report

        written = write_html_report(output, html_path or None)
        click.echo(f"wrote {written}")
        return
    if as_json:
        click.echo(json.dumps(r, indent=2, default=str))
        return
    console = _out_console()
    t = Table(title=f"Report for {shown}", show_header=False, title_justify="left")
    t.add_column("what", style="bold")
    t.add_column("value", justify="right")
    t.add_row("job / model", f"{r['job']} / {r['model']}")
    t.add_row("last run", str(r["run_status"]) + (" (Batch API prices)" if r["mode"] == "batch" else ""))
    t.add_row("rows", f"{r['rows']:,}")
    for status, n in r["by_status"].items():
        t.add_row(f"  {status}", f"{n:,}")
    t.add_row("deduplicated rows", f"{r['deduplicated_rows']:,}")
    t.add_row("prompt / cached / completion tokens",
              f"{r['prompt_tokens']:,} / {r['cached_tokens']:,} / {r['completion_tokens']:,}")
    t.add_row("cost", _money(r["cost_usd"]))
    if r["cache_saved_usd"] is not None:
        t.add_row("prompt caching saved", _money(r["cache_saved_usd"]))
    if r["estimate_cost_usd_max"] is not None:
        t.add_row("estimate before the run (expected / max)",
                  f"{_money(r['estimate_cost_usd_expected'])} / {_money(r['estimate_cost_usd_max'])}")
    lat = r["latency_ms"]
    if lat["p50"] is not None:
        t.add_row("latency p50 / p95 / p99", f"{lat['p50']:,.0f} / {lat['p95']:,.0f} / {lat['p99']:,.0f} ms")
    red = r.get("reduce")
    if red:  # the second step of a map then reduce
        t.add_row("reduce: groups (ok / failed)", f"{red['groups']:,} ({red['ok']:,} / {red['failed']:,})")
        t.add_row("reduce: rounds / requests / cost", f"{red['rounds']} / {red.get('requests', 0):,} / "
                                                      f"{_money(red['cost_usd'])}")
        t.add_row("reduce: table", str(red["output"]))
    console.print(t)
    if r["price_source"]:
        as_of = f", as of {r['price_date']}" if r["price_date"] else ""
        console.print(f"prices: {escape(r['price_source'])}{as_of}")
    if r["errors_by_type"]:
        console.print("errors by type: " + ", ".join(f"{k}: {v:,}" for k, v in r["errors_by_type"].items()))
    for col, dist in r["distributions"].items():
        console.print(f"{col}: " + ", ".join(f"{k} {v:,}" for k, v in dist.items()))


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: pick a free one).")
@click.option("--port-file", type=click.Path(dir_okay=False), help="Write the port here once listening.")
@click.option("--rpm", type=click.IntRange(min=1), help="Requests per minute to enforce.")
@click.option("--tpm", type=click.IntRange(min=1), help="Tokens per minute to enforce.")
@click.option("--limit-model", type=click.Choice(["window", "token-bucket"]), default="window", show_default=True,
              help="window: a bucket of --limit-window-s of the limits, starting full; token-bucket: a continuous "
                   "bucket of a whole minute.")
@click.option("--start-empty", is_flag=True, help="token-bucket: start drained, as a busy account's bucket is.")
@click.option("--tpm-count", type=click.Choice(["exact", "chars"]), default="exact", show_default=True,
              help="What TPM charges besides max_tokens: exact prompt tokens, or ~4 characters a token.")
@click.option("--limit-window-s", default=60.0, show_default=True,
              help="Seconds of the limits the server lets through at once (OpenAI enforces sub-minute slices).")
@click.option("--latency-ms", default=0.0, show_default=True, help="Fixed latency per answer.")
@click.option("--latency-jitter-ms", default=0.0, show_default=True, help="Extra random latency, uniform.")
@click.option("--error-rate", "--fail-rate", default=0.0, show_default=True, help="Share of 500/502/503 answers.")
@click.option("--rate-429", default=0.0, show_default=True, help="Share of injected 429 answers.")
@click.option("--drop-rate", default=0.0, show_default=True, help="Share of dropped connections.")
@click.option("--slow-body-rate", default=0.0, show_default=True, help="Share of answers sent slowly.")
@click.option("--malformed-rate", default=0.0, show_default=True, help="Share of 200s with broken JSON.")
@click.option("--insufficient-quota", is_flag=True, help="Answer every request 429 insufficient_quota.")
@click.option("--overloaded-rate", default=0.0, show_default=True, help="Anthropic: share of 529 overloaded answers.")
@click.option("--itpm", type=click.IntRange(min=1), help="Anthropic: input tokens per minute to enforce.")
@click.option("--otpm", type=click.IntRange(min=1), help="Anthropic: output tokens per minute to enforce.")
@click.option("--api-key", "api_key_env", metavar="ENV", help="Require the key held in this environment variable.")
@click.option("--lenient", is_flag=True, help="Accept what the real APIs refuse (unknown parameters, values out of "
              "range, parameters a model family does not take); strict by default.")
@click.option("--models", help="Comma-separated models to accept (others: 404).")
@click.option("--seed", default=0, show_default=True, help="Seed of the fault injection.")
@click.option("--batch-delay-s", default=1.0, show_default=True, help="Batch API: time from creation to completion.")
@click.option("--batch-line-error-rate", default=0.0, show_default=True, help="Batch API: share of lines failing 500.")
@click.option("--batch-fail", is_flag=True, help="Batch API: every batch fails validation.")
@click.option("--batch-expire-fraction", type=float, help="Batch API: batches expire after this share of lines.")
@click.option("--batch-create-hold-s", default=0.0, show_default=True,
              help="Batch API: hold each create this long (nothing is made if the client has gone).")
@click.option("--batch-create-drop-replies", default=0, show_default=True,
              help="Batch API: this many creates succeed but their reply is lost.")
def sim(host: str, port: int, port_file: str | None, rpm: int | None, tpm: int | None, limit_model: str,
        start_empty: bool, tpm_count: str, limit_window_s: float,
        latency_ms: float,
        latency_jitter_ms: float, error_rate: float, rate_429: float, drop_rate: float, slow_body_rate: float,
        malformed_rate: float, insufficient_quota: bool, overloaded_rate: float, itpm: int | None, otpm: int | None,
        api_key_env: str | None, lenient: bool, models: str | None,
        seed: int, batch_delay_s: float, batch_line_error_rate: float, batch_fail: bool,
        batch_expire_fraction: float | None, batch_create_hold_s: float, batch_create_drop_replies: int) -> None:
    """Run the local simulator of the OpenAI, Azure OpenAI and Anthropic APIs (for demos, tests and benchmarks)."""
    import os
    from pathlib import Path

    from pipeline.sim import BANNER, SimConfig, serve_forever
    from pipeline.sim.server import free_port

    port = port or free_port()
    cfg = SimConfig(rpm=rpm, tpm=tpm, limit_model=limit_model, start_empty=start_empty, tpm_count=tpm_count,
                    limit_window_s=limit_window_s, latency_ms=latency_ms,
                    latency_jitter_ms=latency_jitter_ms,
                    error_rate=error_rate, rate_429=rate_429, drop_rate=drop_rate, slow_body_rate=slow_body_rate,
                    malformed_rate=malformed_rate, insufficient_quota=insufficient_quota,
                    overloaded_rate=overloaded_rate, itpm=itpm, otpm=otpm,
                    api_key=os.environ.get(api_key_env) if api_key_env else None, lenient=lenient,
                    models=tuple(m.strip() for m in models.split(",")) if models else (), seed=seed,
                    batch_delay_s=batch_delay_s, batch_line_error_rate=batch_line_error_rate, batch_fail=batch_fail,
                    batch_expire_fraction=batch_expire_fraction, batch_create_hold_s=batch_create_hold_s,
                    batch_create_drop_replies=batch_create_drop_replies)
    click.echo(BANNER, err=True)
    limits = ", ".join(f"{k}={v}" for k, v in (("rpm", rpm), ("tpm", tpm)) if v) or "no limits"
    click.echo(f"listening on http://{host}:{port}/v1 (OpenAI), /openai/v1 (Azure), /v1/messages (Anthropic) "
               f"({limits}); Ctrl-C stops it", err=True)
    if port_file:
        Path(port_file).write_text(str(port))
    serve_forever(cfg, host=host, port=port)


def own_process() -> None:
    """What the ``pipeline`` command sets for its own process, which it owns (a library caller's keeps its own
    settings), unless the user chose them in the environment:

    - one glibc malloc arena (``MALLOC_ARENA_MAX=1``): glibc gives each thread that allocates an arena of its own,
      and polars' and pyarrow's worker threads leave memory resident in theirs: the 1M-row estimate peaked at
      338 MiB with them and 288 MiB without, in the same time (bench/estimate.py). The worker pools start with the
      first parallel work, after this.
    - Arrow's buffers from the C allocator rather than its bundled mimalloc, which keeps what it took: a 100k-row
      run peaked 14-17 MiB higher with mimalloc (bench/frames.py's `pipeline run`). Arrow reads the setting when
      it loads, so it goes in the environment here, before any command imports pyarrow (``pa.set_memory_pool``
      later reaches Python's allocations only: 293 MiB against 283)."""
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" not in os.environ:
        with contextlib.suppress(AttributeError, OSError):  # not glibc: its allocator keeps its own ways
            ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def entry() -> None:
    """The ``pipeline`` command. Once a command has finished, a late SIGINT or SIGTERM is ignored: the work is
    done and its exit status decided, and Python would otherwise put back the default handlers while it shuts
    down, so a Ctrl-C in those last milliseconds killed the process (status 130/143 after a complete run)."""
    own_process()
    try:
        main()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
