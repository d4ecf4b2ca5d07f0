"""The run plan: everything a run needs, built once, and what is still to do.

``check(job)`` makes every check that needs no server (the input, the templates against its schema, the output
columns, the price) and is what ``pipeline validate`` runs, so validate cannot pass a job that ``run``
rejects. ``prepare`` adds what a run needs beyond that (the URL and key, the output folder, the journal) and
the estimate, which is the pass that finds what is still to do. The online runner and the batch runner are
siblings over a plan; ``finish`` writes the manifest for either.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.access import check_transport_security, resolve_api_key, resolve_base_url
from pipeline.endpoints import endpoint_of, no_price_for, price_for
from pipeline.endpoints.base import MODES, AnswerColumns
from pipeline.errors import (
    BudgetExceeded,
    Interrupted,
    JobError,
    JournalUnusable,
    OutputError,
    PipelineError,
    StopRun,
    UsageError,
)
from pipeline.estimate import Estimate
from pipeline.job import Job
from pipeline.journal import Journal, NullJournal, OutcomeStore, Reader, journal_fingerprint
from pipeline.keys import key_id
from pipeline.ledger import BatchLedger, BatchStage
from pipeline.outcome import RESULT_SCHEMA, RUN_TOTALS, Outcome, RunStats
from pipeline.planning import PassOptions, planning_pass
from pipeline.pricing import Price
from pipeline.providers import Provider, provider_for
from pipeline.providers.registry import DESCRIPTORS
from pipeline.render import KeptChunks, Renderer
from pipeline.rowprints import RowPrints
from pipeline.runlock import RunLock
from pipeline.sink import (
    OutputPaths,
    PartWriter,
    answered_rows,
    check_free_space,
    claim_output,
    move_aside,
    read_manifest,
    write_manifest,
)
from pipeline.source import Source, open_source
from pipeline.storage import is_url
from pipeline.structured import columns_of
from pipeline.tools import argument_columns

IN_BATCH = Outcome("", "in_batch")
MAX_RUNS = 50  # runs kept in the manifest's history


@dataclass(frozen=True)
class Checked:
    """A job that passed every offline check, with what the checks built."""

    job: Job
    provider: Provider
    source: Source
    renderer: Renderer
    price: Price | None
    key_schema: dict[str, pl.DataType]
    warnings: list[str] = field(default_factory=list)


def check(job: Job, source: Source | None = None) -> Checked:
    """Every check that needs neither a server nor a key: input, templates, output columns, price.

    ``source`` replaces the job's whole input (a Ray task checks against its partition's file only)."""
    provider = provider_for(job)
    source = source or open_source(job.input.path, job.storage.endpoint_url)
    output = Path(job.output.local).resolve()
    if any(not is_url(f) and Path(f).resolve() == output for f in source.files):
        raise JobError(f"{job.source}: [output].path {job.output.path!r} is the input file itself; the run would "
                       "replace its own input with its results: choose another [output].path")
    renderer = Renderer(job, source, provider)
    price = price_for(job)
    if price is None and job.budget.max_cost_usd is not None:
        # Without a price every answer would count as $0 against the budget: it would switch itself off.
        raise JobError(f"{job.source}: [budget].max_cost_usd is set, but no price is known for model "
                       f"{job.request.model!r}, so the budget could not be kept; add a [pricing] table "
                       "(input_per_mtok and output_per_mtok) or remove [budget]")
    warnings = [] if price is not None else [no_price_for(job)]
    warnings += endpoint_of(job.request.endpoint).family_warnings(job)
    return Checked(job, provider, source, renderer, price, output_key_schema(job, source), warnings)


def output_key_schema(job: Job, source: Source) -> dict[str, pl.DataType]:
    """The id and kept columns of the output; refused when one would clash with a result column."""
    id_name = job.input.id or "row"
    schema: dict[str, pl.DataType] = {id_name: source.schema[job.input.id] if job.input.id else pl.Int64()}
    for c in job.input.keep:
        if c != id_name:
            schema[c] = source.schema[c]
    clash = [c for c in schema if c in RESULT_SCHEMA]
    if clash:
        raise UsageError(f"{job.source}: [input].keep column(s) {', '.join(clash)} clash with result columns of "
                         "the same name; rename them in the input or leave them out of keep")
    taken = set(schema) | set(RESULT_SCHEMA)
    if job.request.chat.response_schema is not None:
        clash = [c for c in columns_of(job.request.chat.response_schema) if c in taken]
        if clash:
            raise UsageError(f"{job.source}: [request].response_schema propert(ies) {', '.join(clash)} would "
                             "clash with output columns of the same name; rename them in the schema")
    if job.request.image is not None:
        clash = [c for c in answer_columns(job, Path(job.output.local)).columns or {} if c in schema]
        if clash:
            raise UsageError(f"{job.source}: [input].keep column(s) {', '.join(clash)} clash with the image columns "
                             "of the same name; leave them out of keep")
    if job.request.chat.tools:
        names = argument_columns(job.request.chat.tools)
        clash = [c for c in names if c in taken or c in ("tool_name", "tool_calls")]
        clash += sorted({c for c in names if names.count(c) > 1})
        if clash:
            raise UsageError(f"{job.source}: [[request.tools]] argument column(s) {', '.join(clash)} would clash "
                             "with output columns of the same name; rename the parameters or the tools")
    return schema


def answer_columns(job: Job, output: Path) -> AnswerColumns:
    """How the job's answers become typed columns of the output at ``output`` (its endpoint says); for an
    object-storage output, files the answers live in are named by their object's URL."""
    url = job.output.path if is_url(job.output.path) else None
    return endpoint_of(job.request.endpoint).answers(job.request, output, url)


