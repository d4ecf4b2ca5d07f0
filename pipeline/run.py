"""``run(job)``: the whole flow for one job, wiring the stages together; the library entry point of a run.

job -> source -> render -> estimate -> execute -> journal -> sink. Everything a user can get wrong is checked
before the first request (the job, the input, the templates, the key, the output folder, the budget); after
that, whatever ends the run, what was answered is flushed to the journal and the output, and the manifest says
how the run ended.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import polars as pl

from pipeline.batch import BatchRun, key_id, write_rows
from pipeline.client import (
    ApiClient,
    BatchClient,
    check_transport_security,
    resolve_api_key,
    resolve_base_url,
)
from pipeline.errors import (
    AbortError,
    BudgetExceeded,
    Interrupted,
    OutputError,
    PipelineError,
    StopRun,
    UsageError,
)
from pipeline.estimate import Estimate, estimate_source
from pipeline.execute import Executor, RunStats, stop_reason_kind
from pipeline.job import MODES, Job
from pipeline.journal import BatchPart, Journal, NullJournal, Outcome
from pipeline.limits import RateBudget
from pipeline.pricing import Price, price_for
from pipeline.render import KeptChunks, RenderedChunk, Renderer
from pipeline.sink import (
    RESULT_SCHEMA,
    OutputPaths,
    PartWriter,
    check_free_space,
    claim_output,
    embedding_dims,
    write_manifest,
)
from pipeline.source import Source, iter_chunks, open_source
from pipeline.structured import AnswerChecker, columns_of

RUN_CHUNK_ROWS = 2_000  # small chunks keep the first request early and the producer thread's bursts short


@dataclass
class RunResult:
    """How a run ended: the output, its manifest, the totals, and the reason if it stopped early."""

    output: Path
    manifest: Path
    stats: RunStats
    estimate: Estimate
    stopped: PipelineError | None = None
    manifest_data: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pl.DataFrame:
        """The output table, read back (for notebooks: ``run(job, data=df).frame()``)."""
        return pl.read_parquet(self.output)

    @property
    def exit_code(self) -> int:
        """0 all rows answered, 1 some failed, 3 stopped or aborted (the CLI's exit status)."""
        if self.stopped is not None:
            return self.stopped.exit_code
        return 1 if self.stats.failed else 0


def _output_key_schema(job: Job, source: Source) -> tuple[dict[str, pl.DataType], str]:
    id_name = job.input.id or "row"
    schema: dict[str, pl.DataType] = {id_name: source.schema[job.input.id] if job.input.id else pl.Int64()}
    for c in job.input.keep:
        if c != id_name:
            schema[c] = source.schema[c]
    clash = [c for c in schema if c in RESULT_SCHEMA]
    if clash:
        raise UsageError(f"{job.source}: [input].keep column(s) {', '.join(clash)} clash with result columns of "
                         "the same name; rename them in the input or leave them out of keep")
    if job.request.response_schema is not None:
        taken = set(schema) | set(RESULT_SCHEMA)
        clash = [c for c in columns_of(job.request.response_schema) if c in taken]
        if clash:
            raise UsageError(f"{job.source}: [request].response_schema propert(ies) {', '.join(clash)} would "
                             "clash with output columns of the same name; rename them in the schema")
    return schema, id_name


def _move_aside(path: Path) -> Path | None:
    if not path.exists():
        return None
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
    n = 1
    while aside.exists():  # never overwrite an older journal set aside in the same second
        aside = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}")
        n += 1
    path.replace(aside)
    for extra in ("-wal", "-shm"):
        sidecar = Path(str(path) + extra)
        if sidecar.exists():
            sidecar.replace(Path(str(aside) + extra))
    return aside


