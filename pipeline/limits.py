"""Requests- and tokens-per-minute budgets, shared by all workers of a run.

Providers charge a request against TPM at admission, as prompt tokens plus the maximum output tokens, and
enforce their per-minute limits in sub-minute slices too. So each budget here is an aiolimiter leaky bucket
that holds half a second of the limit: the steady rate is exactly the limit, and a burst is never more than
half a second's worth. Half, not a whole second: with a bucket exactly the size of the server's one-second
slice, network jitter alone drew ~1% 429s in bench/compare.py; with half, none. Anthropic limits input and
output tokens apart (output charged at admission as ``max_tokens``): those are two more buckets.

The server's own view wins over ours (``ServerView``): every response's ``remaining`` requests and tokens,
refilled at the limit's rate since, less what we sent after the request that reading came with, is what the
server has; nobody sends into less than that (a bucket that starts empty is not burst into, and a count that
differs from the server's, like OpenAI's ~4-characters-a-token estimate, is corrected on every answer). A 429
pauses every worker until the server's ``retry-after`` and halves the pace, which then recovers additively with
each answer (AIMD). A server that sends no headers leaves the job's limits alone in charge.

Time is injected (``clock``, ``sleep``), by default the event loop's: aiolimiter's buckets read the loop's
clock too, so the two always agree, and a test moves both by running on a virtual-time loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from pipeline.providers.base import RateInfo

BURST_WINDOW_S = 0.5
AIMD_DECREASE = 0.5     # the pace after a 429, as a share of the one before
AIMD_INCREASE = 0.05    # the share of the limit's pace won back with each answer
AIMD_FLOOR = 0.1


@dataclass(slots=True)
class ServerView:
    """One of the server's buckets as its freshest reading described it: ``remaining`` at ``at``, refilled at
    ``per_s`` since, less what was sent after the request the reading came with (``sent_then``)."""

    remaining: float = 0.0
    at: float = 0.0
    per_s: float = 0.0
    limit: float = 0.0
    stamp: float = -1.0        # the cumulative amount sent before the request of the reading
    sent_then: float = 0.0     # ... and including it, when the server charged it

    def available(self, now: float, sent: float) -> float:
        """What the server has now, by its last word."""
        return min(self.limit, self.remaining + self.per_s * (now - self.at)) - (sent - self.sent_then)

    def read(self, remaining: int, limit: int, now: float, stamp: float, charged: float) -> None:
        """A reading, kept if it is the freshest (answers can come back out of order)."""
        if stamp < self.stamp:
            return
        self.remaining, self.limit, self.per_s, self.at = float(remaining), float(limit), limit / 60.0, now
        self.stamp, self.sent_then = stamp, stamp + charged


@dataclass(frozen=True, slots=True)
class Ticket:
    """What had been sent before a request, and what it charges: ties a response's readings to the moment."""

    requests: float = 0.0
    tokens: float = 0.0
    cost: float = 0.0


def _bucket(per_minute: int) -> tuple[AsyncLimiter, float]:
    capacity = max(1.0, per_minute * BURST_WINDOW_S / 60.0)
    return AsyncLimiter(capacity, capacity * 60.0 / per_minute), capacity


async def _take(bucket: AsyncLimiter, capacity: float, amount: float) -> None:
    """Take ``amount`` from a bucket, in pieces of its capacity when it is larger than the burst window."""
    left = float(amount)
    while left > 0:
        piece = min(left, capacity)
        await bucket.acquire(piece)
        left -= piece