@dataclass
class RunPlan:
    """What one run of a job needs, built once by ``prepare``; the runners read it, ``finish`` closes it."""

    checked: Checked
    mode: str
    url: str
    api_key: str | None = field(repr=False)
    paths: OutputPaths
    store: OutcomeStore
    ledger: BatchLedger | None
    estimate: Estimate
    todo: array[int] | None                # rows still to send (None: every row)
    counted: array[int]                     # prompt tokens by row position, from the estimate
    kept: KeptChunks | None                 # the estimate's rendered chunks, when they fit
    stage: BatchStage | None                # Batch API mode: the files the estimate pass wrote
    limit: int | None
    retry_failed: bool
    fresh: bool = False                     # the journal was set aside: earlier runs are not this one's history
    only_todo: bool = False                 # write only the rows of ``todo`` (a sample), not the rest
    lock: RunLock | None = None             # held from ``prepare`` to ``close``: one run of this output at a time
    set_aside: list[Path] = field(default_factory=list)  # where --fresh moved the earlier output and journal
    started: datetime = field(default_factory=lambda: datetime.now(tz=UTC))
    t0: float = field(default_factory=time.monotonic)

    @property
    def job(self) -> Job:
        """The job being run."""
        return self.checked.job

    def sink(self) -> tuple[PartWriter, Callable[[Any], tuple[Any, ...]]]:
        """The output writer of this run, and the function giving a row's id and kept values."""
        return output_writer(self.checked, self.paths), key_function(self.job)

    def settled_reader(self) -> Reader:
        """The journal's lookup of settled answers for this run (``settled_reader``)."""
        return settled_reader(self.store, self.job, self.paths, retry_failed=self.retry_failed)

    def close(self) -> None:
        """Release the journal and the run's lock."""
        try:
            self.store.close()
        finally:
            if self.lock is not None:
                self.lock.release()


def output_writer(c: Checked, paths: OutputPaths, *, stage: bool = True) -> PartWriter:
    """The output writer of a checked job (``stage=False``: a frame builder, with no parts folder)."""
    job = c.job
    vectors = c.renderer.endpoint.vectors(c.renderer.codec)
    answers = answer_columns(job, paths.output)
    return PartWriter(paths, c.key_schema, answer_columns=answers.columns, checker=answers.checker,
                      vectors=vectors is not None,
                      vector_dims=vectors.dims if vectors else None, stage=stage)


