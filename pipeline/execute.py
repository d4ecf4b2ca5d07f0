"""The async loop: rendered requests in, outcomes out, as fast as the limits allow and no faster.

One producer renders input chunks (in a thread, so the event loop stays responsive) and feeds a bounded queue;
``concurrency`` workers take requests from it, wait for the rate budget, send, and retry what can be retried.
Before a request is queued, the journal is asked whether its key was answered already (resume) and the
in-flight table whether an identical request is on its way (dedup): either way the row waits for that answer
instead of paying again. Every outcome goes to the journal before its rows go to the output.

Stopping is cooperative: ``request_stop`` (Ctrl-C, SIGTERM, the budget) stops taking new work and gives the
requests in flight a grace period; a second request, or the end of the grace period, cancels them. A systemic
error (bad key, unknown model, no quota) stops the run the same way, rather than failing every row.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import numpy as np
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_random_exponential

from pipeline.client import Answer, ApiClient, EmbeddingAnswer, RateInfo, wait_server_hint
from pipeline.errors import AbortError, BudgetExceeded, Interrupted, PipelineError, RowError, StopRun, TransientError
from pipeline.job import RequestSpec
from pipeline.journal import Journal, Outcome, VectorBlock, embedding_row
from pipeline.limits import RateBudget
from pipeline.pricing import Price, Usage
from pipeline.render import RenderedChunk, Request, embeddings_batch_body
from pipeline.sink import PartWriter
from pipeline.structured import AnswerChecker

T = TypeVar("T")
ABORT_AFTER = 3          # systemic errors tolerated once some rows succeeded (a flaky 403 is not a verdict)
PROGRESS_EVERY_S = 0.5


@dataclass
class RunStats:
    """Live totals of a run, passed to the progress callback and written to the manifest."""

    rows_total: int = 0
    rows_done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0                   # Batch API mode: rows still waiting in a batch at the provider
    resumed: int = 0
    deduplicated: int = 0
    requests_sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def spend(self, outcome: Outcome) -> None:
        """What an answer received in this run cost: its tokens and dollars."""
        self.cost_usd += outcome.cost_usd or 0.0
        self.prompt_tokens += outcome.prompt_tokens or 0
        self.completion_tokens += outcome.completion_tokens or 0
        self.cached_tokens += outcome.cached_tokens or 0
        self.reasoning_tokens += outcome.reasoning_tokens or 0

    def spend_block(self, block: VectorBlock) -> None:
        """What one embeddings request received in this run cost."""
        if block.cost_usd is not None:
            self.cost_usd += float(block.cost_usd.sum())
        self.prompt_tokens += int(block.prompt_tokens.sum())

    def count(self, outcome: Outcome, *, deduplicated: bool = False, resumed: bool = False) -> None:
        """One row written to the output with ``outcome`` (either mode counts rows the same way)."""
        self.rows_done += 1
        if outcome.status == "ok":
            self.ok += 1
        else:
            self.failed += 1
            self.errors[outcome.error_type or "error"] += 1
        if deduplicated:
            self.deduplicated += 1
        elif resumed:
            self.resumed += 1


def retry_policy(max_attempts: int, sleep: Callable[[float], Any] = asyncio.sleep) -> AsyncRetrying:
    """The one retry policy: transient errors only, up to ``max_attempts`` tries, honouring retry-after."""
    return AsyncRetrying(stop=stop_after_attempt(max_attempts),
                         wait=wait_server_hint(wait_random_exponential(multiplier=0.5, max=30)),
                         retry=retry_if_exception_type(TransientError), reraise=True, sleep=sleep)


Sent = list[tuple[Request, Outcome | None] | tuple[list[Request], VectorBlock]]  # what a batch request ends as


@dataclass(slots=True)
class _Pending:
    """A request on its way, and the rows waiting for its answer (more than one when rows are identical)."""

    request: Request
    followers: list[Request]


class Executor:
    """Runs one job's requests; owns nothing it did not get (client, budget, journal and sink are given)."""

    def __init__(self, *, client: ApiClient, budget: RateBudget, journal: Journal, sink: PartWriter,
                 price: Price | None, max_attempts: int, concurrency: int, key_of_row: Callable[[Request], tuple],
                 max_cost_usd: float | None = None, retry_failed: bool = False, grace_s: float = 5.0,
                 checker: AnswerChecker | None = None, schema_retries: int = 1,
                 embeddings: RequestSpec | None = None, embedding_dims: int | None = None,
                 on_progress: Callable[[RunStats], None] | None = None) -> None:
        self.client, self.budget, self.journal, self.sink = client, budget, journal, sink
        self.price, self.max_attempts, self.concurrency = price, max_attempts, concurrency
        self.key_of_row = key_of_row
        self.max_cost_usd, self.retry_failed, self.grace_s = max_cost_usd, retry_failed, grace_s
        self.on_progress = on_progress
        self.checker, self.schema_retries = checker, schema_retries
        self.embeddings, self.embedding_dims = embeddings, embedding_dims
        self._batch: list[Request] = []
        self._batch_tokens = 0
        self.stats = RunStats()
        self._pending: dict[str, _Pending] = {}
        self._seen: set[int] = set()
        self._queue: asyncio.Queue[Request | list[Request] | None] = asyncio.Queue(maxsize=max(2 * concurrency, 64))
        self._stopping = asyncio.Event()
        self._stop_reason: PipelineError | None = None
        self._abort_count = 0
        self._reserved = 0.0
        self._flush_scheduled = False
        self._ready: list[tuple[str, Outcome]] = []
        self._ready_blocks: list[tuple[list[Request], VectorBlock]] = []
        self._workers: list[asyncio.Task[None]] = []

    # -- control ----------------------------------------------------------------------------------------------

    def request_stop(self, reason: PipelineError | None = None) -> None:
        """Stop taking new work; the requests in flight get ``grace_s`` to finish. The first reason wins."""
        if self._stopping.is_set():
            return
        self._stop_reason = reason or Interrupted("interrupted")
        self._stopping.set()

    def interrupt(self, reason: PipelineError) -> None:
        """A signal: the first stops taking work, a second cancels the requests in flight at once."""
        if self._stopping.is_set():
            for t in self._workers:
                t.cancel()
            return
        self.request_stop(reason)

    # -- the run ----------------------------------------------------------------------------------------------

    async def run(self, chunks: Iterator[RenderedChunk]) -> RunStats:
        """Send everything ``chunks`` yields; returns the totals, or raises the StopRun/AbortError that ended it."""
        ticker = asyncio.create_task(self._tick()) if self.on_progress else None
        self._workers = [asyncio.create_task(self._worker()) for _ in range(self.concurrency)]
        producer = asyncio.create_task(self._produce(chunks))
        try:
            await self._supervise(producer)
        finally:
            for t in (*self._workers, producer):
                t.cancel()
            await asyncio.gather(*self._workers, producer, return_exceptions=True)
            self._flush()
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                self.on_progress(self.stats)  # type: ignore[misc]
        if self._stop_reason is not None:
            raise self._stop_reason
        return self.stats

    async def _supervise(self, producer: asyncio.Task[None]) -> None:
        stop_wait = asyncio.create_task(self._stopping.wait())
        pending: set[asyncio.Task[Any]] = {producer, *self._workers}
        try:
            while pending - {producer} and not self._stopping.is_set():
                done, _ = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                for t in done - {stop_wait}:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            if self._stopping.is_set():
                # Stopping: no new work; the requests in flight get their grace period, then are cancelled.
                producer.cancel()
                workers = pending - {producer}
                if workers:
                    await asyncio.wait(workers, timeout=self.grace_s)
        finally:
            stop_wait.cancel()

    async def _produce(self, chunks: Iterator[RenderedChunk]) -> None:
        end = object()
        while not self._stopping.is_set():
            chunk = await asyncio.to_thread(next, chunks, end)
            if chunk is end:
                break
            assert isinstance(chunk, RenderedChunk)
            for s in chunk.skipped:
                self.sink.add(s.row, self.key_of_row(s), None, skipped=s.reason)  # type: ignore[arg-type]
                self.stats.skipped += 1
                self.stats.rows_done += 1
            settled = chunk.settled  # looked up in the journal by the renderer, off the event loop
            stopping, seen, in_flight = self._stopping, self._seen, self._pending  # per row: locals
            for req in chunk.requests:
                if stopping.is_set():
                    return
                key = req.key
                seen_id = int(key[:16], 16)  # 64 bits of the key: a third of the memory of the string
                first = seen_id not in seen
                seen.add(seen_id)
                if key in in_flight:
                    in_flight[key].followers.append(req)
                    continue
                outcome = settled.get(key)
                if outcome is None and not first:
                    # An identical row's request finished while this chunk was being queued.
                    self._flush()
                    outcome = self.journal.get(key)
                if outcome is not None:
                    self._emit(req, outcome, deduplicated=not first, resumed=first)
                    continue
                in_flight[key] = _Pending(req, [])
                if self.embeddings is None:
                    await self._queue.put(req)
                elif (full := self._add_to_batch(req)) is not None:
                    await self._queue.put(full)
        if self._batch and not self._stopping.is_set():
            await self._queue.put(self._take_batch())
        for _ in self._workers:
            await self._queue.put(None)

    def _add_to_batch(self, req: Request) -> list[Request] | None:
        """Embeddings: rows travel in batches of up to batch_size inputs and batch_tokens tokens. Returns the
        batch this row closed, if it closed one (not a coroutine: it runs once per row)."""
        spec = self.embeddings
        assert spec is not None
        refused = unsendable_input(req, spec)
        if refused is not None:
            self._complete(req.key, refused)
            return None
        full = None
        cap = min(spec.batch_tokens, self.budget.tpm or spec.batch_tokens)
        if self._batch and (len(self._batch) >= spec.batch_size or self._batch_tokens + req.prompt_tokens > cap):
            full = self._take_batch()
        self._batch.append(req)
        self._batch_tokens += req.prompt_tokens
        return full

    def _take_batch(self) -> list[Request]:
        batch, self._batch, self._batch_tokens = self._batch, [], 0
        return batch

    async def _worker(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None or self._stopping.is_set():
                return
            self.stats.in_flight += 1
            try:
                results: Sent = (await self._send_batch(item) if isinstance(item, list)
                                 else [(item, await self._send(item))])
            finally:
                self.stats.in_flight -= 1
            for sent, outcome in results:
                if isinstance(outcome, VectorBlock):
                    self._complete_block(sent, outcome)  # type: ignore[arg-type]
                elif outcome is not None:
                    self._complete(sent.key, outcome)  # type: ignore[union-attr]

    async def _send_batch(self, batch: list[Request]) -> Sent:
        """One embeddings request for many rows; usage and cost are shared by the rows' token counts.

        A batch the API refuses as a whole (a 400) is split in halves and retried, so only the row at fault
        fails, at a cost of a few extra requests for that batch alone.
        """
        tokens = sum(r.prompt_tokens for r in batch)
        reserve = self._input_cost(tokens) if self.max_cost_usd is not None else None
        if not self._reserve(reserve):
            return [(r, None) for r in batch]
        body = embeddings_batch_body([r.body for r in batch])
        attempts = [0]
        try:
            got = await self._call(tokens, lambda: self.client.embed(body, len(batch)), attempts)
            if got is None:
                return [(r, None) for r in batch]
            answer, latency_ms = got
            return self._shared(batch, answer, attempts[0], latency_ms)
        except TransientError as e:
            self.stats.retries -= 1
            return [(r, Outcome(r.key, "error", attempts=attempts[0], error=str(e), error_type=e.kind,
                                retryable=True)) for r in batch]
        except RowError as e:
            if len(batch) == 1:
                return [(batch[0], Outcome(batch[0].key, "error", attempts=attempts[0], error=str(e),
                                           error_type=e.kind))]
            half = len(batch) // 2
            return [*await self._send_batch(batch[:half]), *await self._send_batch(batch[half:])]
        except AbortError as e:
            self._aborted(e)
            return [(r, None) for r in batch]
        finally:
            if reserve is not None:
                self._reserved -= reserve

    def _input_cost(self, tokens: int) -> float | None:
        return None if self.price is None else self.price.cost(Usage(prompt_tokens=tokens))

    def _shared(self, batch: list[Request], a: EmbeddingAnswer, attempts: int, latency_ms: float) -> Sent:
        """Split the billed tokens over the rows by their own counts (largest remainder: the parts sum up).

        The rows stay together as one ``VectorBlock`` (one journal record, one output append): per-row objects
        were most of the cost of a batched embeddings run.
        """
        self.budget.observe(a.rate)
        counts = np.fromiter((r.prompt_tokens for r in batch), dtype=np.float64, count=len(batch))
        exact = a.prompt_tokens * counts / (counts.sum() or 1)
        shares = exact.astype(np.int64)
        short = a.prompt_tokens - int(shares.sum())
        if short > 0:  # the largest fractions get the tokens left over; ties in row order
            shares[np.argsort(-(exact - shares), kind="stable")[:short]] += 1
        # One price for the request, split like its tokens (embeddings have no tiers: cost is linear in tokens).
        batch_cost = self._input_cost(a.prompt_tokens)
        per_token = batch_cost / a.prompt_tokens if batch_cost is not None and a.prompt_tokens else 0.0
        costs = None if batch_cost is None else shares * per_token
        dims = self.embedding_dims
        if dims is not None and any(len(v) != 4 * dims for v in a.vectors):  # row by row, to fail the wrong ones
            return [(r, embedding_outcome(r.key, vec, dims, model=a.model, prompt_tokens=int(shares[i]),
                                          cost_usd=None if costs is None else float(costs[i]), attempts=attempts,
                                          latency_ms=latency_ms))
                    for i, (r, vec) in enumerate(zip(batch, a.vectors, strict=True))]
        vectors = np.frombuffer(b"".join(a.vectors), dtype="<f4").reshape(len(batch), -1)
        block = VectorBlock(keys=[r.key for r in batch], vectors=vectors, prompt_tokens=shares, cost_usd=costs,
                            model=a.model, latency_ms=latency_ms, attempts=attempts)
        return [(batch, block)]

    async def _send(self, req: Request) -> Outcome | None:
        """One row's request to its final outcome; None when the run is stopping and it was not sent.

        Transient failures are retried by the retry policy. With a response schema, an answer that is not
        valid JSON for it is asked again up to ``schema_retries`` times; every answer paid for is counted.
        """
        if not self.budget.fits(req.budget_tokens):
            return Outcome(req.key, "error", error=f"the request needs {req.budget_tokens} tokens, more than "
                           f"tokens_per_minute ({self.budget.tpm}): it can never be admitted",
                           error_type="too_large")
        reserve = self._max_cost(req) if self.max_cost_usd is not None else None
        if not self._reserve(reserve):
            return None
        attempts = [0]
        rejected: list[Usage] = []
        try:
            rounds = 1 + (self.schema_retries if self.checker is not None else 0)
            for _ in range(rounds):
                got = await self._call(req.budget_tokens, lambda: self.client.chat(req.body), attempts)
                if got is None:
                    return None
                answer, latency_ms = got
                outcome = self._answered(req, answer, attempts[0], latency_ms, rejected)
                if self.checker is None or outcome.status != "ok":
                    return outcome
                problem = self.checker.problem(answer.content)
                if problem is None:
                    return outcome
                rejected.append(answer.usage)
            return replace(outcome, status="error", error=problem, error_type="invalid_answer")
        except TransientError as e:
            self.stats.retries -= 1  # the last try was not followed by a retry
            return Outcome(req.key, "error", attempts=attempts[0], error=str(e), error_type=e.kind, retryable=True)
        except RowError as e:
            return Outcome(req.key, "error", attempts=attempts[0], error=str(e), error_type=e.kind)
        except AbortError as e:
            self._aborted(e)
            return None
        finally:
            if reserve is not None:
                self._reserved -= reserve

    async def _call(self, tokens: int, send: Callable[[], Awaitable[T]],
                    attempts: list[int]) -> tuple[T, float] | None:
        """Send until an answer comes back or the retry policy gives up (then its error propagates)."""
        async for attempt in retry_policy(self.max_attempts):
            with attempt:
                if self._stopping.is_set() and attempts[0]:
                    return None
                attempts[0] += 1
                await self.budget.acquire(tokens)
                t0 = time.perf_counter()
                self.stats.requests_sent += 1
                try:
                    answer = await send()
                except TransientError as e:
                    self.stats.retries += 1
                    if isinstance(e.rate, RateInfo):
                        self.budget.observe(e.rate, rate_limited=e.kind == "rate_limit")
                    if e.kind == "rate_limit":
                        self.stats.rate_limited += 1
                        self.budget.pause(e.retry_after if e.retry_after is not None else 1.0)
                    raise
        return answer, (time.perf_counter() - t0) * 1000

    def _aborted(self, e: AbortError) -> None:
        """A systemic error stops the run at once if nothing has succeeded yet, else on the ABORT_AFTER-th."""
        self._abort_count += 1
        if self.stats.ok == 0 or self._abort_count >= ABORT_AFTER:
            self.request_stop(e)

    def _reserve(self, cost: float | None) -> bool:
        """Hold a request's maximum cost against the budget while it is in flight; False (and stop) when
        spending it could cross ``max_cost_usd``: counting in-flight requests at their maximum keeps the
        budget from being crossed by answers already on their way."""
        if cost is None or self.max_cost_usd is None:
            return True
        if self.stats.cost_usd + self._reserved + cost > self.max_cost_usd:
            self.request_stop(BudgetExceeded(
                f"stopped before crossing [budget].max_cost_usd = ${self.max_cost_usd:g}: spent "
                f"${self.stats.cost_usd:.4f} so far, with ${self._reserved:.4f} more in flight"))
            return False
        self._reserved += cost
        return True

    def _max_cost(self, req: Request) -> float | None:
        if self.price is None:
            return None
        return self.price.cost(Usage(prompt_tokens=req.prompt_tokens, completion_tokens=req.max_output_tokens))

    def _answered(self, req: Request, a: Answer, attempts: int, latency_ms: float,
                  rejected: list[Usage]) -> Outcome:
        self.budget.observe(a.rate)
        return answer_outcome(req.key, a, self.price, attempts=attempts, latency_ms=latency_ms, rejected=rejected)

    def _complete(self, key: str, outcome: Outcome) -> None:
        """Journal first, then the rows: answers reach the output only once they are committed.

        Commits are grouped per event-loop turn (``call_soon``), so many answers share one transaction.
        """
        self.journal.add(outcome)
        self._ready.append((key, outcome))
        self.stats.spend(outcome)
        self._schedule_flush()

    def _complete_block(self, batch: list[Request], block: VectorBlock) -> None:
        """``_complete`` for the rows of one embeddings request, kept together."""
        self.journal.add_block(block)
        self._ready_blocks.append((batch, block))
        self.stats.spend_block(block)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Commit the journal, then hand the committed answers' rows to the output."""
        self._flush_scheduled = False
        try:
            self.journal.flush()
        except PipelineError as e:
            self.request_stop(e)
            return
        ready, self._ready = self._ready, []
        for key, outcome in ready:
            pending = self._pending.pop(key)
            self._emit(pending.request, outcome, deduplicated=False, resumed=False)
            for follower in pending.followers:
                self._emit(follower, outcome, deduplicated=True, resumed=False)
        blocks, self._ready_blocks = self._ready_blocks, []
        for batch, block in blocks:
            self.sink.add_block([r.row for r in batch], [self.key_of_row(r) for r in batch], block)
            self.stats.rows_done += len(batch)
            self.stats.ok += len(batch)
            for i, r in enumerate(batch):
                for follower in self._pending.pop(r.key).followers:
                    self._emit(follower, block.outcome(i), deduplicated=True, resumed=False)

    def _emit(self, req: Request, outcome: Outcome, *, deduplicated: bool, resumed: bool) -> None:
        self.sink.add(req.row, self.key_of_row(req), outcome, deduplicated=deduplicated)
        self.stats.count(outcome, deduplicated=deduplicated, resumed=resumed)

    async def _tick(self) -> None:
        assert self.on_progress is not None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self.on_progress(self.stats)


def unsendable_input(req: Request, spec: RequestSpec) -> Outcome | None:
    """The failed outcome of an embeddings row too long for the model, or empty; None when it can be sent.

    Such a row fails alone, before anything is sent: it must not fail the request (or Batch API file) it
    would have joined.
    """
    if 0 < req.prompt_tokens <= spec.max_input_tokens:
        return None
    why = (f"the input has {req.prompt_tokens} tokens, more than the model takes ({spec.max_input_tokens})"
           if req.prompt_tokens else "the input is empty")
    return Outcome(req.key, "error", prompt_tokens=req.prompt_tokens, error=why,
                   error_type="input_too_long" if req.prompt_tokens else "empty_input")


def embedding_outcome(key: str, vector: bytes, dims: int | None, *, model: str | None, prompt_tokens: int,
                      cost_usd: float | None, attempts: int, latency_ms: float | None = None) -> Outcome:
    """One row's embedding as its outcome: failed when it has not the dimensions the job expects (either mode)."""
    if dims is not None and len(vector) != 4 * dims:
        return Outcome(key, "error", model=model, prompt_tokens=prompt_tokens, cost_usd=cost_usd, attempts=attempts,
                       latency_ms=latency_ms, error_type="wrong_dimensions",
                       error=f"the embedding has {len(vector) // 4} dimensions, expected {dims}")
    return embedding_row(key, vector, model=model, prompt_tokens=prompt_tokens, cost_usd=cost_usd,
                         attempts=attempts, latency_ms=latency_ms)


def answer_outcome(key: str, a: Answer, price: Price | None, *, attempts: int, latency_ms: float | None,
                   rejected: Sequence[Usage] = (), batch: bool = False) -> Outcome:
    """The outcome of a chat answer, priced (at the Batch API price with ``batch``); answers rejected before
    it (invalid JSON for the schema) were paid too, so they count. A bare refusal is a failed row."""
    usages = [*rejected, a.usage]
    cost = sum(price.cost(u, batch=batch) for u in usages) if price is not None else None
    tokens = {"prompt_tokens": sum(u.prompt_tokens for u in usages),
              "cached_tokens": sum(u.cached_tokens for u in usages),
              "completion_tokens": sum(u.completion_tokens for u in usages),
              "reasoning_tokens": sum(u.reasoning_tokens for u in usages)}
    if a.refusal and not a.content:
        return Outcome(key, "error", refusal=a.refusal, finish_reason=a.finish_reason, model=a.model,
                       cost_usd=cost, latency_ms=latency_ms, attempts=attempts,
                       error="the model refused to answer", error_type="refusal", **tokens)
    return Outcome(key, "ok", content=a.content, finish_reason=a.finish_reason, refusal=a.refusal,
                   model=a.model, cost_usd=cost, latency_ms=latency_ms, attempts=attempts, **tokens)


def stop_reason_kind(e: StopRun | AbortError) -> str:
    """A short label for manifests: why the run ended early."""
    if isinstance(e, BudgetExceeded):
        return "budget"
    if isinstance(e, Interrupted):
        return "interrupted"
    return getattr(e, "kind", "aborted")