class RateBudget:
    """The limits of one run; ``await budget.acquire(tokens)`` before each request is sent.

    ``adapts``: whether a 429 lowers this budget's own limits and pace. A budget that gets its rate from
    elsewhere (the Ray engine's leases, whose pace is cut once for the whole cluster) turns it off.
    """

    adapts = True

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, *,
                 input_tokens_per_minute: int | None = None, output_tokens_per_minute: int | None = None,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.itpm, self.otpm = input_tokens_per_minute, output_tokens_per_minute
        self.server_limits: dict[str, int] = {}  # the lowest limits the server's headers stated
        self._clock = clock or (lambda: asyncio.get_running_loop().time())
        self._sleep = sleep
        self._requests: AsyncLimiter | None
        self._tokens: AsyncLimiter | None
        self._requests, _ = _bucket(requests_per_minute) if requests_per_minute else (None, 0.0)
        self._tokens, self._token_capacity = _bucket(tokens_per_minute) if tokens_per_minute else (None, 0.0)
        self._input = _bucket(input_tokens_per_minute) if input_tokens_per_minute else None
        self._output = _bucket(output_tokens_per_minute) if output_tokens_per_minute else None
        self._resume_at = 0.0
        self.pauses = 0
        self._largest_request = 0
        self._sent_requests = 0.0
        self._sent_tokens = 0.0
        self._views: dict[str, ServerView] = {}
        self.pace = 1.0           # AIMD: the share of the limits' rate we allow ourselves
        self._next_at = 0.0       # while pace < 1: the earliest time of the next request
        self._largest_input = 0
        self._largest_output = 0

    def fits(self, tokens: int, output_tokens: int = 0) -> bool:
        """False for a request larger than a whole minute of tokens: it can never be admitted."""
        return ((self.tpm is None or tokens <= self.tpm) and (self.itpm is None or tokens - output_tokens <= self.itpm)
                and (self.otpm is None or output_tokens <= self.otpm))

    @property
    def token_cap(self) -> int | None:
        """The most tokens one request may carry in (embeddings batches are cut under it)."""
        caps = [c for c in (self.tpm, self.itpm) if c]
        return min(caps) if caps else None

    async def acquire(self, tokens: int, output_tokens: int = 0) -> Ticket:
        """Wait until one more request of ``tokens`` tokens (``output_tokens`` of them its output cap) is
        within every limit, the server's view and the pace, and no pause is on; returns its ticket (for
        ``observe``)."""
        await self._take_local(tokens, output_tokens)
        while True:
            now = self._clock()
            wait = max(self._view_wait(now, tokens), self._next_at - now if self.pace < 1 else 0.0,
                       self._resume_at - now)
            if wait <= 0:
                break
            await self._sleep(wait)
        if self.pace < 1 and self.rpm:
            self._next_at = max(self._next_at, self._clock()) + 60.0 / (self.rpm * self.pace)
        ticket = Ticket(self._sent_requests, self._sent_tokens, float(tokens))
        self._sent_requests += 1
        self._sent_tokens += tokens
        return ticket

    def _view_wait(self, now: float, tokens: int) -> float:
        """Seconds until the server, by its own last word, has room for one more request of ``tokens``."""
        wait = 0.0
        for name, need, sent in (("requests", 1.0, self._sent_requests), ("tokens", float(tokens), self._sent_tokens)):
            view = self._views.get(name)
            if view is not None and view.per_s > 0:
                short = min(need, view.limit) - view.available(now, sent)
                if short > 0:
                    wait = max(wait, short / view.per_s)
        return wait

    async def _take_local(self, tokens: int, output_tokens: int) -> None:
        await self._wait_pause()
        if self._requests is not None:
            await self._requests.acquire(1)
        self._largest_request = max(self._largest_request, tokens)
        self._largest_input = max(self._largest_input, tokens - output_tokens)
        self._largest_output = max(self._largest_output, output_tokens)
        if self._tokens is not None:
            await _take(self._tokens, self._token_capacity, tokens)
        if self._input is not None:
            await _take(*self._input, tokens - output_tokens)
        if self._output is not None:
            await _take(*self._output, output_tokens)

    async def _wait_pause(self) -> None:
        while (delay := self._resume_at - self._clock()) > 0:
            await self._sleep(delay)

    def pause(self, seconds: float) -> None:
        """Hold every worker for ``seconds`` (a 429 means the server's budget is gone for all of us)."""
        self._hold(seconds)

    def _hold(self, seconds: float) -> None:
        if seconds <= 0:
            return
        resume = self._clock() + seconds
        if resume > self._resume_at:
            self._resume_at = resume
            self.pauses += 1

    def observe(self, rate: RateInfo, *, rate_limited: bool = False, ticket: Ticket | None = None) -> None:
        """Correct our view with the server's: out of requests or tokens means wait for them to come back.

        After a 429, a server limit below ours (or one the job did not state) becomes ours, so the workers pace
        themselves instead of all retrying into the same empty bucket. Not before: until the server's bucket
        runs dry, its burst allowance is ours to use.
        """
        for name, limit in (("requests_per_minute", rate.limit_requests), ("tokens_per_minute", rate.limit_tokens)):
            if limit and limit < self.server_limits.get(name, limit + 1):
                self.server_limits[name] = limit
        if rate_limited and self.adapts:
            self._adopt(rate)
            self.pace = max(AIMD_FLOOR, self.pace * AIMD_DECREASE)
        elif self.pace < 1:
            self.pace = min(1.0, self.pace + AIMD_INCREASE)
        if ticket is not None:
            now = self._clock()
            charged = not rate_limited  # a refused request was not charged
            if rate.remaining_requests is not None and rate.limit_requests:
                self._views.setdefault("requests", ServerView()).read(
                    rate.remaining_requests, rate.limit_requests, now, ticket.requests, 1.0 if charged else 0.0)
            if rate.remaining_tokens is not None and rate.limit_tokens:
                self._views.setdefault("tokens", ServerView()).read(
                    rate.remaining_tokens, rate.limit_tokens, now, ticket.tokens, ticket.cost if charged else 0.0)
        self._pause_if_dry(rate, viewed=ticket is not None)

    def _adopt(self, rate: RateInfo) -> None:
        if rate.limit_requests and (self.rpm is None or rate.limit_requests < self.rpm):
            self.rpm = rate.limit_requests
            self._requests, _ = _bucket(rate.limit_requests)
        if rate.limit_tokens and (self.tpm is None or rate.limit_tokens < self.tpm):
            self.tpm = rate.limit_tokens
            self._tokens, self._token_capacity = _bucket(rate.limit_tokens)
        if rate.limit_input_tokens and (self.itpm is None or rate.limit_input_tokens < self.itpm):
            self.itpm = rate.limit_input_tokens
            self._input = _bucket(rate.limit_input_tokens)
        if rate.limit_output_tokens and (self.otpm is None or rate.limit_output_tokens < self.otpm):
            self.otpm = rate.limit_output_tokens
            self._output = _bucket(rate.limit_output_tokens)

    def _pause_if_dry(self, rate: RateInfo, *, viewed: bool = False) -> None:
        """Pause until a bucket the server says is short of our largest request has refilled enough. With
        ``viewed``, requests and tokens are left to the server's view, which paces them exactly."""
        dims = [] if viewed else [
            (rate.remaining_requests, rate.limit_requests, rate.reset_requests_s, 1),
            (rate.remaining_tokens, rate.limit_tokens, rate.reset_tokens_s, self._largest_request)]
        dims += [(rate.remaining_input_tokens, rate.limit_input_tokens, rate.reset_input_tokens_s, self._largest_input),
                 (rate.remaining_output_tokens, rate.limit_output_tokens, rate.reset_output_tokens_s,
                  self._largest_output)]
        for remaining, limit, reset, largest in dims:
            if remaining is not None and limit and largest and remaining < largest:
                wait = (largest - remaining) * 60.0 / limit
                self._hold(min(wait, reset or wait))
