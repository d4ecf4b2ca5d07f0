"""Batch API mode: the same job and the same output at half the price, for jobs that can wait up to 24 hours.

The estimate pass has already written the rendered requests as staged input files (``ledger.BatchStage``);
here they become parts of the ledger, are uploaded and submitted as batches, and the batches are polled until
they end, their output and error files read into the journal as outcomes. The output table is then written
from the journal and the request key each row had in the estimate: the input is read once more, for its ids
and kept columns, and never rendered again.

Every step is recorded in the ledger the moment it happens (file registered, uploaded, batch created), so a
run killed anywhere resumes where it stopped: a file is never submitted twice. The one window no journal can
close, a create request that reached the provider but whose reply never came back, is closed by asking the
provider for a batch made from that file before creating one again.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from pipeline.access import resolve_api_key, resolve_base_url
from pipeline.errors import AbortError, Interrupted, PipelineError, ProviderError, StopRun, TransientError
from pipeline.job import Job
from pipeline.journal import Journal
from pipeline.keys import key_id
from pipeline.ledger import BatchLedger, BatchPart, BatchStage, describe_part
from pipeline.outcome import (
    Outcome,
    RunStats,
    batch_missing,
    failed,
    skipped,
)
from pipeline.plan import Ending, RunPlan
from pipeline.providers import provider_for
from pipeline.providers.base import BatchApi, BatchState
from pipeline.sink import OutputPaths, PartWriter
from pipeline.source import ROW, iter_chunks
from pipeline.structured import Checker

T = TypeVar("T")
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Rows a batch ended without: worth a new batch on a plain rerun after these endings, not after a
# cancellation (the user asked for it) or a failed validation (the same file would fail again).
RETRY_AFTER_END = frozenset({"completed", "expired"})
OUTPUT_CHUNK_ROWS = 10_000


class BatchRun:
    """Submits one job's parts as batches, polls them and collects their results into the journal.

    ``wait(seconds)`` is the pause between polls (returns True to stop waiting): injected, so the poller is
    tested without sleeping; by default it waits on ``stop``.
    """

    def __init__(self, plan: RunPlan, api: BatchApi, stats: RunStats, *, checker: Checker | None,
                 stop: threading.Event | None = None,
                 on_batches: Callable[[list[BatchPart]], None] | None = None,
                 wait: Callable[[float], bool] | None = None) -> None:
        assert plan.ledger is not None and isinstance(plan.store, Journal)
        self.plan, self.job, self.api, self.stats = plan, plan.job, api, stats
        self.journal, self.ledger = plan.store, plan.ledger
        self.provider, self.price = plan.checked.provider, plan.checked.price
        self.codec = plan.checked.renderer.codec
        self.checker = checker
        self.endpoint = plan.checked.renderer.endpoint
        self.stop = stop or threading.Event()
        self.on_batches = on_batches
        self.wait = wait or self.stop.wait

    # -- submitting --------------------------------------------------------------------------------------------

    def submit(self, stage: BatchStage) -> None:
        """Finish the submissions an earlier run left half-done (looking for a batch made from them first),
        then submit the files this run staged, one at a time. Files not reached when the run is stopped are
        dropped: their rows are planned again by the next run."""
        for part in self.ledger.parts(active=True):
            if part.batch_id is None and not self.stop.is_set():
                self._submit(part, resumed=True)
        stage.commit(self.journal)
        while not self.stop.is_set() and (staged := stage.next_part(self.ledger)) is not None:
            self._submit(staged, resumed=False)
        stage.discard()
        with contextlib.suppress(OSError):
            self.plan.paths.batches.rmdir()  # empty once every file is at the provider

    def _submit(self, part: BatchPart, *, resumed: bool) -> None:
        """Upload a written part and create its batch, recording each id at once."""
        if part.file_id is None:
            path = Path(part.path)
            if not path.exists():  # written by a killed run, then removed: forget it; the next run plans its rows
                self.ledger.drop_part(part.part)  # (this one counted them as in a batch before it got here)
                return
            name = f"{self.job.name}-part{part.part:04d}.jsonl"
            file_id = self._provider(lambda: self.api.upload(path, name), f"uploading {path.name}")
            part = self.ledger.update_part(part.part, file_id=file_id)
        assert part.file_id is not None
        file_id = part.file_id
        metadata = {"pipeline_job": self.job.name, "pipeline_fingerprint": self.job.fingerprint(),
                    "pipeline_part": str(part.part)}
        since = part.created_at or 0.0

        def create() -> BatchState:
            for attempt in self.api.retrying():
                with attempt:
                    # After a kill or a lost reply the provider may have made the batch already: look first.
                    taken = frozenset(p.batch_id for p in self.ledger.parts() if p.batch_id)
                    found = (self.api.find(file_id, since, taken)
                             if resumed or attempt.retry_state.attempt_number > 1 else None)
                    return found or self.api.create(file_id, self.job.request.endpoint, metadata)
            raise AssertionError("unreachable")  # pragma: no cover

        batch = self._provider(create, f"creating the batch of {file_id}")
        self.ledger.update_part(part.part, batch_id=batch.id, status=batch.status, counts=batch.counts_text,
                                 submitted_at=time.time())
        self.stats.requests_sent += part.requests
        Path(part.path).unlink(missing_ok=True)  # the provider holds the file now
        self._report()

    def _provider(self, call: Callable[[], T], doing: str) -> T:
        """A Batch API call; what cannot be retried, or is still failing after the retries, stops the run with
        a message that says what was being done (everything recorded so far stays recorded)."""
        try:
            return call()
        except ProviderError as e:
            why = "still failing after retries" if isinstance(e, TransientError) else "refused"
            raise AbortError(f"{doing}: {why}: {e}; everything submitted so far is recorded in the journal, "
                             f"run again to resume", kind=f"batch_{e.kind}", status=e.status) from None

    # -- polling and collecting ---------------------------------------------------------------------------------

    def poll(self, *, wait: bool) -> None:
        """Poll the job's open batches until every one has ended (or once, without ``wait``), collecting each
        as it ends. The wait between polls grows while nothing changes, and starts over when something does."""
        spec = self.job.batch
        interval = spec.poll_interval_s
        while True:
            changed = False
            for part in self.ledger.parts(active=True):
                if part.batch_id is None or self.stop.is_set():
                    continue
                b = self._provider(lambda bid=part.batch_id: self.api.retrieve(bid),  # type: ignore[misc]
                                   f"polling batch {part.batch_id}")
                status, counts = b.status, b.counts_text
                if (status, counts) != (part.status, part.counts):
                    changed = True
                    part = self.ledger.update_part(part.part, status=status, counts=counts,
                                                    output_file_id=b.output_file_id, error_file_id=b.error_file_id)
                if status in FINAL:
                    self._collect(part, b)
            self._report()
            open_batches = [p for p in self.ledger.parts(active=True) if p.batch_id is not None]
            if not wait or not open_batches or self.stop.is_set():
                return
            interval = spec.poll_interval_s if changed else min(interval * 1.5, spec.poll_max_interval_s)
            if self.wait(interval):
                return

    def _collect(self, part: BatchPart, batch: BatchState) -> None:
        """Read an ended batch's output and error files into outcomes, one per request of the part."""
        keys = self.ledger.part_keys(part.part)
        wanted = set(keys)
        found: dict[str, Outcome] = {}
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                got = self._provider(lambda fid=file_id: self._read_results(fid, wanted),  # type: ignore[misc]
                                     f"downloading {file_id} of batch {part.batch_id}")
                for k, o in got.items():
                    found.setdefault(k, o)
        status = batch.status
        why = _batch_errors(batch)
        for k in keys:
            if k not in found:
                found[k] = batch_missing(k, status, why, retryable=status in RETRY_AFTER_END)
        self.ledger.collect_part(part.part, list(found.values()))
        for o in found.values():
            self.stats.spend(o)

    def _read_results(self, file_id: str, wanted: set[str]) -> dict[str, Outcome]:
        """Stream-parse a results file (retried whole if the download breaks off)."""
        def read() -> dict[str, Outcome]:
            got: dict[str, Outcome] = {}
            for raw in self.api.lines(file_id):
                o = self._line_outcome(raw)
                if o is not None and o.key in wanted:
                    got[o.key] = o
            return got

        return self.api.retried(read)

    def _line_outcome(self, raw: bytes) -> Outcome | None:
        """One result line as an outcome, priced at the Batch API price; None for a line that is not ours."""
        r = self.codec.batch_result(raw)
        if r is None:
            return None
        if r.error is not None:
            return failed(r.key, r.error, attempts=r.attempts)
        return self.endpoint.batch_outcome(r, self.price, codec=self.codec, checker=self.checker)

    def _report(self) -> None:
        if self.on_batches is not None:
            self.on_batches(self.ledger.parts())


