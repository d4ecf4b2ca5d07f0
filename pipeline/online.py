"""The online runner: a plan's requests sent now, through the scheduler and the job's sender.

A fresh run of a job small enough sends what its estimate rendered; otherwise rows are rendered again as they
are sent, the rows still to do first (so a resume starts sending at once), then the rows answered before, read
back from the journal into the output while those requests are in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from pipeline.errors import Interrupted, OutputError, PipelineError
from pipeline.execute import in_thread
from pipeline.interrupts import StopSignals
from pipeline.journal import NullJournal
from pipeline.keys import key_id
from pipeline.outcome import RunStats, skipped
from pipeline.plan import Ending, RunPlan
from pipeline.rendered import RenderedChunk
from pipeline.sink import PartWriter
from pipeline.source import iter_chunks
from pipeline.wiring import local_budget, wired

RUN_CHUNK_ROWS = 2_000  # small chunks keep the first request early and the producer thread's bursts short


def run_online(plan: RunPlan, *, transport: httpx.AsyncBaseTransport | None = None,
               on_progress: Callable[[RunStats], None] | None = None, signals: StopSignals | None = None,
               grace_s: float = 5.0, release_memory: bool = False) -> Ending:
    """Send what the plan has still to do; whatever ends the run, every row answered by any run of the job is
    in the output.

    ``signals`` (the CLI's): SIGINT/SIGTERM stop the scheduler while it runs, then let the output be written.
    ``release_memory`` (the caller owns the process: the CLI) lets the tokenizer go once nothing is left to
    count: a run that sends what its estimate rendered and counted needs it only for an answer without usage.
    """
    sink, key_of_row = plan.sink()
    if release_memory and plan.kept is not None and plan.kept.complete and plan.todo is None:
        from pipeline.tokens import release_encodings

        release_encodings()
    lookup = plan.settled_reader()
    stopped: PipelineError | None = None
    stats = RunStats(rows_total=plan.estimate.rows)

    async def main() -> None:
        nonlocal stopped
        lim = plan.job.limits
        async with wired(plan.checked, url=plan.url, api_key=plan.api_key, store=plan.store, sink=sink,
                         key_of_row=key_of_row, stats=stats, concurrency=lim.concurrency, grace_s=grace_s,
                         budget=local_budget(plan.checked), transport=transport, on_progress=on_progress) as w:
            scheduler, budget = w.scheduler, w.budget
            loop = asyncio.get_running_loop()
            if signals is not None:
                # A Python-level handler runs on this (the loop's) thread between two steps; the stop itself
                # is scheduled as a callback, so it never lands inside the loop's own bookkeeping.
                def interrupt(reason: Interrupted) -> None:
                    loop.call_soon_threadsafe(scheduler.interrupt, reason)

                signals.target = interrupt
                if signals.reason is not None:
                    scheduler.interrupt(signals.reason)
            try:
                stopped = await w.send(in_thread(chunks()))
            finally:
                if signals is not None:
                    signals.target, signals.deferring = None, True  # from here on: let the output be written
                seen.update(scheduler.seen)
                # The server's own limits (from its headers) where they were below the job's: the run was paced
                # by them, which the user should hear of (a 10 s estimate that took 31 s).
                for name, server in budget.server_limits.items():
                    job_limit = getattr(lim, name)
                    if job_limit is None or server < job_limit:
                        paced[name] = server

    def chunks() -> Iterator[RenderedChunk]:
        kept = plan.kept
        if kept is not None and kept.complete and plan.todo is None:
            yield from kept.take()
            return
        source, renderer = plan.checked.source, plan.checked.renderer
        phases = ([{}] if plan.todo is None else [{"rows": plan.todo}] if plan.only_todo
                  else [{"rows": plan.todo}, {"except_rows": plan.todo}])
        rows = renderer.chunk_rows(RUN_CHUNK_ROWS)
        for phase in phases:
            for c in iter_chunks(source, renderer.columns, chunk_rows=rows, limit=plan.limit, **phase):
                yield renderer.render_chunk(c, settled=lookup, counted=plan.counted)

    seen: set[int] = set()
    paced: dict[str, int] = {}
    ended_well = False
    try:
        asyncio.run(main())
        if stopped is not None:
            _fill_from_journal(plan, sink, key_of_row, stats, seen)
        ended_well = True
    except BaseException as e:
        if isinstance(e, OutputError):  # the journal could not commit (a full disk): answers first, output after
            _journal_what_arrived(plan, sink)
        if not isinstance(e, Interrupted | KeyboardInterrupt) and not sink.discarded:  # a second signal: leave now
            with contextlib.suppress(Exception):  # best effort: the output is never replaced by a smaller one
                _fill_from_journal(plan, sink, key_of_row, stats, seen)
        raise
    finally:
        lookup.close()
        rows = sink.finish(never_smaller=not ended_well or stopped is not None)
    if stopped is None and signals is not None and signals.reason is not None:
        stopped = signals.reason  # came while the output was written: it was let finish, then the run ends here
    return Ending(stats, stopped, rows, status="complete" if stopped is None else "stopped",
                  manifest={"paced_by_server_limits": paced} if paced else {})


def _journal_what_arrived(plan: RunPlan, sink: PartWriter) -> None:
    """A commit failed (a full disk): answers that arrived are still buffered in the journal's connection. The
    output's temporary file and parts are given up first when that is what it takes to commit them: the journal
    is what stops a rerun from paying again, and the next run writes the whole output from it."""
    try:
        plan.store.flush()
        return
    except OutputError:
        pass
    sink.discard()
    with contextlib.suppress(OutputError):  # still no room: those answers are lost (at most the commit's and
        plan.store.flush()                  # those in flight: twice the concurrency)


def _fill_from_journal(plan: RunPlan, sink: PartWriter, key_of_row: Callable[[Any], tuple[Any, ...]],
                       stats: RunStats, seen: set[int]) -> None:
    """A run that stopped before its end: the rows it did not reach go to the output from the journal, where
    any run answered them, so the output holds every answer, not only this run's (nothing is sent here).

    ``seen``: key ids of the requests the scheduler took; a row repeating one of them is a duplicate."""
    if plan.only_todo or isinstance(plan.store, NullJournal):
        return
    missing = sink.missing_rows(plan.estimate.rows)
    if not len(missing):
        return
    renderer, source = plan.checked.renderer, plan.checked.source
    reader = plan.store.reader(retry_failed=plan.retry_failed, any_outcome=True)
    try:
        for c in iter_chunks(source, renderer.columns, chunk_rows=renderer.chunk_rows(RUN_CHUNK_ROWS),
                             limit=plan.limit, rows=missing.tolist()):
            chunk = renderer.render_chunk(c, settled=reader, counted=plan.counted)
            for s in chunk.skipped:
                outcome = skipped(s.reason, s.error_type)
                sink.add(s.row, key_of_row(s), outcome)
                stats.count(outcome, deduplicated=False, resumed=False)
            for req in chunk.requests:
                settled = chunk.settled.get(req.key)
                if settled is None:
                    continue
                outcome = settled
                kid = key_id(req.key)
                duplicate = kid in seen
                seen.add(kid)
                sink.add(req.row, key_of_row(req), outcome, deduplicated=duplicate)
                stats.count(outcome, deduplicated=duplicate, resumed=not duplicate)
    finally:
        reader.close()