def _with_frame_input(job: Job, data: pl.DataFrame) -> Job:
    path = Path(job.output.path).with_suffix(".input.parquet")
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
        wait: bool = True, on_batches: Callable[[list[BatchPart]], None] | None = None) -> RunResult:
    """Run a job to the end (or until stopped); resumes from the journal unless ``fresh``.

    ``on_estimate`` sees the estimate before anything is sent and returns False to cancel (the CLI asks the
    user there). Raises UsageError subclasses for anything to fix first; a stop or abort during the run is
    returned in ``RunResult.stopped``, with everything answered so far written. ``journal=False`` runs
    without resume (only for measuring the journal's overhead). ``data`` runs the job on a DataFrame instead
    of its [input].path (it is saved beside the output, so resume works for it too).

    ``mode`` overrides ``[request].mode``: ``"batch"`` goes through the Batch API (``wait=False`` submits and
    returns; a later run collects), reporting the job's batches to ``on_batches`` as they move.
    """
    mode = mode or job.request.mode
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "batch" and not journal:
        raise UsageError("Batch API mode needs the journal: it is where submitted files and batches are recorded")
    if data is not None:
        job = _with_frame_input(job, data)
    url = resolve_base_url(job, base_url)
    key = resolve_api_key(job, url)
    check_transport_security(url, key is not None, allow_insecure)
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    price = price_for(job)
    key_schema, _ = _output_key_schema(job, source)
    paths = OutputPaths(Path(job.output.path))
    claim_output(paths, job.name, job.fingerprint())
    if fresh:
        _move_aside(paths.journal)
    store = Journal(paths.journal) if journal else NullJournal()
    try:
        owner = store.get_meta("fingerprint")
        if owner is not None and owner != job.fingerprint():
            raise OutputError(f"{paths.journal}: the journal belongs to another job; use --fresh to start over")
        store.set_meta("fingerprint", job.fingerprint())
        open_parts = store.parts(active=True) if journal else []
        if open_parts and mode == "online":
            raise UsageError(f"{job.source}: {len(open_parts)} Batch API batch(es) of this job are still open; "
                             f"collect them with `pipeline run {job.source} --mode batch`, or cancel them with "
                             f"`pipeline batches cancel {job.source}`, before running online")
        in_batches = {key_id(k) for p in open_parts for k in store.part_keys(p.part)}
        lookup = store.reader(retry_failed=retry_failed)
        try:
            settled = _with_batched_as_done(lookup, in_batches) if in_batches else lookup
            counted: array[int] = array("i")
            kept = KeptChunks() if mode == "online" else None
            est, todo = estimate_source(job, source, renderer, price, limit=limit, settled=settled, counted=counted,
                                        kept=kept)
        finally:
            lookup.close()
        check_free_space(paths, est.rows)
        if on_estimate is not None and not on_estimate(est):
            raise StopRun("not started: the estimate was not accepted")
        if mode == "batch":
            _check_batch_budget(job, est)
            return _run_batches(job, url, key, source, renderer, key_schema, paths, store, est, todo, in_batches,
                                price, counted, limit=limit, retry_failed=retry_failed, wait=wait,
                                on_batches=on_batches, handle_signals=handle_signals)
        # A fresh run of a job small enough sends what the estimate rendered; otherwise it renders again.
        reuse = kept if kept is not None and kept.complete and todo is None else None
        return _execute(job, url, key, source, renderer, key_schema, paths, store, est, todo, price, counted,
                        limit=limit, retry_failed=retry_failed, transport=transport, on_progress=on_progress,
                        handle_signals=handle_signals, grace_s=grace_s, rendered=reuse)
    finally:
        store.close()


_IN_BATCH = Outcome("", "in_batch")


def _with_batched_as_done(lookup: Callable[[list[str]], dict[str, Outcome]],
                          in_batches: set[int]) -> Callable[[list[str]], dict[str, Outcome]]:
    """The estimate's lookup, counting rows already in an open batch as done: they are paid for there."""
    def settled(keys: list[str]) -> dict[str, Outcome]:
        found = lookup(keys)
        found.update((k, _IN_BATCH) for k in keys if k not in found and key_id(k) in in_batches)
        return found

    return settled


def _check_batch_budget(job: Job, est: Estimate) -> None:
    """A batch cannot be stopped half-way once submitted, so the budget is checked before, on its maximum."""
    cap, cost = job.budget.max_cost_usd, est.batch_cost_usd_max
    if cap is not None and cost is not None and est.requests and cost > cap:
        raise BudgetExceeded(f"not submitted: the batches could cost up to ${cost:,.4f} at the Batch API price, "
                             f"above [budget].max_cost_usd (${cap:g}); a batch cannot be stopped half-way, so "
                             f"raise the budget or submit fewer rows (--limit)")


def _sink(job: Job, paths: OutputPaths, key_schema: dict[str, pl.DataType]) -> tuple[PartWriter, Any]:
    """The output writer of this job, and the function giving a row's id and kept values."""
    schema = job.request.response_schema
    embeddings = job.request.is_embeddings
    dims = embedding_dims(job.request.model, job.request.dimensions) if embeddings else None
    sink = PartWriter(paths, key_schema, answer_columns=columns_of(schema) if schema else None,
                      checker=AnswerChecker(schema) if schema is not None else None,
                      embeddings=embeddings, embedding_dims=dims)
    with_id = job.input.id is not None
    keep = [c for c in job.input.keep if c != job.input.id]
    keep_index = [job.input.keep.index(c) for c in keep]

    def key_of_row(req: Any) -> tuple[Any, ...]:
        return (req.row_id if with_id else req.row, *[req.keep[i] for i in keep_index])

    def id_of_row(req: Any) -> tuple[Any, ...]:  # the same without kept columns: called per row, kept lean
        return (req.row_id if with_id else req.row,)

    return sink, key_of_row if keep_index else id_of_row


