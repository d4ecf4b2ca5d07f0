"""One partition run by the local engine's own machinery: the same scheduler, senders, client and retries.

What differs from a local run is only where things are kept: the rate comes from the cluster's leases
(``LeasedBudget``), answers go to committed chunks of the output dataset (``ChunkSink``) instead of the driver's
journal and file, and a temporary journal on the task's own disk serves what a journal does inside a run (an
identical row waiting for its twin's answer). The API key is read from the task's own environment, so it never
travels with the task.

Nothing here knows Ray: ``engines/ray.py`` calls ``run_partition`` in a Ray task with the actor's methods as
``ask`` and ``tell``; tests call it with a ``GlobalBudget`` directly.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pipeline.access import resolve_api_key
from pipeline.engines.budget import Ask, LeasedBudget, Report, Tell
from pipeline.engines.commit import ChunkSink, committed, covered
from pipeline.engines.partitions import Partition, iter_partition
from pipeline.errors import BudgetExceeded, PipelineError
from pipeline.execute import Scheduler, in_thread
from pipeline.job import Job
from pipeline.journal import Journal
from pipeline.outcome import RunStats
from pipeline.plan import check, key_function, output_writer, stop_reason
from pipeline.senders import Sending
from pipeline.sink import OutputPaths
from pipeline.source import open_source
from pipeline.wiring import wired


@dataclass(frozen=True)
class TaskSpec:
    """What a task needs besides the budget: the job, its slice, where answers go, and its share of the cap."""

    job: Job
    partition: Partition
    dataset: str
    url: str
    concurrency: int
    worker: str
    workers: int = 1            # tasks at once: Anthropic's input and output token limits are split among them
    grace_s: float = 5.0
    # Put in front of the task's sink (it sees every committed answer): a test's fault injection, such as a
    # worker killed after N rows; must pickle for Ray.
    sink_wrapper: Callable[[ChunkSink], Any] | None = None


def run_partition(spec: TaskSpec, ask: Ask, tell: Tell, *,
                  transport: httpx.AsyncBaseTransport | None = None) -> dict[str, Any]:
    """Run what is left of one partition; returns its totals, errors and how it ended (never raises for a stop:
    the driver decides what a stop means for the run)."""
    job, part = spec.job, spec.partition
    done = committed(spec.dataset, job.storage.endpoint_url).get(part.id, [])
    result: dict[str, Any] = {"partition": part.id, "rows": part.rows, "committed_before": covered(done),
                              "committed": 0, "chunks": 0, "totals": RunStats().totals(), "errors": {},
                              "stopped": None, "leases": 0}
    if covered(done) >= part.rows:
        return result
    # Checked against this partition's file only: its schema is read, not every file's of the input.
    checked = check(job, open_source(part.file, job.storage.endpoint_url))
    key = resolve_api_key(job, spec.url)
    scratch = Path(tempfile.mkdtemp(prefix=f"pipeline-task-{part.id}-"))
    stats = RunStats(rows_total=part.rows - covered(done))
    frame = output_writer(checked, OutputPaths(scratch / "chunk.parquet"), stage=False)
    sink = ChunkSink(frame, dataset=spec.dataset, partition=part.id, row_start=part.row_start, rows=part.rows,
                     done=done, commit_rows=job.engine.commit_rows, endpoint_url=job.storage.endpoint_url)
    journal = Journal(scratch / "task.journal.sqlite")
    stopped: PipelineError | None = None

    async def main() -> None:
        nonlocal stopped
        lim = job.limits
        sending: list[Sending] = []  # once built: the cluster's spend share caps its guard
        budgets: list[LeasedBudget] = []

        def share(left: float | None) -> None:
            if sending and left is not None:
                sending[0].max_cost_usd = left

        def leased(scheduler: Scheduler) -> LeasedBudget:
            budget = LeasedBudget(
                lim.requests_per_minute, lim.tokens_per_minute, ask=ask, tell=tell,
                report=lambda: Report(stats.requests_sent, stats.requests_sent - stats.rate_limited,
                                      stats.rate_limited, stats.cost_usd),
                on_stop=lambda reason: scheduler.request_stop(BudgetExceeded(reason)), on_spend_share=share,
                input_tokens_per_minute=_share(lim.input_tokens_per_minute, spec.workers),
                output_tokens_per_minute=_share(lim.output_tokens_per_minute, spec.workers))
            # What may ever fit is the whole limit's question, not the share's (the buckets hold the share).
            budget.itpm, budget.otpm = lim.input_tokens_per_minute, lim.output_tokens_per_minute
            budgets.append(budget)
            return budget

        watched: Any = sink if spec.sink_wrapper is None else spec.sink_wrapper(sink)
        async with wired(checked, url=spec.url, api_key=key, store=journal, sink=watched,
                         key_of_row=key_function(job), stats=stats, concurrency=spec.concurrency,
                         grace_s=spec.grace_s, budget=leased, transport=transport) as w:
            sending.append(w.sending)
            renderer = checked.renderer
            lookup = journal.reader()

            def chunks() -> Any:
                rows = min(renderer.chunk_rows(job.engine.commit_rows), job.engine.commit_rows)
                for c in iter_partition(checked.source, part, renderer.columns, chunk_rows=rows, skip=done):
                    yield renderer.render_chunk(c, settled=lookup)

            try:
                stopped = await w.send(in_thread(chunks()))
            finally:
                lookup.close()
                result["leases"] = budgets[0].leases

    try:
        asyncio.run(main())
    finally:
        journal.close()
        sink.finish()
        shutil.rmtree(scratch, ignore_errors=True)
    result.update(committed=sink.rows_committed, chunks=sink.chunks, totals=stats.totals(),
                  errors=dict(stats.errors))
    if stopped is not None:
        result["stopped"] = stop_reason(stopped)
    return result


def _share(per_minute: int | None, workers: int) -> int | None:
    """A static share of a limit the global budget does not lease (Anthropic's input and output tokens)."""
    return None if per_minute is None else max(1, per_minute // max(1, workers))
