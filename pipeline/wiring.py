"""One run's wiring, for every engine: the HTTP client, the scheduler, the rate budget, the shared sending
machinery (retries, the spend guard, the breaker) and the endpoint's sender, built in one place over a checked
job. The local runner and a Ray task differ only in what they hand it: where answers are journaled and written,
the concurrency, and the rate budget (the local one, or a share leased from the cluster's)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx

from pipeline.breaker import Breaker
from pipeline.client import ApiClient
from pipeline.errors import AbortError, PipelineError, StopRun
from pipeline.execute import Scheduler
from pipeline.limits import RateBudget
from pipeline.outcome import RunStats
from pipeline.retry import RetryPolicy
from pipeline.senders import Sender, Sending

if TYPE_CHECKING:
    from pipeline.journal import OutcomeStore
    from pipeline.plan import Checked
    from pipeline.rendered import RenderedChunk


@dataclass(frozen=True)
class Wired:
    """The pieces of one run, once built."""

    scheduler: Scheduler
    budget: RateBudget
    sending: Sending
    sender: Sender

    async def send(self, chunks: AsyncIterator[RenderedChunk]) -> PipelineError | None:
        """Send every request of ``chunks``; returns why the run stopped early (None: it did not)."""
        try:
            await self.scheduler.run(chunks, self.sender)
        except (StopRun, AbortError) as e:
            return e
        return None


def local_budget(checked: Checked) -> Callable[[Scheduler], RateBudget]:
    """The job's own limits, kept by this process."""
    lim = checked.job.limits

    def budget(_scheduler: Scheduler) -> RateBudget:
        return RateBudget(lim.requests_per_minute, lim.tokens_per_minute,
                          input_tokens_per_minute=lim.input_tokens_per_minute,
                          output_tokens_per_minute=lim.output_tokens_per_minute)
    return budget


@asynccontextmanager
async def wired(checked: Checked, *, url: str, api_key: str | None, store: OutcomeStore, sink: Any,
                key_of_row: Callable[[Any], tuple[Any, ...]], stats: RunStats, concurrency: int, grace_s: float,
                budget: Callable[[Scheduler], RateBudget], transport: httpx.AsyncBaseTransport | None = None,
                on_progress: Callable[[RunStats], None] | None = None) -> AsyncIterator[Wired]:
    """A run's pieces over an open HTTP client (closed on leaving). ``sink`` is where committed answers go
    (a ``ResultSink`` with the writer's ``checker``); ``budget`` builds the rate budget once
    the scheduler exists (a leased budget stops it when the cluster's spend runs out)."""
    job, lim = checked.job, checked.job.limits
    async with ApiClient(url, api_key, provider=checked.provider, timeout_s=lim.timeout_s,
                         concurrency=concurrency, transport=transport) as client:
        scheduler = Scheduler(journal=store, sink=sink, key_of_row=key_of_row, concurrency=concurrency,
                              grace_s=grace_s, stats=stats, on_progress=on_progress)
        rates = budget(scheduler)
        sending = Sending(client, rates, RetryPolicy(lim.max_attempts), stats, scheduler, price=checked.price,
                          max_cost_usd=job.budget.max_cost_usd, breaker=Breaker(checked.provider.hint))
        renderer = checked.renderer
        sender = renderer.endpoint.sender(sending, job.request, codec=renderer.codec, checker=sink.checker,
                                          counter=renderer.counter)
        yield Wired(scheduler, rates, sending, sender)
