"""The global budget alone (an injected clock), and workers' leased budgets against it on a virtual-time loop."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.engines.budget import LEASE_S, GlobalBudget, LeasedBudget, Report
from pipeline.providers.base import RateInfo
from tests.conftest import run_virtual


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_buckets_start_empty_at_the_first_lease_and_never_grant_above_the_rate() -> None:
    clock = Clock()
    b = GlobalBudget(600, None, clock=clock)  # 10 requests/s, a burst of 5
    clock.now += 30  # workers take a while to start: nothing is earned before anyone asks
    first = b.lease("w1", [10] * 20, Report())
    assert first.granted == () and first.retry_in_s == pytest.approx(0.1)
    granted = 0
    for step in range(1, 601):  # 60 s, four workers asking every 0.1 s for more than they can get
        clock.now += 0.1
        for w in ("w1", "w2", "w3", "w4"):
            granted += len(b.lease(w, [10] * 20, Report()).granted)
        assert granted <= 10 * step * 0.1 + 5 + 1e-9
    assert granted >= 590  # and the rate is all used


def test_tokens_bind_and_a_request_larger_than_the_burst_is_granted_once_the_bucket_is_full() -> None:
    clock = Clock()
    b = GlobalBudget(None, 6_000, clock=clock)  # 100 tokens/s, a burst of 50
    b.lease("w", [1], Report())
    clock.now += 1.0
    lease = b.lease("w", [40, 40, 40], Report())
    assert lease.granted == (40,)              # 50 tokens held: one 40-token request fits, not two
    clock.now += 0.5
    assert b.lease("w", [500], Report()).granted == (500,)  # larger than the burst: granted into debt
    assert b.lease("w", [10], Report()).granted == ()
    clock.now += 4.0
    assert b.lease("w", [10], Report()).granted == ()        # the debt is paid back at the rate
    clock.now += 1.0
    assert b.lease("w", [10], Report()).granted == (10,)


def test_a_cooldown_reported_by_one_worker_holds_every_worker() -> None:
    clock = Clock()
    b = GlobalBudget(6_000, None, clock=clock)
    b.lease("w1", [1], Report())
    clock.now += 1
    b.cooldown("w1", 2.0, Report(requests=5, rate_limited=1))
    clock.now += 0.1
    other = b.lease("w2", [1, 1], Report(requests=3))
    assert other.granted == () and other.cooldown_s == pytest.approx(1.9)
    assert other.retry_in_s == pytest.approx(1.9)
    clock.now += 2.0
    assert b.lease("w2", [1], Report(requests=3)).granted == (1,)


def test_aimd_a_429_halves_the_cluster_pace_and_answers_win_it_back() -> None:
    clock = Clock()
    b = GlobalBudget(600, None, clock=clock)
    b.lease("w1", [], Report())
    b.lease("w1", [], Report(requests=10, answers=9, rate_limited=1))
    assert b.pace == pytest.approx(0.5)
    b.lease("w2", [], Report(requests=4, answers=4))        # w2's answers count for the whole cluster
    assert b.pace == pytest.approx(0.7)
    b.lease("w1", [], Report(requests=10, answers=9, rate_limited=1))  # the same report again: no second cut
    assert b.pace == pytest.approx(0.7)
    b.lease("w1", [], Report(requests=30, answers=29, rate_limited=1))
    assert b.pace == 1.0


def test_the_spend_is_summed_from_cumulative_reports_and_stops_every_worker_at_the_budget() -> None:
    clock = Clock()
    b = GlobalBudget(None, None, max_cost_usd=1.0, clock=clock)
    a = b.lease("w1", [1], Report(requests=1, cost_usd=0.3))
    assert a.granted == (1,) and a.cost_left_usd == pytest.approx(0.7)
    b.lease("w2", [1], Report(requests=1, cost_usd=0.5))
    b.lease("w1", [1], Report(requests=2, cost_usd=0.3))     # a repeated report does not count twice
    assert b.spent_usd == pytest.approx(0.8)
    stop = b.lease("w2", [1], Report(requests=2, cost_usd=0.7))
    assert stop.granted == () and stop.stop is not None and "$1" in stop.stop


def test_a_restarted_owner_learns_the_spend_again_and_does_not_burst() -> None:
    clock = Clock()
    b = GlobalBudget(600, None, max_cost_usd=1.0, clock=clock)
    b.lease("w1", [1], Report(requests=50, cost_usd=0.6))
    restarted = GlobalBudget(600, None, max_cost_usd=1.0, clock=clock)  # what Ray makes of a dead actor
    lease = restarted.lease("w1", [1] * 10, Report(requests=50, cost_usd=0.6))
    assert lease.granted == () and restarted.spent_usd == pytest.approx(0.6)


def _workers(budget: GlobalBudget, n: int, per_worker: int) -> list[float]:
    """``n`` leased budgets sending ``per_worker`` requests each as fast as they are let; returns send times."""
    sent: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        budget._clock = loop.time  # the owner on the same virtual clock
        budgets = []
        for i in range(n):
            counts = {"requests": 0}

            async def ask(wanted: list[int], report: Report, name: str = f"w{i}") -> object:
                await asyncio.sleep(0.002)  # an actor call's round trip
                return budget.lease(name, wanted, report)

            async def tell(seconds: float, report: Report, name: str = f"w{i}") -> None:
                budget.cooldown(name, seconds, report)

            budgets.append((LeasedBudget(600, None, ask=ask, tell=tell,
                                         report=lambda c=counts: Report(requests=c["requests"])), counts))

        async def send(lb: LeasedBudget, counts: dict[str, int]) -> None:
            await lb.acquire(10)
            counts["requests"] += 1
            sent.append(loop.time())

        await asyncio.gather(*(send(lb, c) for lb, c in budgets for _ in range(per_worker)))

    run_virtual(main())
    return sorted(sent)


def test_leased_workers_together_hold_the_global_rate() -> None:
    b = GlobalBudget(600, None, clock=lambda: 0.0)
    times = _workers(b, 4, 100)  # 400 requests at 10/s: about 40 s
    start = times[0]
    assert 38.0 <= times[-1] - start <= 42.0
    for t in range(int(times[-1] - start)):  # no second holds more than a second's rate plus the burst
        assert sum(1 for x in times if start + t <= x < start + t + 1) <= 10 + 5


def test_an_unused_lease_expires_and_a_pause_from_a_429_reaches_the_owner() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        owner = GlobalBudget(6_000, None, clock=loop.time)
        told: list[float] = []

        async def ask(wanted: list[int], report: Report) -> object:
            return owner.lease("w", wanted, report)

        async def tell(seconds: float, report: Report) -> None:
            told.append(seconds)
            owner.cooldown("w", seconds, report)

        lb = LeasedBudget(6_000, None, ask=ask, tell=tell, report=Report)
        await lb.acquire(1)           # the owner starts empty: the first lease grants nothing, the next one
        asked = lb.leases
        lb._grants = [1, 1, 1]        # as if the last lease had been larger than what was sent under it
        await lb.acquire(1)
        assert lb.leases == asked and lb._grants == [1, 1]  # used while the lease is live
        await asyncio.sleep(LEASE_S * 2)
        await lb.acquire(1)
        assert lb.leases > asked       # expired: what was left of it is gone, a new lease was asked for
        lb.observe(RateInfo(), rate_limited=True)
        lb.pause(1.5)
        await asyncio.sleep(0)
        assert told == [1.5]
        t0 = loop.time()
        await lb.acquire(1)
        assert loop.time() - t0 >= 1.5 - 1e-6

    run_virtual(main())
