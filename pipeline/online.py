"""The online runner: a plan's requests sent now, through the scheduler and the job's sender.

A fresh run of a job small enough sends what its estimate rendered; otherwise rows are rendered again as they
are sent, the rows still to do first (so a resume starts sending at once), then the rows answered before, read
back from the journal into the output while those requests are in flight.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator

import httpx

from pipeline.breaker import Breaker
from pipeline.client import ApiClient
from pipeline.errors import AbortError, Interrupted, PipelineError, StopRun
from pipeline.execute import Scheduler, in_thread
from pipeline.limits import RateBudget
from pipeline.outcome import RunStats
from pipeline.plan import Ending, RunPlan
from pipeline.render import RenderedChunk
from pipeline.retry import RetryPolicy
from pipeline.senders import Sending, sender_for
from pipeline.source import iter_chunks

RUN_CHUNK_ROWS = 2_000  # small chunks keep the first request early and the producer thread's bursts short


def run_online(plan: RunPlan, *, transport: httpx.AsyncBaseTransport | None = None,
               on_progress: Callable[[RunStats], None] | None = None, handle_signals: bool = False,
               grace_s: float = 5.0, release_memory: bool = False) -> Ending:
    """Send what the plan has still to do; whatever ends the run, what was answered is in the output.

    ``release_memory`` (the caller owns the process: the CLI) lets the tokenizer go once nothing is left to
    count: a run that sends what its estimate rendered and counted needs it only for an answer without usage.
    """
    sink, key_of_row = plan.sink()
    if release_memory and plan.kept is not None and plan.kept.complete and plan.todo is None:
        from pipeline.tokens import release_encodings

        release_encodings()
    lookup = plan.store.reader(retry_failed=plan.retry_failed)
    stopped: PipelineError | None = None
    stats = RunStats(rows_total=plan.estimate.rows)

    async def main() -> None:
        nonlocal stopped
        job, lim = plan.job, plan.job.limits
        async with ApiClient(plan.url, plan.api_key, provider=plan.checked.provider, timeout_s=lim.timeout_s,
                             concurrency=lim.concurrency, transport=transport) as client:
            scheduler = Scheduler(journal=plan.store, sink=sink, key_of_row=key_of_row, concurrency=lim.concurrency,
                                  grace_s=grace_s, stats=stats, on_progress=on_progress)
            budget = RateBudget(lim.requests_per_minute, lim.tokens_per_minute,
                                input_tokens_per_minute=lim.input_tokens_per_minute,
                                output_tokens_per_minute=lim.output_tokens_per_minute)
            sending = Sending(client, budget, RetryPolicy(lim.max_attempts), stats, scheduler,
                              price=plan.checked.price, max_cost_usd=job.budget.max_cost_usd,
                              breaker=Breaker(plan.checked.provider.hint))
            renderer = plan.checked.renderer
            sender = sender_for(job.request, sending, bodies=renderer.bodies, checker=sink.checker,
                                dims=sink.embedding_dims, counter=renderer.counter)
            loop = asyncio.get_running_loop()
            before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
            if handle_signals:
                for sig in before:
                    loop.add_signal_handler(sig, scheduler.interrupt, Interrupted(f"stopped by {sig.name}"))
            try:
                await scheduler.run(in_thread(chunks()), sender)
            except (StopRun, AbortError) as e:
                stopped = e
            finally:
                if handle_signals:
                    for sig, handler in before.items():  # asyncio would put back the defaults, not these
                        loop.remove_signal_handler(sig)
                        signal.signal(sig, handler)

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

    try:
        asyncio.run(main())
    finally:
        lookup.close()
        rows = sink.finish()
    return Ending(stats, stopped, rows, status="complete" if stopped is None else "stopped")
