"""``run(job)``: the library entry point of a run: prepare the plan, let the caller accept its estimate, run it
online or through the Batch API, and write the manifest.

job -> source -> render -> estimate -> execute -> journal -> sink. Everything a user can get wrong is checked
before the first request (``plan.prepare``); after that, whatever ends the run, what was answered is flushed
to the journal and the output, and the manifest says how the run ended.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import polars as pl

from pipeline.access import resolve_api_key, resolve_base_url
from pipeline.errors import BudgetExceeded, OutputError, PipelineError, StopRun, UsageError
from pipeline.estimate import Estimate
from pipeline.interrupts import StopSignals
from pipeline.job import Job
from pipeline.ledger import BatchPart
from pipeline.outcome import RunStats
from pipeline.plan import RunPlan, answer_columns, finish, prepare
from pipeline.storage import is_url, pull_manifest, push_files, push_output

if TYPE_CHECKING:
    from pipeline.reduce import ReduceResult


@dataclass
class RunResult:
    """How a run ended: the output, its manifest, the totals, and the reason if it stopped early."""

    output: Path | str             # the Parquet file, or the Ray engine's folder of chunks (or its URL)
    manifest: Path
    stats: RunStats
    estimate: Estimate | None      # None for a Ray run (its driver plans partitions, not an estimate pass)
    stopped: PipelineError | None = None
    manifest_data: dict[str, Any] = field(default_factory=dict)
    set_aside: list[Path] = field(default_factory=list)  # where --fresh moved the earlier output and journal
    reduce: ReduceResult | None = None  # the [reduce] step's, when the job has one and it ran

    def frame(self) -> pl.DataFrame:
        """The output table, read back (for notebooks: ``run(job, data=df).frame()``)."""
        from pipeline.report import read_output

        return read_output(self.output)

    @property
    def exit_code(self) -> int:
        """0 all rows answered, 1 some failed, 3 stopped or aborted (the CLI's exit status); the reduce step's
        count too."""
        for stopped in (self.stopped, self.reduce.stopped if self.reduce is not None else None):
            if stopped is not None:
                return int(stopped.exit_code)
        return 1 if self.stats.failed or (self.reduce is not None and self.reduce.failed) else 0


def _with_frame_input(job: Job, data: pl.DataFrame) -> Job:
    path = Path(job.output.local).with_suffix(".input.parquet")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data.write_parquet(path)
    except OSError as e:
        raise OutputError(f"{path}: cannot save the input frame: {e.strerror}") from None
    return replace(job, input=replace(job.input, path=str(path)))


def run(job: Job, *, base_url: str | None = None, limit: int | None = None, fresh: bool = False,
        retry_failed: bool = False, allow_insecure: bool = False, transport: httpx.AsyncBaseTransport | None = None,
        on_progress: Callable[[RunStats], None] | None = None,
        on_estimate: Callable[[Estimate], bool] | None = None, handle_signals: bool = False,
        grace_s: float = 5.0, journal: bool = True, data: pl.DataFrame | None = None, mode: str | None = None,
        wait: bool = True, on_batches: Callable[[list[BatchPart]], None] | None = None,
        release_memory: bool = False, engine: str | None = None,
        signals: StopSignals | None = None) -> RunResult:
    """Run a job to the end (or until stopped); resumes from the journal unless ``fresh``.

    ``on_estimate`` sees the estimate before anything is sent and returns False to cancel (the CLI asks the
    user there). Raises UsageError subclasses for anything to fix first; a stop or abort during the run is
    returned in ``RunResult.stopped``, with everything answered so far written. ``journal=False`` runs
    without resume (only for measuring the journal's overhead). ``data`` runs the job on a DataFrame instead
    of its [input].path (it is saved beside the output, so resume works for it too).

    ``release_memory``: the caller owns the process (the CLI does), so what the run no longer needs, such as
    the tokenizer's tables after the estimate counted everything, is given back to the system.

    ``mode`` overrides ``[request].mode``: ``"batch"`` goes through the Batch API (``wait=False`` submits and
    returns; a later run collects), reporting the job's batches to ``on_batches`` as they move.

    ``engine`` overrides ``[engine].kind``: ``"ray"`` runs the job's partitions on Ray (as ``pipeline run``
    does), online over whole partitions.

    ``signals``: handlers the caller installed in its main thread while this run goes on in another (a notebook's
    ``map``): an interrupt there stops this run as ``handle_signals`` would.
    """
    if (engine or job.engine.kind) == "ray":
        return _run_ray(job, base_url=base_url, fresh=fresh, allow_insecure=allow_insecure, limit=limit,
                        retry_failed=retry_failed, data=data, mode=mode, transport=transport)
    if data is not None:
        job = _with_frame_input(job, data)
    from pipeline.chain import check_ready

    check_ready(job)  # a dependency's output is read only once its run completed
    if job.reduce is not None and not job.maps:  # [reduce] alone: the input's rows folded by group
        from pipeline.reduce import run_reduce  # loaded by jobs with a [reduce] only

        red = run_reduce(job, _round_runner(base_url, transport, mode, wait, on_batches), fresh=fresh)
        return RunResult(output=red.output, manifest=_reduce_manifest(job, red), stats=RunStats(), estimate=None,
                         reduce=red)
    owned = StopSignals() if handle_signals and signals is None else None
    with owned if owned is not None else contextlib.nullcontext():
        signals = owned or signals
        remote = is_url(job.output.path)
        if remote:
            pull_manifest(job)
        plan = prepare(job, mode=mode, base_url=base_url, limit=limit, fresh=fresh, retry_failed=retry_failed,
                       allow_insecure=allow_insecure, journal=journal)
        try:
            _accept(plan, on_estimate)
            if isinstance(signals, StopSignals):
                signals.raise_if_stopped()  # a signal while the estimate was accepted: nothing is sent
            if plan.mode == "batch":
                from pipeline.batch import run_batches  # loaded by batch runs only

                assert plan.stage is not None
                end = run_batches(plan, plan.stage, wait=wait, on_batches=on_batches, handle_signals=handle_signals)
            else:
                from pipeline.online import run_online  # loaded by online runs only

                end = run_online(plan, transport=transport, on_progress=on_progress,
                                 signals=signals if isinstance(signals, StopSignals) else None,
                                 grace_s=grace_s, release_memory=release_memory)
            manifest = finish(plan, end)
            if remote:
                answers = answer_columns(job, plan.paths.output)
                if answers.folder is not None and answers.folder_url is not None:
                    push_files(answers.folder, answers.folder_url, job.storage.endpoint_url)
                push_output(job, plan.paths.output, plan.paths.manifest)
        finally:
            plan.close()
    result = RunResult(output=plan.paths.output, manifest=plan.paths.manifest, stats=end.stats,
                       estimate=plan.estimate, stopped=end.stopped, manifest_data=manifest,
                       set_aside=plan.set_aside)
    if job.reduce is not None and end.stopped is None and not end.stats.pending:
        # the map is complete: its answers are folded (a stopped or pending map is reduced on the rerun that ends it)
        from pipeline.reduce import run_reduce

        result.reduce = run_reduce(job, _round_runner(base_url, transport, mode, wait, on_batches), fresh=fresh,
                                   spent=end.stats.cost_usd)
        result.manifest_data["reduce"] = _reduce_summary(result.reduce)
        import json

        plan.paths.manifest.write_text(json.dumps(result.manifest_data, indent=2, default=str))
    return result


def _round_runner(base_url: str | None, transport: httpx.AsyncBaseTransport | None, mode: str | None, wait: bool,
                  on_batches: Callable[[list[BatchPart]], None] | None) -> Callable[[Job, pl.DataFrame], RunResult]:
    """How the reduce runs one round: this function, on the round's frame of packs, on the local engine, online or
    as one batch ([reduce].mode, or the run's ``mode``); without ``wait`` a round left at the provider ends the run,
    and the next run collects it and goes on."""
    return lambda round_job, packs: run(round_job, data=packs, base_url=base_url, engine="local", transport=transport,
                                        mode=mode, wait=wait, on_batches=on_batches)


def _reduce_summary(red: ReduceResult) -> dict[str, Any]:
    """The reduce step as the manifest records it."""
    return {"output": str(red.output), "groups": red.groups, "ok": red.ok, "failed": red.failed, "rounds": red.rounds,
            "requests": red.requests, "requests_sent": red.requests_sent, "cost_usd": red.cost_usd,
            "stopped": str(red.stopped) if red.stopped is not None else None,
            "pending": red.pending, "pending_round": red.pending_round}


def _reduce_manifest(job: Job, red: ReduceResult) -> Path:
    """A job of [reduce] alone: its manifest where a map's would be (what a job reading its output checks)."""
    import json

    from pipeline.sink import OutputPaths

    path = OutputPaths(Path(job.output.local)).manifest
    path.parent.mkdir(parents=True, exist_ok=True)
    status = "stopped" if red.stopped is not None else "submitted" if red.pending else "complete"
    path.write_text(json.dumps({"job": job.name, "status": status,
                                "reduce": _reduce_summary(red)}, indent=2))
    return path


def _run_ray(job: Job, *, base_url: str | None, fresh: bool, allow_insecure: bool, limit: int | None,
             retry_failed: bool, data: pl.DataFrame | None, mode: str | None,
             transport: httpx.AsyncBaseTransport | None) -> RunResult:
    """The Ray engine's run, as a ``RunResult``; what it cannot do is refused as the CLI refuses it."""
    refused = [name for name, given in (("limit", limit), ("retry_failed", retry_failed), ("data", data is not None),
                                        ('mode="batch"', mode == "batch"), ("transport", transport is not None))
               if given]
    if refused:
        raise UsageError(f"{job.source}: the Ray engine ([engine].kind = \"ray\") runs online over whole "
                         f"partitions: not with {', '.join(refused)} (engine=\"local\" runs it here)")
    from pipeline.engines.ray_engine import run_ray  # loaded by Ray runs only

    r = run_ray(job, base_url=base_url, fresh=fresh, allow_insecure=allow_insecure)
    return RunResult(output=r.output, manifest=r.manifest, stats=r.stats, estimate=None,
                     stopped=r.stopped, manifest_data=r.manifest_data)


def _accept(plan: RunPlan, on_estimate: Callable[[Estimate], bool] | None) -> None:
    """Ask the caller about the estimate (and check a batch's budget); a refusal leaves nothing staged."""
    try:
        if on_estimate is not None and not on_estimate(plan.estimate):
            raise StopRun("not started: the estimate was not accepted")
        if plan.mode == "batch":
            _check_batch_budget(plan.job, plan.estimate)
    except BaseException:
        if plan.stage is not None:
            plan.stage.discard()
        raise


def _check_batch_budget(job: Job, est: Estimate) -> None:
    """A batch cannot be stopped half-way once submitted, so the budget is checked before, on its maximum."""
    cap, cost = job.budget.max_cost_usd, est.batch_cost_usd_max
    if cap is not None and cost is not None and est.requests and cost > cap:
        raise BudgetExceeded(f"not submitted: the batches could cost up to ${cost:,.4f} at the Batch API price, "
                             f"above [budget].max_cost_usd (${cap:g}); a batch cannot be stopped half-way, so "
                             f"raise the budget or submit fewer rows (--limit)")


__all__ = ["RunResult", "resolve_api_key", "resolve_base_url", "run"]
