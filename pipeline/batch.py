"""Batch API mode: the same job and the same output at half the price, for jobs that can wait up to 24 hours.

The rendered requests are written as Batch input files (``custom_id`` = the request key, so results join
back to rows however the provider orders them), uploaded, and submitted as batches; then the batches are
polled until they end, and their output and error files are read into the journal as outcomes. The output
table is written from the journal exactly as in online mode.

Every step is recorded in the journal the moment it happens (file written, file uploaded, batch created),
so a run killed anywhere resumes where it stopped: a file is never submitted twice. The one window no
journal can close, a create request that reached the provider but whose reply never came back, is closed by
asking the provider for a batch made from that file before creating one again.
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from pipeline.client import (
    BatchClient,
    chat_answer,
    embeddings_answer,
    raise_for_status,
    resolve_api_key,
    resolve_base_url,
)
from pipeline.errors import AbortError, OutputError, ProviderError, TransientError
from pipeline.execute import RunStats, answer_outcome, embedding_outcome, unsendable_input
from pipeline.job import Job
from pipeline.journal import BatchPart, Journal, Outcome
from pipeline.pricing import Price, Usage
from pipeline.render import RenderedChunk, Request
from pipeline.sink import OutputPaths, PartWriter
from pipeline.structured import AnswerChecker

T = TypeVar("T")
ENDPOINT_URL = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
FINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Rows a batch ended without: worth a new batch on a plain rerun after these endings, not after a
# cancellation (the user asked for it) or a failed validation (the same file would fail again).
RETRY_AFTER_END = frozenset({"completed", "expired"})


def key_id(key: str) -> int:
    """64 bits of a request key: sets of millions of keys at a third of the memory of the strings."""
    return int(key[:16], 16)


class BatchRun:
    """Submits one job's requests as batches, polls them and collects their results into the journal."""

    def __init__(self, job: Job, api: BatchClient, journal: Journal, paths: OutputPaths, price: Price | None, *,
                 checker: AnswerChecker | None, embedding_dims: int | None, stats: RunStats,
                 stop: threading.Event | None = None,
                 on_batches: Callable[[list[BatchPart]], None] | None = None) -> None:
        self.job, self.api, self.journal, self.paths, self.price = job, api, journal, paths, price
        self.checker, self.dims, self.stats = checker, embedding_dims, stats
        self.stop = stop or threading.Event()
        self.on_batches = on_batches
        self.url = ENDPOINT_URL[job.request.endpoint]

    # -- submitting --------------------------------------------------------------------------------------------

    def submit(self, chunks: Iterator[RenderedChunk], in_batches: set[int]) -> None:
        """Finish the submissions an earlier run left half-done, then put every row not yet answered or in a
        batch into new batch files and submit them, one file at a time."""
        for part in self.journal.parts(active=True):
            if part.batch_id is None and not self.stop.is_set():
                self._submit(part, resumed=True)
        spec = self.job.batch
        seen: set[int] = set()
        lines: _PartFile | None = None
        for chunk in chunks:
            for req in chunk.requests:
                if self.stop.is_set():
                    if lines is not None:
                        lines.discard()
                    return
                kid = key_id(req.key)
                if req.key in chunk.settled or kid in in_batches or kid in seen:
                    continue
                seen.add(kid)
                if self._unsendable(req):
                    continue
                line = (b'{"custom_id":"' + req.key.encode() + b'","method":"POST","url":"' + self.url.encode()
                        + b'","body":' + req.body + b"}\n")
                if lines is not None and (lines.count >= spec.max_requests_per_file
                                          or lines.size + len(line) > spec.max_bytes_per_file):
                    self._submit(lines.close(self.journal), resumed=False)
                    lines = None
                if lines is None:
                    lines = _PartFile(self.paths.batches)
                lines.add(req.key, line)
        self.journal.flush()
        if lines is not None and not self.stop.is_set():
            self._submit(lines.close(self.journal), resumed=False)
        elif lines is not None:
            lines.discard()
        with contextlib.suppress(OSError):
            self.paths.batches.rmdir()  # empty once every file is at the provider

    def _unsendable(self, req: Request) -> bool:
        """Embeddings rows too long for the model (or empty) fail alone, before anything is sent."""
        if not self.job.request.is_embeddings:
            return False
        refused = unsendable_input(req, self.job.request)
        if refused is not None:
            self.journal.add(refused)
        return refused is not None

    def _submit(self, part: BatchPart, *, resumed: bool) -> None:
        """Upload a written part and create its batch, recording each id at once."""
        if part.file_id is None:
            path = Path(part.path)
            if not path.exists():  # written by a killed run, then removed: forget it; the next run plans its rows
                self.journal.drop_part(part.part)  # (this one counted them as in a batch before it got here)
                return
            name = f"{self.job.name}-part{part.part:04d}.jsonl"
            file_id = self._provider(lambda: self.api.upload(path, name), f"uploading {path.name}")
            part = self.journal.update_part(part.part, file_id=file_id)
        assert part.file_id is not None
        file_id = part.file_id
        metadata = {"pipeline_job": self.job.name, "pipeline_fingerprint": self.job.fingerprint(),
                    "pipeline_part": str(part.part)}
        since = part.created_at or 0.0

        def create() -> dict[str, Any]:
            for attempt in self.api.retrying():
                with attempt:
                    # After a kill or a lost reply the provider may have made the batch already: look first.
                    found = (self.api.find(file_id, since)
                             if resumed or attempt.retry_state.attempt_number > 1 else None)
                    return found or self.api.create(file_id, self.url, metadata)
            raise AssertionError("unreachable")  # pragma: no cover

        batch = self._provider(create, f"creating the batch of {file_id}")
        self.journal.update_part(part.part, batch_id=str(batch["id"]), status=str(batch.get("status")),
                                 counts=_counts(batch))
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

    # -- polling and collecting --------------------------------------------------------------------------------

    def poll(self, *, wait: bool) -> None:
        """Poll the job's open batches until every one has ended (or once, without ``wait``), collecting each
        as it ends. The wait between polls grows while nothing changes, and starts over when something does."""
        spec = self.job.batch
        interval = spec.poll_interval_s
        while True:
            changed = False
            for part in self.journal.parts(active=True):
                if part.batch_id is None or self.stop.is_set():
                    continue
                b = self._provider(lambda bid=part.batch_id: self.api.retrieve(bid),  # type: ignore[misc]
                                   f"polling batch {part.batch_id}")
                status, counts = str(b.get("status")), _counts(b)
                if (status, counts) != (part.status, part.counts):
                    changed = True
                    part = self.journal.update_part(part.part, status=status, counts=counts,
                                                    output_file_id=b.get("output_file_id"),
                                                    error_file_id=b.get("error_file_id"))
                if status in FINAL:
                    self._collect(part, b)
            self._report()
            open_batches = [p for p in self.journal.parts(active=True) if p.batch_id is not None]
            if not wait or not open_batches or self.stop.is_set():
                return
            interval = spec.poll_interval_s if changed else min(interval * 1.5, spec.poll_max_interval_s)
            if self.stop.wait(interval):
                return

    def _collect(self, part: BatchPart, batch: dict[str, Any]) -> None:
        """Read an ended batch's output and error files into outcomes, one per request of the part."""
        keys = self.journal.part_keys(part.part)
        wanted = set(keys)
        found: dict[str, Outcome] = {}
        for file_id in (batch.get("output_file_id"), batch.get("error_file_id")):
            if file_id:
                got = self._provider(lambda fid=file_id: self._read_results(fid, wanted),  # type: ignore[misc]
                                     f"downloading {file_id} of batch {part.batch_id}")
                for k, o in got.items():
                    found.setdefault(k, o)
        status = str(batch.get("status"))
        why = _batch_errors(batch)
        for k in keys:
            if k not in found:
                found[k] = Outcome(k, "error", error=f"no result: the batch ended {status}{why}",
                                   error_type=f"batch_{status}", retryable=status in RETRY_AFTER_END)
        self.journal.collect_part(part.part, list(found.values()))
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
        try:
            line = orjson.loads(raw)
            key = str(line["custom_id"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return None
        resp = line.get("response")
        if not isinstance(resp, dict):  # never executed: the batch expired or was cancelled first
            err = line.get("error") if isinstance(line.get("error"), dict) else {}
            code = str(err.get("code") or "batch_error")
            return Outcome(key, "error", error=str(err.get("message") or code), error_type=code,
                           retryable=code == "batch_expired")
        body = resp.get("body")
        try:
            status = int(resp.get("status_code") or 0)
            if status != 200:
                raise_for_status(status, {}, orjson.dumps(body))
            if self.job.request.is_embeddings:
                return self._embedding_outcome(key, embeddings_answer(body, 1))
            outcome = answer_outcome(key, chat_answer(body), self.price, attempts=1, latency_ms=None, batch=True)
        except ProviderError as e:  # the line's own error, as its status code classes it
            return Outcome(key, "error", attempts=1, error=str(e), error_type=e.kind,
                           retryable=isinstance(e, TransientError))
        if self.checker is not None and outcome.status == "ok":
            problem = self.checker.problem(outcome.content)
            if problem is not None:
                return replace(outcome, status="error", error=problem, error_type="invalid_answer")
        return outcome

    def _embedding_outcome(self, key: str, a: Any) -> Outcome:
        cost = self.price.cost(Usage(prompt_tokens=a.prompt_tokens), batch=True) if self.price else None
        return embedding_outcome(key, a.vectors[0], self.dims, model=a.model, prompt_tokens=a.prompt_tokens,
                                 cost_usd=cost, attempts=1)

    def _report(self) -> None:
        if self.on_batches is not None:
            self.on_batches(self.journal.parts())


class _PartFile:
    """A Batch input file being written: lines go to disk as they come, so memory holds keys, not bodies."""

    def __init__(self, folder: Path) -> None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.path = folder / f"part-{uuid.uuid4().hex[:12]}.jsonl"
            self._fh = self.path.open("wb")
        except OSError as e:
            raise OutputError(f"{folder}: cannot write a batch input file: {e.strerror}") from None
        self.keys: list[str] = []
        self.size = 0

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, key: str, line: bytes) -> None:
        try:
            self._fh.write(line)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot write a batch input file: {e.strerror}") from None
        self.keys.append(key)
        self.size += len(line)

    def close(self, journal: Journal) -> BatchPart:
        """Finish the file and record it (and the keys in it) in the journal."""
        self._fh.close()
        return journal.add_part(str(self.path), self.keys, self.size)

    def discard(self) -> None:
        self._fh.close()
        self.path.unlink(missing_ok=True)


def _counts(batch: dict[str, Any]) -> str:
    return json.dumps(batch.get("request_counts") or {}, sort_keys=True)


def _batch_errors(batch: dict[str, Any]) -> str:
    """The provider's reasons for a failed batch, as a short clause."""
    errors = (batch.get("errors") or {}).get("data") or []
    if not errors:
        return ""
    shown = "; ".join(f"{e.get('code')}: {e.get('message')}" + (f" (line {e['line']})" if e.get("line") else "")
                      for e in errors[:3])
    return f" ({shown}{'; ...' if len(errors) > 3 else ''})"


def write_rows(chunks: Iterator[RenderedChunk], sink: PartWriter, key_of_row: Callable[[Any], tuple[Any, ...]],
               stats: RunStats) -> None:
    """Every row whose request has an outcome in the journal (``chunk.settled`` holds them all), in input
    order; rows still waiting in a batch are left out and counted as pending."""
    seen: set[int] = set()
    for chunk in chunks:
        for s in chunk.skipped:
            sink.add(s.row, key_of_row(s), None, skipped=s.reason)
            stats.skipped += 1
            stats.rows_done += 1
        for req in chunk.requests:
            outcome = chunk.settled.get(req.key)
            if outcome is None:
                stats.pending += 1
                continue
            kid = key_id(req.key)
            duplicate = kid in seen
            seen.add(kid)
            sink.add(req.row, key_of_row(req), outcome, deduplicated=duplicate)
            stats.count(outcome, deduplicated=duplicate)


def describe_part(part: BatchPart) -> str:
    """One line per batch, for people: its id, status and request counts."""
    counts = json.loads(part.counts) if part.counts else {}
    total = counts.get("total") or part.requests
    done = f"{counts.get('completed', 0):,}/{total:,} done, {counts.get('failed', 0):,} failed"
    state = part.status or ("uploaded" if part.file_id else "written")
    collected = ", collected" if part.collected else ""
    return f"part {part.part}: {part.batch_id or part.file_id or Path(part.path).name} {state} ({done}){collected}"


@dataclass
class BatchListing:
    """A job's batches as its journal records them (refreshed from the provider unless offline)."""

    parts: list[BatchPart] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def list_batches(job_path: str, *, base_url: str | None = None, refresh: bool = True) -> BatchListing:
    """The batches of a job (``pipeline batches JOB``); open ones are asked for their current status."""
    job = Job.load(job_path)
    paths = OutputPaths(Path(job.output.path))
    if not paths.journal.exists():
        return BatchListing()
    with Journal(paths.journal) as journal:
        listing = BatchListing(parts=journal.parts())
        open_parts = [p for p in listing.parts if p.batch_id and not p.collected and p.status not in FINAL]
        if not refresh or not open_parts:
            return listing
        try:
            with _client(job, base_url) as api:
                for p in open_parts:
                    assert p.batch_id is not None
                    b = api.retrieve(p.batch_id)
                    journal.update_part(p.part, status=str(b.get("status")), counts=_counts(b),
                                        output_file_id=b.get("output_file_id"), error_file_id=b.get("error_file_id"))
        except ProviderError as e:
            listing.warnings.append(f"could not ask the provider, showing what the journal recorded: {e}")
        listing.parts = journal.parts()
        return listing


def cancel_batches(job_path: str, *, base_url: str | None = None) -> list[str]:
    """Ask the provider to cancel every open batch of a job (``pipeline batches cancel JOB``); returns one
    line per batch. What they finished is collected by the next run, like any ended batch."""
    job = Job.load(job_path)
    paths = OutputPaths(Path(job.output.path))
    if not paths.journal.exists():
        return [f"{job_path}: no batches (no journal at {paths.journal})"]
    lines: list[str] = []
    with Journal(paths.journal) as journal, _client(job, base_url) as api:
        for p in journal.parts(active=True):
            if p.batch_id is None:  # written (maybe uploaded) but never a batch: forget it, its rows go back to plan
                journal.drop_part(p.part)
                Path(p.path).unlink(missing_ok=True)
                lines.append(f"part {p.part}: not submitted yet; dropped ({p.requests:,} rows will be planned again)")
        open_parts = [p for p in journal.parts(active=True) if p.batch_id and p.status not in FINAL]
        for p in open_parts:
            assert p.batch_id is not None
            try:
                b = api.cancel(p.batch_id)
            except ProviderError as e:
                lines.append(f"part {p.part}: {p.batch_id}: not cancelled: {e}")
                continue
            p = journal.update_part(p.part, status=str(b.get("status")), counts=_counts(b))
            lines.append(describe_part(p))
        if not open_parts and not lines:
            lines.append(f"{job_path}: no open batches")
    return lines


def _client(job: Job, base_url: str | None) -> BatchClient:
    url = resolve_base_url(job, base_url)
    return BatchClient(url, resolve_api_key(job, url), timeout_s=job.limits.timeout_s,
                       max_attempts=job.limits.max_attempts)
