"""The one retry policy, for online requests and Batch API calls alike, declared from tenacity's parts.

What is retried is decided by type (``TransientError``, including ``RateLimited``); how long to wait is the
server's hint when it gave one (``retry-after``), else exponential backoff with full jitter. The sleep is
injected, so retry behaviour is tested without waiting. Transport failures (refused, reset, timed out) are
mapped to ``TransientError`` here, once, for both HTTP clients.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base, wait_random_exponential

from pipeline.errors import TransientError

R = TypeVar("R")


class wait_server_hint(wait_base):
    """Wait what the server asked for (retry-after), else the fallback (exponential backoff, full jitter)."""

    def __init__(self, fallback: wait_base, jitter_s: float = 0.05) -> None:
        self.fallback, self.jitter_s = fallback, jitter_s

    def __call__(self, retry_state: RetryCallState) -> float:
        """The wait before the next try."""
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            return float(hint) + self.jitter_s
        return float(self.fallback(retry_state))


@dataclass(frozen=True)
class RetryPolicy:
    """Up to ``max_attempts`` tries of transient failures, waiting the server's hint or a jittered backoff."""

    max_attempts: int
    multiplier_s: float = 0.5
    max_wait_s: float = 30.0

    def _parts(self) -> dict[str, Any]:  # tenacity's keyword arguments, shared by both forms
        return {"stop": stop_after_attempt(self.max_attempts), "reraise": True,
                "wait": wait_server_hint(wait_random_exponential(multiplier=self.multiplier_s, max=self.max_wait_s)),
                "retry": retry_if_exception_type(TransientError)}

    def asynchronous(self, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                     before_sleep: Callable[[RetryCallState], Any] | None = None) -> AsyncRetrying:
        """The policy for ``async for attempt in ...`` (online requests); ``before_sleep`` sees each retry."""
        extra: dict[str, Any] = {"before_sleep": before_sleep} if before_sleep is not None else {}
        return AsyncRetrying(sleep=sleep, **self._parts(), **extra)

    async def call(self, attempt: Callable[[], Awaitable[R]], sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                   before_sleep: Callable[[RetryCallState], Any] | None = None) -> R:
        """``attempt()`` under the policy. The first try runs outside tenacity: most requests succeed at once,
        and tenacity's loop costs more CPU per request (its action chain is rebuilt, and each step inspected,
        on every iteration) than the rest of a request's bookkeeping. A failure hands that same error to
        tenacity as its first attempt, so the waits, the stop and ``before_sleep`` are tenacity's, exactly as
        if it had run from the start."""
        try:
            return await attempt()
        except TransientError as e:
            first: TransientError | None = e

        async def again() -> R:
            nonlocal first
            if first is not None:
                err, first = first, None
                raise err
            return await attempt()

        return await self.asynchronous(sleep, before_sleep)(again)

    def synchronous(self, sleep: Callable[[float], None]) -> Retrying:
        """The same policy for blocking calls (the Batch API's files and batches)."""
        return Retrying(sleep=sleep, **self._parts())


def transport_error(e: BaseException, timeout_s: float, redact: Callable[[str], str], what: str = "") -> TransientError:
    """A failure to get any answer (refused, reset, DNS, timed out) as the transient error it is; the message
    says which, with the key redacted, and names the call when ``what`` says it."""
    prefix = f"{what}: " if what else ""
    if isinstance(e, httpx.TimeoutException | TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        return TransientError(f"{prefix}timed out after {timeout_s:g} s", kind="timeout")
    reason = redact(str(e) or type(e).__name__)
    return TransientError(f"{prefix}connection error: {reason}", kind="connection")


TRANSPORT_ERRORS = (httpx.TransportError, aiohttp.ClientError, ConnectionError, TimeoutError)