def _batch_errors(batch: BatchState) -> str:
    """The provider's reasons for a failed batch, as a short clause."""
    errors = batch.errors
    if not errors:
        return ""
    shown = "; ".join(errors[:3])
    return f" ({shown}{'; ...' if len(errors) > 3 else ''})"


class _RowRef(NamedTuple):
    row: int
    row_id: Any
    keep: tuple[Any, ...]


def write_rows(plan: RunPlan, stage: BatchStage, sink: PartWriter, key_of_row: Callable[[Any], tuple[Any, ...]],
               stats: RunStats) -> None:
    """Every row whose request has an outcome in the journal, in input order, found by the key its row had in
    the estimate (the input is read for its ids and kept columns only); rows still waiting in a batch are left
    out and counted as pending."""
    job = plan.job
    # a job with no id and nothing kept still reads one column: rows are counted by what is read
    columns = [*([job.input.id] if job.input.id else []), *job.input.keep] or list(plan.checked.source.schema)[:1]
    recorded = plan.store.reader(any_outcome=True)
    seen: set[int] = set()
    try:
        for chunk in iter_chunks(plan.checked.source, columns, chunk_rows=OUTPUT_CHUNK_ROWS, limit=plan.limit):
            rows = chunk.get_column(ROW).to_list()
            ids = chunk.get_column(job.input.id).to_list() if job.input.id else rows
            keep_cols = [chunk.get_column(c).to_list() for c in job.input.keep]
            keeps = list(zip(*keep_cols, strict=True)) if keep_cols else [()] * len(rows)
            keys = [stage.key_of(r) for r in rows]
            found = recorded([k for k in keys if k is not None])
            for row, row_id, keep, key in zip(rows, ids, keeps, keys, strict=True):
                ref = _RowRef(row, row_id, keep)
                outcome = skipped(*stage.skipped.get(row, ("skipped", None))) if key is None else found.get(key)
                if outcome is None:
                    stats.pending += 1
                    continue
                duplicate = False
                if key is not None:
                    kid = key_id(key)
                    duplicate = kid in seen
                    seen.add(kid)
                sink.add(row, key_of_row(ref), outcome, deduplicated=duplicate)
                stats.count(outcome, deduplicated=duplicate)
    finally:
        recorded.close()