def key_function(job: Job) -> Callable[[Any], tuple[Any, ...]]:
    """The function giving a request's row id and kept values (the output's key columns)."""
    with_id = job.input.id is not None
    keep_index = [job.input.keep.index(c) for c in job.input.keep if c != job.input.id]

    def key_of_row(req: Any) -> tuple[Any, ...]:
        return (req.row_id if with_id else req.row, *[req.keep[i] for i in keep_index])

    def id_of_row(req: Any) -> tuple[Any, ...]:  # the same without kept columns: called per row, kept lean
        return (req.row_id if with_id else req.row,)

    return key_of_row if keep_index else id_of_row


def prepare(job: Job, *, mode: str | None = None, base_url: str | None = None, limit: int | None = None,
            fresh: bool = False, retry_failed: bool = False, allow_insecure: bool = False,
            journal: bool = True) -> RunPlan:
    """Check everything a user can get wrong, open the journal, and estimate what is still to do.

    Raises UsageError subclasses for anything to fix first; nothing has been sent when it returns.
    """
    mode = mode or job.request.mode
    if mode not in MODES:
        raise UsageError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "batch" and not journal:
        raise UsageError("Batch API mode needs the journal: it is where submitted files and batches are recorded")
    if mode == "batch" and job.request.endpoint not in DESCRIPTORS[job.api.provider].batch_endpoints:
        raise UsageError(f"{job.source}: the Batch API of provider = \"{job.api.provider}\" does not take "
                         f"{job.request.endpoint} requests; run it online")
    checked = check(job)
    url = resolve_base_url(job, base_url)
    key = resolve_api_key(job, url)
    check_transport_security(url, key is not None, allow_insecure)
    paths = OutputPaths(Path(job.output.local))
    lock = RunLock(paths.output)
    lock.acquire()  # first: everything below reads, moves or writes what another run of this job would
    store: OutcomeStore | None = None
    stage: BatchStage | None = None
    try:
        if paths.output.is_dir():  # before anything is sent: a run could not write its file there at the end
            raise OutputError(f"{paths.output}: is a folder (the Ray engine's dataset of chunks); run it with "
                              "--engine ray, or choose another [output].path for the local engine")
        claim_output(paths, job.name, job.fingerprint(), journal_owner=journal_fingerprint(paths.journal))
        set_aside = _set_aside(paths) if fresh else []
        store = Journal(paths.journal, check=True) if journal else NullJournal()
        owner = store.get_meta("fingerprint")
        if owner is not None and owner != job.fingerprint():
            raise OutputError(f"{paths.journal}: the journal belongs to another job; use --fresh to start over")
        if isinstance(store, Journal) and store.is_empty():
            _refuse_lost_journal(paths)
        store.set_meta("fingerprint", job.fingerprint())
        ledger = BatchLedger(store) if isinstance(store, Journal) else None
        open_parts = ledger.parts(active=True) if ledger is not None else []
        if open_parts and mode == "online":
            raise UsageError(f"{job.source}: {len(open_parts)} Batch API batch(es) of this job are still open; "
                             f"collect them with `pipeline run {job.source} --mode batch`, or cancel them with "
                             f"`pipeline batches cancel {job.source}`, before running online")
        # key ids of the requests in open batches: paid for there, so neither estimated nor staged again
        in_batches = {key_id(k) for p in open_parts for k in ledger.part_keys(p.part)} if ledger else set()
        lookup = settled_reader(store, job, paths, retry_failed=retry_failed)
        try:
            settled = _with_batched_as_done(lookup, in_batches) if in_batches else lookup
            counted: array[int] = array("i")
            kept = KeptChunks() if mode == "online" else None
            stage = (BatchStage(job.request, job.batch, checked.renderer.codec, paths.batches, in_batches)
                     if mode == "batch" else None)  # batch mode always has the journal (checked above)
            # No prints for image jobs: a print covers the row's cells, and an image file can change under the
            # same path (it must then be sent again), so those rows are known by their key, which hashes the bytes.
            prints = (RowPrints(store.db, str(paths.journal), checked.renderer, checked.source,
                                retry_failed=retry_failed)
                      if mode == "online" and isinstance(store, Journal) and checked.renderer.endpoint.row_prints
                      and not job.request.chat.images else None)
            from pipeline.measured import measured_output

            est, todo = planning_pass(job, checked.source, checked.renderer, checked.price, PassOptions(
                limit=limit, settled=settled, counted=counted, keep=kept.add if kept is not None else stage,
                prints=prints, measured=measured_output(job)))
        finally:
            lookup.close()
        check_free_space(paths, est.requests)
    except BaseException:
        if stage is not None:
            stage.discard()
        if store is not None:
            store.close()
        lock.release()
        raise
    return RunPlan(checked=checked, mode=mode, url=url, api_key=key, paths=paths, store=store, ledger=ledger,
                   estimate=est, todo=todo, counted=counted, kept=kept, stage=stage, limit=limit,
                   retry_failed=retry_failed, fresh=fresh, lock=lock, set_aside=set_aside)