def _run_batches(job: Job, url: str, key: str | None, source: Source, renderer: Renderer,
                 key_schema: dict[str, pl.DataType], paths: OutputPaths, journal: Journal, est: Estimate,
                 todo: array[int] | None, in_batches: set[int], price: Price | None, counted: array[int], *,
                 limit: int | None, retry_failed: bool, wait: bool,
                 on_batches: Callable[[list[BatchPart]], None] | None, handle_signals: bool) -> RunResult:
    started = datetime.now(tz=UTC)
    t0 = time.monotonic()
    stats = RunStats(rows_total=est.rows)
    sink, key_of_row = _sink(job, paths, key_schema)
    stop = threading.Event()
    reasons: list[StopRun] = []
    restore = _stop_on_signals(stop, reasons, job) if handle_signals else None
    stopped: PipelineError | None = None
    lookup = journal.reader(retry_failed=retry_failed)
    try:
        with BatchClient(url, key, timeout_s=job.limits.timeout_s, max_attempts=job.limits.max_attempts) as api:
            batches = BatchRun(job, api, journal, paths, price, checker=sink.checker,
                               embedding_dims=sink.embedding_dims, stats=stats, stop=stop, on_batches=on_batches)
            rows = {} if todo is None else {"rows": todo}
            chunks = (renderer.render_chunk(c, settled=lookup, counted=counted)
                      for c in iter_chunks(source, renderer.columns, chunk_rows=RUN_CHUNK_ROWS, limit=limit, **rows))
            try:
                batches.submit(chunks, in_batches)
                batches.poll(wait=wait)
            except (StopRun, AbortError) as e:
                stopped = e
        if stopped is None and reasons:
            stopped = reasons[0]
    finally:
        if restore is not None:
            restore()
        lookup.close()
        answered = journal.reader(any_outcome=True)
        try:
            write_rows((renderer.render_chunk(c, settled=answered, counted=counted)
                        for c in iter_chunks(source, renderer.columns, chunk_rows=RUN_CHUNK_ROWS, limit=limit)),
                       sink, key_of_row, stats)
        finally:
            answered.close()
        written = sink.finish()
    parts = journal.parts()
    status = "stopped" if stopped is not None else "submitted" if stats.pending else "complete"
    manifest = _manifest(job, url, paths, est, price, stats, stopped, started, t0, written, mode="batch",
                         status=status)
    # A run that only collects estimated nothing; the estimate worth comparing with is the submitting run's.
    if est.requests:
        journal.set_meta("batch_estimate", json.dumps(est.to_dict(), default=str))
    elif (submitted := journal.get_meta("batch_estimate")) is not None:
        manifest["estimate"] = json.loads(submitted)
    manifest["batches"] = [{"part": p.part, "batch_id": p.batch_id, "input_file_id": p.file_id, "status": p.status,
                            "request_counts": json.loads(p.counts) if p.counts else None, "requests": p.requests,
                            "collected": p.collected} for p in parts]
    manifest["totals"]["rows_pending_in_batches"] = stats.pending
    write_manifest(paths, manifest)
    return RunResult(output=paths.output, manifest=paths.manifest, stats=stats, estimate=est, stopped=stopped,
                     manifest_data=manifest)


def _stop_on_signals(stop: threading.Event, reasons: list[StopRun], job: Job) -> Callable[[], None]:
    """SIGINT/SIGTERM during a batch run: the first stops after the current call, a second at once. Batches
    already submitted keep running at the provider either way."""
    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            raise Interrupted(f"stopped by a second {name}")
        reasons.append(Interrupted(f"stopped by {name}: the batches already submitted keep running at the "
                                   f"provider; run again to collect them, or `pipeline batches cancel "
                                   f"{job.source}`"))
        stop.set()

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for sig, h in old.items():
            signal.signal(sig, h)

    return restore


