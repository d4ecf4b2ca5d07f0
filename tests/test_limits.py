"""The budgets on a virtual-time loop: loop time is exact and costs no real time."""

import asyncio

import pytest

from pipeline.limits import RateBudget
from pipeline.providers.base import RateInfo
from tests.conftest import run_virtual


def _timed(coro_fn):
    async def go():
        loop = asyncio.get_running_loop()
        t = loop.time()
        await coro_fn()
        return loop.time() - t
    return run_virtual(go())


def test_requests_per_minute_paces_after_one_second_burst():
    budget = RateBudget(6000, None)  # 100/s, burst of 100

    async def take():
        for _ in range(150):
            await budget.acquire(1)
    assert _timed(take) == pytest.approx(1.0, abs=0.01)  # 50 in the burst, then 100 at 100/s


def test_tokens_per_minute_counts_tokens_and_splits_large_requests():
    budget = RateBudget(None, 60_000)  # 1,000 tokens/s, burst 1,000

    async def take():
        await budget.acquire(2500)  # larger than the burst: taken in pieces, never refused
    assert _timed(take) == pytest.approx(2.0, abs=0.01)  # 500 in the burst, then 2,000 at 1,000/s
    assert budget.fits(60_000) and not budget.fits(60_001)


def test_pause_holds_every_worker():
    budget = RateBudget(None, None)

    async def take():
        budget.pause(0.3)
        await asyncio.gather(*(budget.acquire(1) for _ in range(10)))
    assert _timed(take) == pytest.approx(0.3, abs=0.01)
    assert budget.pauses == 1


def test_server_limit_is_adopted_only_after_a_429():
    budget = RateBudget(None, None)

    async def go():
        budget.observe(RateInfo(limit_requests=120, remaining_requests=100))
        assert budget.rpm is None
        budget.observe(RateInfo(limit_requests=120, remaining_requests=0, reset_requests_s=0.2), rate_limited=True)
        assert budget.rpm == 120
    asyncio.run(go())


def test_dry_server_bucket_pauses():
    budget = RateBudget(None, None)

    async def go():
        budget.observe(RateInfo(limit_requests=600, remaining_requests=0, reset_requests_s=5.0))
        loop = asyncio.get_running_loop()
        assert 0.05 < budget._resume_at - loop.time() <= 0.1  # one request's worth (60/600 s), not the full reset
    asyncio.run(go())


def test_the_servers_view_wins_no_burst_into_a_bucket_it_says_is_empty():
    budget = RateBudget(6000, None)  # ours: a burst of 50, then 100/s

    async def take():
        ticket = await budget.acquire(10)
        # the server answers: its bucket (a minute of 6,000) has nothing left after that request
        budget.observe(RateInfo(limit_requests=6000, remaining_requests=0), ticket=ticket)
        for _ in range(20):
            await budget.acquire(10)
    # without the reading, the 20 would go at once in our burst; with it, one every 10 ms as the server refills
    assert _timed(take) == pytest.approx(0.2, abs=0.01)


def test_a_reading_corrects_for_what_was_sent_after_its_request_and_keeps_the_freshest():
    budget = RateBudget(None, None)

    async def take():
        first = await budget.acquire(1)
        second = await budget.acquire(1)
        for _ in range(3):
            await budget.acquire(1)
        budget.observe(RateInfo(limit_requests=600, remaining_requests=4), ticket=second)  # 3 sent since
        budget.observe(RateInfo(limit_requests=600, remaining_requests=100), ticket=first)  # older: ignored
        await budget.acquire(1)  # the server has 4 - 3 = 1: goes at once
        await budget.acquire(1)  # then it waits for the refill, 10 a second
    assert _timed(take) == pytest.approx(0.1, abs=0.01)


def test_aimd_halves_the_pace_after_a_429_and_recovers_additively_with_answers():
    budget = RateBudget(600, None)  # 10/s
    limited = RateInfo()

    async def take():
        for _ in range(5):  # our burst of 5
            await budget.acquire(1)
        budget.observe(limited, rate_limited=True)
        budget.observe(limited, rate_limited=True)
        assert budget.pace == pytest.approx(0.25)
        loop = asyncio.get_running_loop()
        t = loop.time()
        await budget.acquire(1)
        await budget.acquire(1)
        gap = loop.time() - t
        for _ in range(15):
            budget.observe(RateInfo())
        return gap

    gap = run_virtual(take())
    assert gap >= 0.4 - 1e-6  # 2.5 a second while the pace is a quarter
    assert budget.pace == 1.0  # 15 answers x 0.05 won the rest back


def test_without_headers_the_jobs_limits_alone_pace_the_run():
    budget = RateBudget(600, None)

    async def take():
        for _ in range(25):
            ticket = await budget.acquire(1)
            budget.observe(RateInfo(), ticket=ticket)  # a compatible server: no readings at all
    assert _timed(take) == pytest.approx(2.0, abs=0.01)  # a burst of 5, then 10 a second
