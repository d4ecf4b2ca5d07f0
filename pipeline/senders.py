"""One sender per endpoint: what a request of that kind needs between the queue and the wire.

The scheduler hands a sender each request (``refuse``: can it ever be sent? ``add``: is a unit of work ready?),
then sends the units it closed (``send``) and records what comes back. A chat unit is one row, asked again when
its answer does not match the schema; an embeddings unit is many rows in one request, split in halves when the
API refuses it as a whole. What every sender shares (the rate budget, the retry policy and the shared pause
after a 429, the spend guard, the abort rule) is ``Sending``. A new endpoint is a new sender here; the scheduler
never asks what kind of request it holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from pipeline.breaker import Breaker
from pipeline.errors import AbortError, BudgetExceeded, PipelineError, ProviderError, RateLimited, RowError
from pipeline.job import RequestSpec
from pipeline.limits import RateBudget
from pipeline.outcome import (
    Outcome,
    Result,
    RunStats,
    VectorBlock,
    answered,
    embedding_outcome,
    failed,
    invalid_answer,
    split_tokens,
    too_large,
    unsendable_input,
)
from pipeline.pricing import Price, Usage
from pipeline.providers.base import Answer, Bodies, EmbeddingAnswer
from pipeline.render import Request
from pipeline.retry import RetryPolicy
from pipeline.structured import Checker
from pipeline.tokens import ChatTokenCounter

T = TypeVar("T", Answer, EmbeddingAnswer)
R = TypeVar("R")
ABORT_AFTER = 3  # systemic errors tolerated once some rows succeeded (a flaky 403 is not a verdict)

Sent = list[tuple[Sequence[Request], Result]]  # what a unit ended as: each result with the rows it answers


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

    def __init__(self, client: Any, budget: RateBudget, policy: RetryPolicy, stats: RunStats, stopper: Stopper, *,
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

    async def spending(self, prompt_tokens: int, completion_tokens: int, ask: Callable[[], Awaitable[R]]) -> R | None:
        """``ask()`` with the most it can cost held against ``max_cost_usd`` while it is in flight; None (and the
        run stops) when that could cross the budget: counting requests in flight at their maximum keeps the
        budget from being crossed by answers already on their way."""
        if self.max_cost_usd is None or self.price is None:
            return await ask()
        cost = self.price.cost(Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))
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


class ChatSender:
    """One row per request. With a response schema, an answer that is not valid JSON for it is asked again up
    to ``schema_retries`` times; every answer paid for is counted."""

    def __init__(self, sending: Sending, *, checker: Checker | None = None, schema_retries: int = 1,
                 counter: ChatTokenCounter | None = None) -> None:
        self.sending, self.checker, self.counter = sending, checker, counter
        self.rounds = 1 + (schema_retries if checker is not None else 0)

    def refuse(self, req: Request) -> Outcome | None:
        """A request larger than a minute of tokens can never be admitted."""
        budget = self.sending.budget
        if budget.fits(req.budget_tokens, req.max_output_tokens):
            return None
        return too_large(req.key, req.budget_tokens, budget.tpm or budget.itpm or budget.otpm)

    def add(self, req: Request) -> list[Request]:
        """Every request is a unit of its own."""
        return [req]

    def drain(self) -> None:
        """Nothing is ever held back."""
        return None

    async def send(self, unit: list[Request]) -> Sent:
        """Send one row's request to its final outcome."""
        req = unit[0]
        outcome = await self.sending.spending(req.prompt_tokens, req.max_output_tokens, lambda: self._ask(req))
        return [] if outcome is None else [(unit, outcome)]

    async def _ask(self, req: Request) -> Outcome | None:
        s, client = self.sending, self.sending.client
        attempts, rejected = 0, list[Usage]()
        outcome: Outcome | None = None
        for _ in range(self.rounds):
            got = await s.call(req.budget_tokens, lambda: client.chat(req.body), req.max_output_tokens)
            if got is None:
                return None
            attempts += got.attempts
            if got.answer is None:
                assert got.error is not None
                return failed(req.key, got.error, attempts=attempts)
            answer = got.answer if got.answer.usage is not None else self._counted(req, got.answer)
            outcome = answered(req.key, answer, s.price, attempts=attempts, latency_ms=got.latency_ms,
                               rejected=rejected)
            if self.checker is None or outcome.status != "ok":
                return outcome
            problem = self.checker.problem(got.answer.content, got.answer.tool_calls)
            if problem is None:
                return outcome
            if answer.usage is not None:
                rejected.append(answer.usage)
        assert outcome is not None and problem is not None
        return invalid_answer(outcome, problem)

    def _counted(self, req: Request, a: Answer) -> Answer:
        """An answer that came without usage (some compatible servers), with it counted by our tokenizer:
        the request's prompt count and the answer's tokens, marked estimated, never presented as billed."""
        if self.counter is None:
            return a
        completion = self.counter.count_text((a.content or a.refusal or "") + (a.tool_calls or ""))
        return replace(a, usage=Usage(prompt_tokens=req.prompt_tokens, completion_tokens=completion),
                       usage_estimated=True)


