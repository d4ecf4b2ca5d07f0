"""One rate budget for a whole cluster: leases of a fraction of a second, handed out by one owner.

A call to a Ray actor costs 1-2 ms, so asking the owner once per request would cap a cluster at about a thousand
requests a second. Workers lease instead: a lease is a handful of requests and their tokens, valid for
``LEASE_S``; a worker asks for what its waiting requests need and sends under its lease without asking again.

``GlobalBudget`` is the owner, a plain class with an injected clock (the Ray actor in ``engines/ray.py`` only
wraps it). Its buckets refill at the job's per-minute limits times the shared pace and hold at most
``BURST_S`` of them, and they start empty: a restarted owner, or a new run against an account another run just
drained, never bursts. A lease not used before it expires is gone, so a dead worker's lease cannot come back
as a burst either. Workers report cumulative totals (requests, 429s, answers, dollars) with every lease, so a
restarted owner learns the spend again from the next leases, and a 429 anywhere cuts the pace for everyone
(AIMD: halved, then won back additively per answer, as in ``limits.py``) and starts a cooldown that every
worker learns with its next lease, at most ``LEASE_S`` later.

``LeasedBudget`` is the worker's side: a ``RateBudget`` (so the server's own readings, pauses and a request's
fit are handled exactly as in a local run) whose requests and tokens come from leases instead of local buckets.
Anthropic's separate input- and output-token limits are not leased: each worker keeps local buckets of an even
share of them (``engines/task.py``).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.limits import AIMD_DECREASE, AIMD_FLOOR, AIMD_INCREASE, RateBudget, Ticket
from pipeline.providers.base import RateInfo

LEASE_S = 0.25     # how long a lease is good for: the longest a cooldown takes to reach every worker
BURST_S = 0.5      # the most of the limits the buckets hold (as the local budget's burst window)
RETRY_FLOOR_S = 0.005


@dataclass(frozen=True, slots=True)
class Report:
    """What a worker has done so far (cumulative, so a lost or repeated report cannot miscount)."""

    requests: int = 0
    answers: int = 0
    rate_limited: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True, slots=True)
class Lease:
    """Requests (with their tokens) a worker may send within ``ttl_s``; and what the whole cluster must know."""

    granted: tuple[int, ...] = ()      # the tokens of each request granted, in the order they were asked
    ttl_s: float = LEASE_S
    retry_in_s: float = 0.0            # nothing granted: when to ask again
    cooldown_s: float = 0.0            # a 429 somewhere: hold every request this long
    pace: float = 1.0
    spent_usd: float = 0.0             # the cluster's spend so far (this run)
    cost_left_usd: float | None = None # what the budget has left, None without a budget
    workers: int = 1                   # workers holding a live lease (sharing what is left)
    stop: str | None = None            # the budget is spent: why the run stops


@dataclass
class _Worker:
    report: Report = field(default_factory=Report)
    seen_429: int = 0
    leased_until: float = -math.inf


class GlobalBudget:
    """Requests- and tokens-per-minute, the shared cooldown and pace, and the spend, for every worker of a job."""

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, *,
                 max_cost_usd: float | None = None, clock: Callable[[], float],
                 lease_s: float = LEASE_S, burst_s: float = BURST_S) -> None:
        self.rpm, self.tpm, self.max_cost_usd = requests_per_minute, tokens_per_minute, max_cost_usd
        self.lease_s, self.burst_s, self._clock = lease_s, burst_s, clock
        self._requests = 0.0   # the buckets' levels (start empty: no burst on a start or a restart)
        self._tokens = 0.0
        self._at: float | None = None  # they fill from the first lease on, not while the workers start
        self.pace = 1.0
        self._cooldown_until = -math.inf
        self._workers: dict[str, _Worker] = {}
        self.leases = 0
        self.granted_requests = 0

    # -- the buckets ------------------------------------------------------------------------------------------

    def _refill(self, now: float) -> None:
        dt, self._at = (0.0 if self._at is None else max(0.0, now - self._at)), now
        if self.rpm:
            self._requests = min(self._requests + dt * self.rpm * self.pace / 60.0, self._cap_requests)
        if self.tpm:
            self._tokens = min(self._tokens + dt * self.tpm * self.pace / 60.0, self._cap_tokens)

    @property
    def _cap_requests(self) -> float:
        return max(1.0, (self.rpm or 0) * self.burst_s / 60.0)

    @property
    def _cap_tokens(self) -> float:
        return max(1.0, (self.tpm or 0) * self.burst_s / 60.0)

    def _fits(self, tokens: int) -> bool:
        # A request larger than the burst is granted once the bucket is full, and leaves it in debt: the rate
        # holds, the request is never refused.
        return ((not self.rpm or self._requests >= 1.0)
                and (not self.tpm or self._tokens >= min(float(tokens), self._cap_tokens)))

    def _wait_for(self, tokens: int) -> float:
        wait = 0.0
        if self.rpm and self._requests < 1.0:
            wait = (1.0 - self._requests) * 60.0 / (self.rpm * self.pace)
        if self.tpm:
            short = min(float(tokens), self._cap_tokens) - self._tokens
            if short > 0:
                wait = max(wait, short * 60.0 / (self.tpm * self.pace))
        return max(wait, RETRY_FLOOR_S)

    # -- what workers call ------------------------------------------------------------------------------------

    def lease(self, worker: str, wanted: list[int], report: Report) -> Lease:
        """Grant what fits now of ``wanted`` (each waiting request's tokens), in order, and tell the worker
        everything the cluster knows: the cooldown, the pace, the spend."""
        now = self._clock()
        self.leases += 1
        self._learn(worker, report)
        self._refill(now)
        granted: list[int] = []
        spent = self.spent_usd
        stop = None
        if self.max_cost_usd is not None and spent >= self.max_cost_usd:
            stop = (f"stopped at [budget].max_cost_usd = ${self.max_cost_usd:g}: the cluster has spent "
                    f"${spent:.4f}")
        cooling = self._cooldown_until - now
        if stop is None and cooling <= 0:
            for tokens in wanted:
                if not self._fits(tokens):
                    break
                if self.rpm:
                    self._requests -= 1.0
                if self.tpm:
                    self._tokens -= float(tokens)
                granted.append(tokens)
        self.granted_requests += len(granted)
        w = self._workers[worker]
        if granted:
            w.leased_until = now + self.lease_s
        retry = 0.0 if granted or not wanted else (cooling if cooling > 0 else self._wait_for(wanted[0]))
        live = sum(1 for x in self._workers.values() if x.leased_until > now) or 1
        left = None if self.max_cost_usd is None else max(0.0, self.max_cost_usd - spent)
        return Lease(tuple(granted), self.lease_s, retry, max(0.0, cooling), self.pace, spent, left, live, stop)

    def cooldown(self, worker: str, seconds: float, report: Report) -> None:
        """A worker saw a 429: hold the whole cluster for the server's ``retry-after``."""
        self._learn(worker, report)
        self._cooldown_until = max(self._cooldown_until, self._clock() + max(0.0, seconds))

    def _learn(self, worker: str, report: Report) -> None:
        w = self._workers.setdefault(worker, _Worker())
        new_429 = report.rate_limited - w.seen_429
        new_answers = report.answers - w.report.answers
        if new_429 > 0 or new_answers > 0:
            self._refill(self._clock())  # what was earned at the old pace stays earned
        if new_429 > 0:
            # Once per report that saw any (a worker reports once per lease): the 429s a worker gets within one
            # lease answer the same overshoot, and cutting per 429 would take four workers' pace to the floor.
            self.pace = max(AIMD_FLOOR, self.pace * AIMD_DECREASE)
            w.seen_429 = report.rate_limited
        elif new_answers > 0 and self.pace < 1.0:
            self.pace = min(1.0, self.pace + AIMD_INCREASE * new_answers)
        if report.requests >= w.report.requests:  # reports are cumulative: never go back
            w.report = report

    @property
    def spent_usd(self) -> float:
        """What every worker reported spending, this run."""
        return sum(w.report.cost_usd for w in self._workers.values())

    def totals(self) -> dict[str, Any]:
        """For the manifest: how many leases, requests granted, the pace now."""
        return {"leases": self.leases, "granted_requests": self.granted_requests, "pace": round(self.pace, 3),
                "workers_seen": len(self._workers), "spent_usd": round(self.spent_usd, 8)}


Ask = Callable[[list[int], Report], Awaitable[Lease]]
Tell = Callable[[float, Report], Awaitable[None]]


class LeasedBudget(RateBudget):
    """A worker's budget: the server's readings and pauses as in a local run; the rate from the owner's leases.

    ``ask`` sends a lease request to the owner and ``tell`` reports a 429's cooldown (both are the Ray actor's
    methods in a cluster, a ``GlobalBudget`` directly in tests). ``report`` gives this worker's cumulative
    totals; ``on_stop`` stops the worker when the owner says the budget is spent; ``on_spend_share`` learns the
    worker's share of what the budget has left (the sender's spend guard uses it to stop before crossing it).
    """

    adapts = False  # the owner cuts the pace once for the cluster; a worker cutting its own too would double it

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None, *, ask: Ask, tell: Tell,
                 report: Callable[[], Report], on_stop: Callable[[str], None] = lambda reason: None,
                 on_spend_share: Callable[[float | None], None] = lambda share: None,
                 clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep, **limits: Any) -> None:
        super().__init__(requests_per_minute, tokens_per_minute, clock=clock, sleep=sleep, **limits)
        # Keep the limits (a request larger than a minute of tokens is refused as in a local run) but not the
        # local buckets: leases are the rate.
        self._requests = self._tokens = None
        self._ask, self._tell, self._report = ask, tell, report
        self._on_stop, self._on_spend_share = on_stop, on_spend_share
        self._grants: list[int] = []       # tokens of each request granted and not yet sent
        self._valid_until = -math.inf
        self._waiting: list[int] = []      # tokens of the requests waiting for a grant, in arrival order
        self._renewing: asyncio.Future[None] | None = None
        self.stopped: str | None = None
        self.leases = 0

    async def acquire(self, tokens: int, output_tokens: int = 0) -> Ticket:
        """A grant from a lease first, then everything a local budget checks (the server's view, pauses)."""
        await self._granted(tokens)
        return await super().acquire(tokens, output_tokens)

    async def _granted(self, tokens: int) -> None:
        self._waiting.append(tokens)
        try:
            while True:
                if self._grants and self._clock() < self._valid_until:
                    # Grants are tokens-sized; any grant at least this large serves (leases are asked in order).
                    for i, g in enumerate(self._grants):
                        if g >= tokens:
                            del self._grants[i]
                            return
                if self.stopped is not None:
                    raise asyncio.CancelledError  # the run is stopping: the sender treats this as a stop
                await self._renew()
        finally:
            self._waiting.remove(tokens)

    async def _renew(self) -> None:
        """One lease request at a time per worker; the others wait for its answer."""
        if self._renewing is not None:
            await asyncio.shield(self._renewing)
            return
        self._renewing = asyncio.get_running_loop().create_future()
        try:
            lease = await self._ask(list(self._waiting), self._report())
            self.leases += 1
            self._take(lease)
            if not lease.granted and lease.stop is None:
                await self._sleep(max(lease.retry_in_s, RETRY_FLOOR_S))
        finally:
            fut, self._renewing = self._renewing, None
            fut.set_result(None)

    def _take(self, lease: Lease) -> None:
        now = self._clock()
        self._grants = list(lease.granted)  # what is left of the last lease expired with it
        self._valid_until = now + lease.ttl_s
        if lease.cooldown_s > 0:
            self._hold(lease.cooldown_s)
        if lease.cost_left_usd is not None:
            self._on_spend_share(self._report().cost_usd + lease.cost_left_usd / max(1, lease.workers))
        if lease.stop is not None and self.stopped is None:
            self.stopped = lease.stop
            self._on_stop(lease.stop)

    def pause(self, seconds: float) -> None:
        """A 429 here: pause, and tell the owner so every other worker holds too."""
        super().pause(seconds)
        task = asyncio.ensure_future(self._tell(seconds, self._report()))
        task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    def observe(self, rate: RateInfo, *, rate_limited: bool = False, ticket: Ticket | None = None) -> None:
        """As a local budget (the pace is the owner's, see ``adapts``)."""
        super().observe(rate, rate_limited=rate_limited, ticket=ticket)
