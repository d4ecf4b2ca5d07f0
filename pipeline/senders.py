"""What every sender shares between the queue and the wire, and what the scheduler needs of one.

The scheduler hands a sender each request (``refuse``: can it ever be sent? ``add``: is a unit of work ready?),
then sends the units it closed (``send``) and records what comes back. Each endpoint has its own sender
(``pipeline.endpoints``: a chat unit is one row, an embeddings unit many rows in one request); what they all
share (the rate budget, the retry policy and the shared pause after a 429, the spend guard, the abort rule) is
``Sending``. The scheduler never asks what kind of request it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from pipeline.breaker import Breaker
from pipeline.errors import AbortError, BudgetExceeded, PipelineError, ProviderError, RateLimited
from pipeline.limits import RateBudget
from pipeline.outcome import Outcome, Result, RunStats
from pipeline.pricing import Price, Usage
from pipeline.rates import RateInfo
from pipeline.retry import RetryPolicy

if TYPE_CHECKING:
    from pipeline.client import ApiClient
    from pipeline.rendered import Request

class Answered(Protocol):
    """What ``Sending.call`` reads of any answer: the server's rate-limit readings."""

    @property
    def rate(self) -> RateInfo: ...


T = TypeVar("T", bound=Answered)
R = TypeVar("R")
ABORT_AFTER = 3  # systemic errors tolerated once some rows succeeded (a flaky 403 is not a verdict)

Sent = list[tuple[Sequence["Request"], Result]]  # what a unit ended as: each result with the rows it answers


class Sender(Protocol):
    """What the scheduler needs of an endpoint."""

    def refuse(self, req: Request) -> Outcome | None:
        """The failed outcome of a request that can never be sent (too large, empty); None when it can."""
        ...

    def add(self, req: Request) -> list[Request] | None:
        """Take one request; returns a unit of work when one is ready to send."""
        ...

    def drain(self) -> list[Request] | None:
        """The last, partial unit at the end of the input."""
        ...

    async def send(self, unit: list[Request]) -> Sent:
        """Send a unit to its final results; rows left out were not sent (the run is stopping)."""
        ...


class Stopper(Protocol):
    """The scheduler's side of stopping, as a sender sees it."""

    stopping: asyncio.Event

    def request_stop(self, reason: PipelineError | None = None) -> None: ...


@dataclass(frozen=True, slots=True)
class Called(Generic[T]):
    """A request's last try: its answer (or the error that ended the retries), after how many tries."""

    attempts: int
    answer: T | None = None
    latency_ms: float = 0.0
    error: ProviderError | None = None


class Sending:
    """What every sender shares: a call under the limits and the retry policy, and the spend guard.

    A 429 pauses every worker until the server's ``retry-after`` (its budget is gone for all of us), and the
    server's rate-limit readings correct the local budget. A systemic error (bad key, unknown model, no
    quota) stops the run at once if nothing has succeeded yet, else on the ``ABORT_AFTER``-th. The
    ``breaker`` (when given) stops a run whose server refuses every request's shape, and holds every worker
    while the endpoint is down. Time is injected: ``sleep`` waits between retries, ``clock`` times each request.
    """

    def __init__(self, client: ApiClient, budget: RateBudget, policy: RetryPolicy, stats: RunStats, stopper: Stopper, *,
                 price: Price | None = None, max_cost_usd: float | None = None, breaker: Breaker | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.client, self.budget, self.policy, self.stats = client, budget, policy, stats
        self.stopper, self.price, self.max_cost_usd = stopper, price, max_cost_usd
        self.breaker = breaker
        self._sleep, self._clock = sleep, clock
        self._reserved = 0.0
        self._aborts = 0

    def _retrying(self, _state: Any) -> None:
        self.stats.retries += 1

    async def call(self, tokens: int, send: Callable[[], Awaitable[T]], output_tokens: int = 0) -> Called[T] | None:
        """Send until an answer comes back or the retry policy gives up (the error is in the result).
        None when the run stopped before an answer, or a systemic error stops it. ``tokens`` is what the
        request charges against the tokens limit at admission, ``output_tokens`` of it its output cap."""
        attempts = 0
        stopping = self.stopper.stopping
        breaker = self.breaker
        ticket: Any = None
        t0 = 0.0

        async def attempt() -> T | None:
            nonlocal attempts, ticket, t0
            if stopping.is_set() and attempts:
                return None
            probe = await breaker.admit(not attempts) if breaker is not None else False
            attempts += 1
            if breaker is not None and stopping.is_set():  # stopped while it waited for its turn
                breaker.release(probe)
                return None
            ticket = None
            try:
                ticket = await self.budget.acquire(tokens, output_tokens)
                t0 = self._clock()
                self.stats.tick()
                self.stats.requests_sent += 1
                answer = await send()
            except ProviderError as e:
                if breaker is not None:
                    breaker.record(probe, e)
                    refused = breaker.refused(e) if attempts == 1 else None
                    if refused is not None:
                        raise refused from None
                if e.rate is not None:
                    self.budget.observe(e.rate, rate_limited=isinstance(e, RateLimited), ticket=ticket)
                if isinstance(e, RateLimited):
                    self.stats.rate_limited += 1
                    self.budget.pause(e.retry_after if e.retry_after is not None else 1.0)
                raise
            except BaseException:  # cancelled (the run is stopping): it taught nothing
                if breaker is not None:
                    breaker.release(probe)
                raise
            if breaker is not None:
                breaker.record(probe, None)
            return answer

        try:
            answer = await self.policy.call(attempt, self._sleep, before_sleep=self._retrying)
        except AbortError as e:
            self._aborted(e)
            return None
        except ProviderError as e:  # transient trouble that outlasted the retries, or this row's own fault
            return Called(attempts, error=e)
        finally:
            if breaker is not None and attempts:
                breaker.end()
        if answer is None:
            return None
        self.budget.observe(answer.rate, ticket=ticket)
        return Called(attempts, answer, (self._clock() - t0) * 1000)

    def _aborted(self, e: AbortError) -> None:
        self._aborts += 1
        if self.stats.ok == 0 or self._aborts >= ABORT_AFTER:
            self.stopper.request_stop(e)

    async def spending(self, prompt_tokens: int, completion_tokens: int, ask: Callable[[], Awaitable[R]], *,
                       units: float = 0.0) -> R | None:
        """``ask()`` with the most it can cost held against ``max_cost_usd`` while it is in flight; None (and the
        run stops) when that could cross the budget: counting requests in flight at their maximum keeps the
        budget from being crossed by answers already on their way."""
        if self.max_cost_usd is None or self.price is None:
            return await ask()
        cost = self.price.cost(Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, units=units))
        if self.stats.cost_usd + self._reserved + cost > self.max_cost_usd:
            self.stopper.request_stop(BudgetExceeded(
                f"stopped before crossing [budget].max_cost_usd = ${self.max_cost_usd:g}: spent "
                f"${self.stats.cost_usd:.4f} so far, with ${self._reserved:.4f} more in flight"))
            return None
        self._reserved += cost
        try:
            return await ask()
        finally:  # what it really cost is in the stats now
            self._reserved -= cost