def run_batches(plan: RunPlan, stage: BatchStage, *, wait: bool = True,
                on_batches: Callable[[list[BatchPart]], None] | None = None,
                handle_signals: bool = False) -> Ending:
    """Submit what the stage wrote, poll (until every batch ended, or once without ``wait``), collect, and
    write the output from the journal."""
    assert plan.ledger is not None and isinstance(plan.store, Journal)
    job, est = plan.job, plan.estimate
    stats = RunStats(rows_total=est.rows)
    sink, key_of_row = plan.sink()
    stop = threading.Event()
    reasons: list[StopRun] = []
    restore = _stop_on_signals(stop, reasons, job) if handle_signals else None
    stopped: PipelineError | None = None
    try:
        with plan.checked.provider.batch_api(plan.url, plan.api_key, timeout_s=job.limits.timeout_s,
                                             max_attempts=job.limits.max_attempts) as api:
            batches = BatchRun(plan, api, stats, checker=sink.checker,
                               stop=stop, on_batches=on_batches)
            try:
                batches.submit(stage)
                batches.poll(wait=wait)
            except (StopRun, AbortError) as e:
                stopped = e
        if stopped is None and reasons:
            stopped = reasons[0]
    finally:
        if restore is not None:
            restore()
        write_rows(plan, stage, sink, key_of_row, stats)
        rows = sink.finish()
    extra: dict[str, Any] = {}
    # A run that only collects estimated nothing; the estimate worth comparing with is the submitting run's.
    if est.requests:
        plan.store.set_meta("batch_estimate", json.dumps(est.to_dict(), default=str))
    elif (submitted := plan.store.get_meta("batch_estimate")) is not None:
        extra["estimate"] = json.loads(submitted)
    extra["batches"] = [{"part": p.part, "batch_id": p.batch_id, "input_file_id": p.file_id, "status": p.status,
                         "request_counts": json.loads(p.counts) if p.counts else None, "requests": p.requests,
                         "collected": p.collected, "written_at": p.created_at, "submitted_at": p.submitted_at,
                         "collected_at": p.collected_at} for p in plan.ledger.parts()]
    extra["totals"] = {"rows_pending_in_batches": stats.pending}
    status = "stopped" if stopped is not None else "submitted" if stats.pending else "complete"
    return Ending(stats, stopped, rows, status=status, manifest=extra)


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