def settled_reader(store: OutcomeStore, job: Job, paths: OutputPaths, *, retry_failed: bool) -> Reader:
    """The journal's lookup of settled answers, without those no longer whole (an image file deleted or
    changed since): their rows are sent again rather than written to the output with a path to nothing."""
    reader = store.reader(retry_failed=retry_failed)
    whole = answer_columns(job, paths.output).whole
    return reader if whole is None else _WholeOnly(reader, whole)


class _WholeOnly:
    """A settled-answers lookup that passes only the answers ``whole`` accepts (failures pass as they are)."""

    def __init__(self, reader: Reader, whole: Callable[[Outcome], bool]) -> None:
        self._reader, self._whole = reader, whole

    def __call__(self, keys: Sequence[str]) -> dict[str, Outcome]:
        found = self._reader(keys)
        return {k: o for k, o in found.items() if o.status != "ok" or self._whole(o)}

    def close(self) -> None:
        self._reader.close()


def _refuse_lost_journal(paths: OutputPaths) -> None:
    """A new, empty journal beside an output that holds answers: the journal that recorded them is gone.

    Running on would pay for every one of those rows again, silently. Rebuilding the journal from the output
    was the other choice; it is refused instead because the output holds each answer's columns, not the exact
    request that was paid for (its key hashes the body), so a job changed since (a template, a parameter) would
    be matched to answers of other requests. The user chooses: restore the journal, or ``--fresh``."""
    if not paths.output.is_file():
        return
    answered = answered_rows(paths.output)
    if answered:
        raise JournalUnusable(
            f"{paths.journal}: missing or empty, but {paths.output} holds {answered:,} answered row(s) of this job; "
            "running now would pay for them again. Restore the journal if you can (a backup, or the file that "
            "was moved), or run with --fresh: it moves the output aside and pays for every row again")


def _with_batched_as_done(lookup: Reader, in_batches: set[int]) -> Callable[[list[str]], Mapping[str, Outcome]]:
    """The estimate's lookup, counting rows already in an open batch as done: they are paid for there."""
    def settled(keys: list[str]) -> dict[str, Outcome]:
        found = lookup(keys)
        found.update((k, IN_BATCH) for k in keys if k not in found and key_id(k) in in_batches)
        return found

    return settled


def _set_aside(paths: OutputPaths) -> list[Path]:
    """``--fresh``: the earlier output, its manifest and its journal are moved aside, never overwritten with
    nothing (a fresh run that stops at once would otherwise leave an empty table where answers were)."""
    stamp = datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    moved = [move_aside(p, stamp) for p in (paths.output, paths.manifest, paths.journal)]
    return [p for p in moved if p is not None]


def stop_reason_kind(e: PipelineError) -> str:
    """A short label for manifests: why the run ended early."""
    if isinstance(e, BudgetExceeded):
        return "budget"
    if isinstance(e, Interrupted):
        return "interrupted"
    return getattr(e, "kind", "aborted")


def stop_reason(e: PipelineError | None) -> dict[str, str] | None:
    """Why a run ended early, as plain values: the manifest's ``stop_reason``, and what a Ray task tells the
    driver (``stop_from`` reads it back)."""
    return None if e is None else {"kind": stop_reason_kind(e), "message": str(e)}


