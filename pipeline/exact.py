"""``pipeline estimate --exact``: prompt tokens counted by the provider itself, for a tokenizer we lack.

Claude's tokenizer is not available offline, so the estimate's prompt tokens are an upper bound. Anthropic's
``count_tokens`` endpoint counts a request exactly and for free, under its own rate limit: every unique request
of the job is counted once, a few at a time, pacing itself by the 429s and ``retry-after`` the endpoint sends.
Counts are cached by request key beside the output (``NAME.token_counts.sqlite``), so a rerun of the estimate,
after a prompt changed in one row, counts only that row.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Mapping
from pathlib import Path

from pipeline.client import ApiClient
from pipeline.errors import OutputError, ProviderError, RateLimited
from pipeline.limits import RateBudget
from pipeline.providers import Provider
from pipeline.providers.base import CountsTokens
from pipeline.retry import RetryPolicy

WORKERS = 8


class CountCache:
    """Exact prompt tokens by request key, in a small SQLite file of their own."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path)
            self._db.execute("CREATE TABLE IF NOT EXISTS counts (key TEXT PRIMARY KEY, tokens INTEGER)")
        except (OSError, sqlite3.Error) as e:
            raise OutputError(f"{path}: cannot keep the token counts: {e}") from None

    def get(self, keys: list[str]) -> dict[str, int]:
        """The counts already known among ``keys``."""
        found: dict[str, int] = {}
        for lo in range(0, len(keys), 500):
            part = keys[lo:lo + 500]
            marks = ",".join("?" * len(part))
            found.update(self._db.execute(f"SELECT key, tokens FROM counts WHERE key IN ({marks})", part))
        return found

    def put(self, counts: Mapping[str, int]) -> None:
        """Record counts (committed at once: an interrupted estimate keeps what it counted)."""
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO counts VALUES (?, ?)", counts.items())

    def close(self) -> None:
        """Release the file."""
        self._db.close()


def count_exactly(provider: Provider, bodies: Mapping[str, bytes], cache: CountCache, *, base_url: str,
                  api_key: str | None, max_attempts: int, timeout_s: float) -> dict[str, int]:
    """Every request's exact prompt tokens (key -> tokens): the cache's, then the provider's for the rest."""
    counts = cache.get(list(bodies))
    todo = [k for k in bodies if k not in counts]
    if not todo:
        return counts
    assert isinstance(provider, CountsTokens)  # the caller refuses a provider without a counting endpoint
    path, to_body, answer = provider.count_path, provider.count_tokens_body, provider.count_answer
    policy = RetryPolicy(max_attempts)

    async def main() -> None:
        budget = RateBudget(None, None)  # no limits of its own: it holds the pause a 429 asks for
        queue: asyncio.Queue[str] = asyncio.Queue()
        for k in todo:
            queue.put_nowait(k)
        found: dict[str, int] = {}

        async def one(client: ApiClient, key: str) -> int:
            async for attempt in policy.asynchronous(asyncio.sleep):
                with attempt:
                    await budget.acquire(0)
                    try:
                        return int(await client.call(path, to_body(bodies[key]), answer))
                    except RateLimited as e:
                        budget.pause(e.retry_after if e.retry_after is not None else 1.0)
                        raise
            raise AssertionError("unreachable")  # pragma: no cover

        async def worker(client: ApiClient) -> None:
            while not queue.empty():
                key = queue.get_nowait()
                found[key] = await one(client, key)
                if len(found) >= 200:
                    cache.put(found)
                    counts.update(found)
                    found.clear()

        async with ApiClient(base_url, api_key, timeout_s=timeout_s, concurrency=WORKERS, provider=provider) as client:
            try:
                await asyncio.gather(*(worker(client) for _ in range(WORKERS)))
            finally:
                cache.put(found)
                counts.update(found)

    try:
        asyncio.run(main())
    except ProviderError as e:
        raise type(e)(f"counting tokens with {path}: {e}; the counts so far are kept", kind=e.kind,
                      status=e.status) from None
    return counts