@dataclass
class BatchListing:
    """A job's batches as its journal records them (refreshed from the provider unless offline)."""

    parts: list[BatchPart] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def list_batches(job_path: str, *, base_url: str | None = None, refresh: bool = True) -> BatchListing:
    """The batches of a job (``pipeline batches JOB``); open ones are asked for their current status."""
    job = Job.load(job_path)
    paths = OutputPaths(Path(job.output.local))
    if not paths.journal.exists():
        return BatchListing()
    with Journal(paths.journal) as journal:
        ledger = BatchLedger(journal)
        listing = BatchListing(parts=ledger.parts())
        open_parts = [p for p in listing.parts if p.batch_id and not p.collected and p.status not in FINAL]
        if not refresh or not open_parts:
            return listing
        try:
            with _client(job, base_url) as api:
                for p in open_parts:
                    assert p.batch_id is not None
                    b = api.retrieve(p.batch_id)
                    ledger.update_part(p.part, status=b.status, counts=b.counts_text,
                                        output_file_id=b.output_file_id, error_file_id=b.error_file_id)
        except ProviderError as e:
            listing.warnings.append(f"could not ask the provider, showing what the journal recorded: {e}")
        listing.parts = ledger.parts()
        return listing


def cancel_batches(job_path: str, *, base_url: str | None = None) -> list[str]:
    """Ask the provider to cancel every open batch of a job (``pipeline batches cancel JOB``); returns one
    line per batch. What they finished is collected by the next run, like any ended batch."""
    job = Job.load(job_path)
    paths = OutputPaths(Path(job.output.local))
    if not paths.journal.exists():
        return [f"{job_path}: no batches (no journal at {paths.journal})"]
    lines: list[str] = []
    with Journal(paths.journal) as journal, _client(job, base_url) as api:
        ledger = BatchLedger(journal)
        for p in ledger.parts(active=True):
            if p.batch_id is None:  # written (maybe uploaded) but never a batch: forget it, its rows go back to plan
                ledger.drop_part(p.part)
                Path(p.path).unlink(missing_ok=True)
                lines.append(f"part {p.part}: not submitted yet; dropped ({p.requests:,} rows will be planned again)")
        open_parts = [p for p in ledger.parts(active=True) if p.batch_id and p.status not in FINAL]
        for p in open_parts:
            assert p.batch_id is not None
            try:
                b = api.cancel(p.batch_id)
            except ProviderError as e:
                lines.append(f"part {p.part}: {p.batch_id}: not cancelled: {e}")
                continue
            p = ledger.update_part(p.part, status=b.status, counts=b.counts_text)
            lines.append(describe_part(p))
        if not open_parts and not lines:
            lines.append(f"{job_path}: no open batches")
    return lines


def _client(job: Job, base_url: str | None) -> BatchApi:
    url = resolve_base_url(job, base_url)
    return provider_for(job).batch_api(url, resolve_api_key(job, url), timeout_s=job.limits.timeout_s,
                                       max_attempts=job.limits.max_attempts)
