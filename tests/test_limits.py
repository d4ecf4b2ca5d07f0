import asyncio
import time

from pipeline.client import RateInfo
from pipeline.limits import RateBudget


def _timed(coro_fn):
    async def go():
        t = time.monotonic()
        await coro_fn()
        return time.monotonic() - t
    return asyncio.run(go())


def test_requests_per_minute_paces_after_one_second_burst():
    budget = RateBudget(6000, None)  # 100/s, burst of 100

    async def take():
        for _ in range(150):
            await budget.acquire(1)
    assert 0.4 < _timed(take) < 1.5


def test_tokens_per_minute_counts_tokens_and_splits_large_requests():
    budget = RateBudget(None, 60_000)  # 1,000 tokens/s, burst 1,000

    async def take():
        await budget.acquire(2500)  # larger than the burst: taken in pieces, never refused
    assert 1.2 < _timed(take) < 2.5
    assert budget.fits(60_000) and not budget.fits(60_001)


def test_pause_holds_every_worker():
    budget = RateBudget(None, None)

    async def take():
        budget.pause(0.3)
        await asyncio.gather(*(budget.acquire(1) for _ in range(10)))
    assert 0.25 < _timed(take) < 1.0
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