def _execute(job: Job, url: str, key: str | None, source: Source, renderer: Renderer,
             key_schema: dict[str, pl.DataType], paths: OutputPaths, journal: Journal, est: Estimate,
             todo: array[int] | None, price: Price | None, counted: array[int], *,
             limit: int | None, retry_failed: bool, transport: httpx.AsyncBaseTransport | None,
             on_progress: Callable[[RunStats], None] | None, handle_signals: bool, grace_s: float,
             rendered: KeptChunks | None = None) -> RunResult:
    started = datetime.now(tz=UTC)
    t0 = time.monotonic()
    sink, key_of_row = _sink(job, paths, key_schema)
    checker, embeddings, dims = sink.checker, sink.embeddings, sink.embedding_dims
    lookup = journal.reader(retry_failed=retry_failed)

    def chunks() -> Iterator[RenderedChunk]:
        if rendered is not None:
            yield from rendered.take()
            return
        # Rows still to send come first, so a resume starts sending at once; the rows answered before are
        # then read back from the journal into the output while those requests are in flight.
        phases = [{}] if todo is None else [{"rows": todo}, {"except_rows": todo}]
        for phase in phases:
            for c in iter_chunks(source, renderer.columns, chunk_rows=RUN_CHUNK_ROWS, limit=limit, **phase):
                yield renderer.render_chunk(c, settled=lookup, counted=counted)

    stopped: PipelineError | None = None
    stats: RunStats

    async def main() -> RunStats:
        lim = job.limits
        async with ApiClient(url, key, timeout_s=lim.timeout_s, concurrency=lim.concurrency,
                             transport=transport) as client:
            executor = Executor(client=client, budget=RateBudget(lim.requests_per_minute, lim.tokens_per_minute),
                                journal=journal, sink=sink, price=price, max_attempts=lim.max_attempts,
                                concurrency=lim.concurrency, key_of_row=key_of_row,
                                max_cost_usd=job.budget.max_cost_usd, retry_failed=retry_failed, grace_s=grace_s,
                                checker=checker, schema_retries=job.request.schema_retries,
                                embeddings=job.request if embeddings else None, embedding_dims=dims,
                                on_progress=on_progress)
            executor.stats.rows_total = est.rows
            loop = asyncio.get_running_loop()
            if handle_signals:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    loop.add_signal_handler(sig, executor.interrupt, Interrupted(f"stopped by {sig.name}"))
            try:
                return await executor.run(chunks())
            except (StopRun, AbortError) as e:
                nonlocal stopped
                stopped = e
                return executor.stats
            finally:
                if handle_signals:
                    for sig in (signal.SIGINT, signal.SIGTERM):
                        loop.remove_signal_handler(sig)

    try:
        stats = asyncio.run(main())
    finally:
        lookup.close()
        rows = sink.finish()
    manifest = _manifest(job, url, paths, est, price, stats, stopped, started, t0, rows, mode="online",
                         status="complete" if stopped is None else "stopped")
    write_manifest(paths, manifest)
    return RunResult(output=paths.output, manifest=paths.manifest, stats=stats, estimate=est, stopped=stopped,
                     manifest_data=manifest)


def _manifest(job: Job, url: str, paths: OutputPaths, est: Estimate, price: Price | None, stats: RunStats,
              stopped: PipelineError | None, started: datetime, t0: float, rows: int, *, mode: str,
              status: str) -> dict[str, Any]:
    """What the manifest says about a run, in either mode."""
    finished = datetime.now(tz=UTC)
    return {
        "job": job.name, "fingerprint": job.fingerprint(), "job_file": job.source, "status": status, "mode": mode,
        "stop_reason": None if stopped is None else {"kind": stop_reason_kind(stopped), "message": str(stopped)},
        "input": job.input.path, "output": str(paths.output), "rows_in_output": rows,
        "endpoint": job.request.endpoint, "model": job.request.model, "base_url": url,
        "started_at": started.isoformat(), "finished_at": finished.isoformat(),
        "duration_s": round(time.monotonic() - t0, 3),
        "totals": {"rows": stats.rows_done, "ok": stats.ok, "failed": stats.failed, "skipped": stats.skipped,
                   "resumed_from_journal": stats.resumed, "deduplicated": stats.deduplicated,
                   "requests_sent": stats.requests_sent, "retries": stats.retries,
                   "rate_limited_429": stats.rate_limited, "prompt_tokens": stats.prompt_tokens,
                   "cached_tokens": stats.cached_tokens, "completion_tokens": stats.completion_tokens,
                   "reasoning_tokens": stats.reasoning_tokens, "cost_usd_this_run": round(stats.cost_usd, 8)},
        "errors_by_type": dict(stats.errors),
        "price": price.describe() if price is not None else None,
        "price_basis": "Batch API" if mode == "batch" else "standard",
        "estimate": est.to_dict(),
        "limits": {"concurrency": job.limits.concurrency, "requests_per_minute": job.limits.requests_per_minute,
                   "tokens_per_minute": job.limits.tokens_per_minute, "max_attempts": job.limits.max_attempts},
        "journal": str(paths.journal),
    }


__all__ = ["RunResult", "resolve_api_key", "resolve_base_url", "run"]
