"""The scheduler: rendered requests in, outcomes out, as fast as the limits allow and no faster.

The producer takes rendered chunks and feeds a bounded queue with units of work (the sender decides what a
unit is: one chat row, a batch of embeddings rows); ``concurrency`` workers send them through the sender.
Before a request is queued, the journal is asked whether its key was answered already (resume) and the
in-flight table whether an identical request is on its way (dedup): either way the row waits for that answer
instead of paying again. Every result goes to the journal before its rows go to the output, and commits are
grouped per event-loop turn.

Stopping is cooperative: ``request_stop`` (Ctrl-C, SIGTERM, the budget, a systemic error) stops taking new
work and gives the requests in flight a grace period; a second ``interrupt``, or the end of the grace
period, cancels them. The scheduler reads no clock of its own: the grace period and the progress ticks are
event-loop time, so a test drives them with a virtual-time loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.errors import Interrupted, PipelineError
from pipeline.journal import OutcomeStore
from pipeline.keys import key_id
from pipeline.outcome import Outcome, Result, ResultSink, RunStats, skipped
from pipeline.rendered import RenderedChunk, Request
from pipeline.senders import Sender

PROGRESS_EVERY_S = 0.5


@dataclass(slots=True)
class _Pending:
    """A request on its way, and the rows waiting for its answer (more than one when rows are identical)."""

    request: Request
    followers: list[Request]


class Scheduler:
    """Runs one job's requests through a sender; owns nothing it did not get (the journal and sink are given).

    Build it first, then the sender over its ``stats`` and its stop machinery (``stopping``,
    ``request_stop``), then ``await scheduler.run(chunks, sender)``.
    """

    def __init__(self, *, journal: OutcomeStore, sink: ResultSink, key_of_row: Callable[[Any], tuple[Any, ...]],
                 concurrency: int, grace_s: float = 5.0, stats: RunStats | None = None,
                 on_progress: Callable[[RunStats], None] | None = None) -> None:
        self.journal, self.sink, self.key_of_row = journal, sink, key_of_row
        self.concurrency, self.grace_s, self.on_progress = concurrency, grace_s, on_progress
        self.stats = stats or RunStats()
        self.stopping = asyncio.Event()
        self._stop_reason: PipelineError | None = None
        self._pending: dict[str, _Pending] = {}
        self._seen: set[int] = set()
        self._queue: asyncio.Queue[list[Request] | None] = asyncio.Queue(maxsize=max(2 * concurrency, 64))
        self._flush_scheduled = False
        self._ready: list[tuple[Sequence[Request], Result]] = []
        self._workers: list[asyncio.Task[None]] = []

    @property
    def seen(self) -> set[int]:
        """Key ids of every request taken so far (a row repeating one is a duplicate)."""
        return self._seen

    # -- control ----------------------------------------------------------------------------------------------

    def request_stop(self, reason: PipelineError | None = None) -> None:
        """Stop taking new work; the requests in flight get ``grace_s`` to finish. The first reason wins."""
        if self.stopping.is_set():
            return
        self._stop_reason = reason or Interrupted("interrupted")
        self.stopping.set()

    def interrupt(self, reason: PipelineError) -> None:
        """A signal: the first stops taking work, a second cancels the requests in flight at once."""
        if self.stopping.is_set():
            for t in self._workers:
                t.cancel()
            return
        self.request_stop(reason)

    # -- the run ----------------------------------------------------------------------------------------------

    async def run(self, chunks: AsyncIterator[RenderedChunk], sender: Sender) -> RunStats:
        """Send everything ``chunks`` yields; returns the totals, or raises the StopRun/AbortError that ended it."""
        ticker = asyncio.create_task(self._tick()) if self.on_progress else None
        self._workers = [asyncio.create_task(self._worker(sender)) for _ in range(self.concurrency)]
        producer = asyncio.create_task(self._produce(chunks, sender))
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
        stop_wait = asyncio.create_task(self.stopping.wait())
        pending: set[asyncio.Task[Any]] = {producer, *self._workers}
        try:
            while pending - {producer} and not self.stopping.is_set():
                done, _ = await asyncio.wait(pending | {stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                for t in done - {stop_wait}:
                    pending.discard(t)
                    if not t.cancelled() and t.exception() is not None:
                        raise t.exception()  # type: ignore[misc]
            if self.stopping.is_set():
                # Stopping: no new work; the requests in flight get their grace period, then are cancelled.
                producer.cancel()
                workers = pending - {producer}
                if workers:
                    await asyncio.wait(workers, timeout=self.grace_s)
        finally:
            stop_wait.cancel()

    async def _produce(self, chunks: AsyncIterator[RenderedChunk], sender: Sender) -> None:
        stopping, seen, in_flight = self.stopping, self._seen, self._pending  # per row: locals
        async for chunk in chunks:
            if stopping.is_set():
                break
            for s in chunk.skipped:
                self._emit(s.row, self.key_of_row(s), skipped(s.reason, s.error_type))
            settled = chunk.settled  # looked up in the journal by the renderer, off the event loop
            for req in chunk.requests:
                if stopping.is_set():
                    return
                key = req.key
                seen_id = key_id(key)
                first = seen_id not in seen
                seen.add(seen_id)
                if key in in_flight:
                    in_flight[key].followers.append(req)
                    continue
                outcome = settled.get(key)
                if outcome is None and not first:
                    # An identical row's request finished while this chunk was being queued. Its answer left
                    # ``in_flight`` only once committed, so the journal has it; committing what else is pending
                    # first (a transaction per duplicate row) is only for the case that it does not.
                    outcome = self.journal.get(key)
                    if outcome is None:
                        self._flush()
                        outcome = self.journal.get(key)
                if outcome is not None:
                    self._emit(req.row, self.key_of_row(req), outcome, deduplicated=not first, resumed=first)
                    continue
                in_flight[key] = _Pending(req, [])
                refused = sender.refuse(req)
                if refused is not None:
                    self._complete([req], refused)
                elif (unit := sender.add(req)) is not None:
                    await self._queue.put(unit)
        if not stopping.is_set() and (unit := sender.drain()) is not None:
            await self._queue.put(unit)
        for _ in self._workers:
            await self._queue.put(None)

    async def _worker(self, sender: Sender) -> None:
        while True:
            unit = await self._queue.get()
            if unit is None or self.stopping.is_set():
                return
            self.stats.in_flight += 1
            try:
                results = await sender.send(unit)
            finally:
                self.stats.in_flight -= 1
            for rows, result in results:
                self._complete(rows, result)

    def _complete(self, rows: Sequence[Request], result: Result) -> None:
        """Journal first, then the rows: answers reach the output only once they are committed.

        Commits are grouped per event-loop turn (``call_soon``), so many answers share one transaction.
        """
        result.record_in(self.journal)
        self._ready.append((rows, result))
        self.stats.spend(result)
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
        for rows, result in ready:
            result.write_to(self.sink, [r.row for r in rows], [self.key_of_row(r) for r in rows], self.stats)
            for i, r in enumerate(rows):
                for follower in self._pending.pop(r.key).followers:
                    self._emit(follower.row, self.key_of_row(follower), result.outcome(i), deduplicated=True)

    def _emit(self, row: int, keys: tuple[Any, ...], outcome: Outcome, *, deduplicated: bool = False,
              resumed: bool = False) -> None:
        self.sink.add(row, keys, outcome, deduplicated=deduplicated)
        self.stats.count(outcome, deduplicated=deduplicated, resumed=resumed)

    async def _tick(self) -> None:
        assert self.on_progress is not None
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            self.on_progress(self.stats)


async def in_thread(chunks: Iterator[RenderedChunk]) -> AsyncIterator[RenderedChunk]:
    """Chunks rendered in a worker thread, so the event loop stays responsive while a chunk renders."""
    end = object()
    while (chunk := await asyncio.to_thread(next, chunks, end)) is not end:
        assert isinstance(chunk, RenderedChunk)
        yield chunk
