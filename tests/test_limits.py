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
