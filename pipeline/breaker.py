"""When the whole endpoint, not one row, is the problem: stop early, or pause and probe.

Two signs, both from the first answers of a run or a streak of them, shared by every worker:

- **The server refuses the request's shape.** Until the first answer comes back, at most ``first_wave``
  distinct requests are under way (with their retries). If ``same`` distinct requests fail with the same
  status and the same error body before anything succeeds, every other row would fail that way too (a server
  that rejects ``json_schema`` with a 500 is not having transient trouble): the run stops with one message
  quoting the server and naming the job key likely to fix it, after a handful of requests instead of every
  row's attempts. A 4xx needs
  ``same_4xx`` of them: such a row fails alone after one try anyway, and a few rows refused alike (a content
  filter) must not stop a run, nor every rerun of it, when the rest would be answered.
- **The endpoint is down.** After ``trip_after`` answers in a row are 5xx or connection failures, nobody
  sends until a pause has passed; then one request probes. Answered: sending resumes. Failed: the pause
  doubles (up to ``max_pause_s``). Rows waiting meanwhile spend none of their attempts.

Time is the event loop's (a test runs it on a virtual clock).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable

from pipeline.errors import AbortError, ProviderError, RateLimited, TransientError

FIRST_WAVE = 4   # requests in flight until the first answer: enough to learn, few enough to waste little
SAME = 3         # distinct requests failing alike with a 5xx, with no answer yet: the shape is refused
SAME_4XX = 10    # the same with a 4xx (one try per row, so less is wasted by waiting for more evidence)


def _down(e: ProviderError) -> bool:
    """A failure of the endpoint (5xx, no answer at all), not of the request."""
    return isinstance(e, TransientError) and not isinstance(e, RateLimited) and (e.status is None or e.status >= 500)


class Breaker:
    """Shared by the workers of one run: ``probe = await b.admit(new)`` before each attempt (``new`` for a
    request's first), ``b.record(...)`` after it, and ``b.end()`` when a request is done trying."""

    def __init__(self, hint: Callable[[int, str], str], *, first_wave: int = FIRST_WAVE, same: int = SAME,
                 same_4xx: int = SAME_4XX, trip_after: int = 8, pause_s: float = 2.0,
                 max_pause_s: float = 60.0) -> None:
        self.hint, self.first_wave, self.same, self.trip_after = hint, first_wave, same, trip_after
        self.same_4xx = same_4xx
        self.pause_s, self.max_pause_s = pause_s, max_pause_s
        self.proven = False            # something was answered: the shape is accepted
        self.trips = 0                 # times the endpoint was found down
        self._pause = pause_s
        self._calls = 0  # requests under way (first attempt made, not done trying)
        self._streak = 0
        self._open_until: float | None = None
        self._probing = False
        self._refusals: Counter[tuple[int | None, str]] = Counter()
        self._changed = asyncio.Event()

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _wait(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    async def admit(self, new: bool) -> bool:
        """Wait until an attempt may be sent (``new``: a request's first); True when it is the probe of a
        paused endpoint."""
        while True:
            if new and not self.proven and self._calls >= self.first_wave:
                await self._wait(None)
                continue
            if self._open_until is not None:
                now = self._now()
                if self._probing or now < self._open_until:
                    await self._wait(None if self._probing else self._open_until - now)
                    continue
                self._probing = True
                probe = True
            else:
                probe = False
            if new:
                self._calls += 1
            return probe

    def end(self) -> None:
        """A request is done trying (answered, failed for good, or the run stopped)."""
        self._calls -= 1
        if not self.proven:
            self._notify()

    def record(self, probe: bool, error: ProviderError | None) -> None:
        """What the attempt ended as (None: answered)."""
        if error is None:
            self.proven, self._streak = True, 0
            self._open_until, self._probing, self._pause = None, False, self.pause_s
        else:
            self._streak = self._streak + 1 if _down(error) else 0
            if probe:
                self._probing = False
                self._open_until = self._now() + self._pause
                self._pause = min(self._pause * 2, self.max_pause_s)
            elif self._open_until is None and self._streak >= self.trip_after:
                self.trips += 1
                self._open_until = self._now() + self._pause
        self._notify()

    def release(self, probe: bool) -> None:
        """An attempt that ended without an answer or an error (cancelled)."""
        if probe:
            self._probing = False
        self._notify()

    def refused(self, error: ProviderError) -> AbortError | None:
        """A distinct request's first failure; the error that stops the run when ``same`` of them failed alike
        before anything was answered (a 429 says nothing about the request's shape)."""
        if self.proven or isinstance(error, RateLimited | AbortError):
            return None
        signature = (error.status, str(error))
        self._refusals[signature] += 1
        needed = self.same if isinstance(error, TransientError) else self.same_4xx
        if self._refusals[signature] < needed:
            return None
        if error.status is None:  # no answer at all: nothing about the request, everything about the address
            return AbortError(f"the first {needed} distinct requests got no answer: {error}; check [api].base_url "
                              "(or --base-url) and that the server is running", kind="unreachable")
        return AbortError(f"the first {needed} distinct requests were all refused with the same answer, so every "
                          f"row would be: {error}; {self.hint(error.status, str(error))}",
                          kind="refused_request", status=error.status)