class EmbeddingsSender:
    """Many rows per request, up to ``batch_size`` inputs and ``batch_tokens`` tokens (and never more than a
    minute of the tokens limit). A request the API refuses as a whole (a 400) is split in halves and sent
    again, so only the row at fault fails, at the cost of a few extra requests for that batch alone."""

    def __init__(self, sending: Sending, spec: RequestSpec, *, group: Callable[[Sequence[bytes]], bytes],
                 dims: int | None) -> None:
        self.sending, self.spec, self.group, self.dims = sending, spec, group, dims
        self._batch: list[Request] = []
        self._tokens = 0

    def refuse(self, req: Request) -> Outcome | None:
        """An input too long for the model, or empty, fails alone before it joins a request."""
        return unsendable_input(req.key, req.prompt_tokens, self.spec.max_input_tokens)

    def add(self, req: Request) -> list[Request] | None:
        """Returns the batch this row closed, if it closed one (not a coroutine: it runs once per row)."""
        full = None
        tpm = self.sending.budget.token_cap
        cap = min(self.spec.batch_tokens, tpm or self.spec.batch_tokens)
        if self._batch and (len(self._batch) >= self.spec.batch_size or self._tokens + req.prompt_tokens > cap):
            full = self.drain()
        self._batch.append(req)
        self._tokens += req.prompt_tokens
        return full

    def drain(self) -> list[Request] | None:
        """The rows not yet in a request."""
        batch, self._batch, self._tokens = self._batch, [], 0
        return batch or None

    async def send(self, unit: list[Request]) -> Sent:
        """One request for many rows; usage and cost are shared by the rows' token counts."""
        s = self.sending
        tokens = sum(r.prompt_tokens for r in unit)
        got = await s.spending(tokens, 0, lambda: s.call(tokens, lambda: s.client.embed(
            self.group([r.body for r in unit]), len(unit))))
        if got is None:
            return []
        if got.answer is not None:
            return shared(unit, got.answer, s.price, self.dims, attempts=got.attempts, latency_ms=got.latency_ms)
        if isinstance(got.error, RowError) and len(unit) > 1:
            half = len(unit) // 2
            return [*await self.send(unit[:half]), *await self.send(unit[half:])]
        assert got.error is not None
        return [([r], failed(r.key, got.error, attempts=got.attempts)) for r in unit]


def shared(batch: Sequence[Request], a: EmbeddingAnswer, price: Price | None, dims: int | None, *,
           attempts: int, latency_ms: float) -> Sent:
    """An embeddings answer as the rows' results: the billed tokens split by the rows' own counts, one price
    for the request split like its tokens (embeddings have no tiers: cost is linear in tokens).

    The rows stay together as one ``VectorBlock`` (one journal record, one output append): per-row objects
    were most of the cost of a batched embeddings run. Rows whose vector has the wrong size fail one by one.
    """
    counts = np.fromiter((r.prompt_tokens for r in batch), dtype=np.float64, count=len(batch))
    shares = split_tokens(a.prompt_tokens, counts)
    batch_cost = None if price is None else price.cost(Usage(prompt_tokens=a.prompt_tokens))
    per_token = batch_cost / a.prompt_tokens if batch_cost is not None and a.prompt_tokens else 0.0
    costs = None if batch_cost is None else shares * per_token
    if dims is not None and any(len(v) != 4 * dims for v in a.vectors):
        return [([r], embedding_outcome(r.key, vec, dims, model=a.model, prompt_tokens=int(shares[i]),
                                        cost_usd=None if costs is None else float(costs[i]), attempts=attempts,
                                        latency_ms=latency_ms))
                for i, (r, vec) in enumerate(zip(batch, a.vectors, strict=True))]
    vectors = np.frombuffer(b"".join(a.vectors), dtype="<f4").reshape(len(batch), -1)
    block = VectorBlock(keys=[r.key for r in batch], vectors=vectors, prompt_tokens=shares, cost_usd=costs,
                        model=a.model, latency_ms=latency_ms, attempts=attempts)
    return [(batch, block)]


def sender_for(spec: RequestSpec, sending: Sending, *, bodies: Bodies, checker: Checker | None,
               dims: int | None, counter: ChatTokenCounter | None = None) -> Sender:
    """The sender of a job's endpoint (``[request].endpoint``); ``counter`` counts answers sent without usage."""
    if spec.endpoint == "embeddings":
        return EmbeddingsSender(sending, spec, group=bodies.group, dims=dims)
    return ChatSender(sending, checker=checker, schema_retries=spec.schema_retries, counter=counter)