def stop_from(reason: dict[str, str]) -> PipelineError:
    """The stop a ``stop_reason`` describes, as the error that ends the run the same way (and exit status)."""
    kinds: dict[str, type[PipelineError]] = {"budget": BudgetExceeded, "interrupted": Interrupted}
    return kinds.get(reason["kind"], StopRun)(reason["message"])


@dataclass
class Ending:
    """How a runner left the run: its totals, why it stopped early (if it did), and the rows in the output."""

    stats: RunStats
    stopped: PipelineError | None
    rows: int
    status: str
    manifest: dict[str, Any] = field(default_factory=dict)  # what the runner adds to the manifest


def finish(plan: RunPlan, end: Ending) -> dict[str, Any]:
    """Write the manifest of a run, in either mode; returns it."""
    earlier = [] if plan.fresh else (read_manifest(plan.paths) or {}).get("runs") or []
    manifest = manifest_of(plan.job, url=plan.url, mode=plan.mode, status=end.status, stopped=end.stopped,
                           output=str(plan.paths.output), rows=end.rows, stats=end.stats, price=plan.checked.price,
                           started=plan.started, t0=plan.t0, journal=str(plan.paths.journal), earlier=earlier,
                           estimate=plan.estimate.to_dict(), extra=end.manifest)
    write_manifest(plan.paths, manifest)
    return manifest


def manifest_of(job: Job, *, url: str, mode: str, status: str, stopped: PipelineError | None, output: str,
                rows: int, stats: RunStats, price: Price | None, started: datetime, t0: float, journal: str,
                earlier: list[dict[str, Any]], estimate: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of a run, whichever engine ran it: what it did, its totals and errors, and every run of the
    output before it (newest last: what the HTML report charts). ``extra``: what the runner or engine adds
    (its ``totals`` are merged into the totals)."""
    finished = datetime.now(tz=UTC)
    totals = stats.totals()
    totals["cost_usd_this_run"] = round(totals["cost_usd_this_run"], 8)
    manifest: dict[str, Any] = {
        "job": job.name, "fingerprint": job.fingerprint(), "job_file": job.source, "status": status,
        "mode": mode,
        "stop_reason": stop_reason(stopped),
        "input": job.input.path, "output": output, "rows_in_output": rows,
        "provider": job.api.provider, "endpoint": job.request.endpoint, "model": job.request.model,
        "base_url": url,
        "started_at": started.isoformat(), "finished_at": finished.isoformat(),
        "duration_s": round(time.monotonic() - t0, 3),
        "totals": totals,
        "errors_by_type": dict(stats.errors),
        "price": price.describe() if price is not None else None,
        "price_basis": "Batch API" if mode == "batch" else "standard",
        **({"estimate": estimate} if estimate is not None else {}),
        "limits": {"concurrency": job.limits.concurrency, "requests_per_minute": job.limits.requests_per_minute,
                   "tokens_per_minute": job.limits.tokens_per_minute, "max_attempts": job.limits.max_attempts},
        "journal": journal,
    }
    for name, value in (extra or {}).items():
        if name == "totals":
            manifest["totals"].update(value)
        else:
            manifest[name] = value
    run: dict[str, Any] = {
        "started_at": manifest["started_at"], "finished_at": manifest["finished_at"],
        "duration_s": manifest["duration_s"], "mode": mode, "status": status,
        "totals": {k: manifest["totals"][k] for k in RUN_TOTALS}}
    if estimate is not None:  # a run with its own estimate pass (the local engine's) charts against it
        run["estimate"] = {k: estimate[k] for k in ("requests", "prompt_tokens", "max_output_tokens",
                                                    "expected_output_tokens", "cost_usd_max", "cost_usd_expected",
                                                    "batch_cost_usd_max", "batch_cost_usd_expected", "duration_s")}
        run["timeline"] = stats.timeline()
    manifest["runs"] = [*earlier[-(MAX_RUNS - 1):], run]
    return manifest
