"""SIGINT and SIGTERM for the whole of a run, from its first check to its last byte of output.

A signal means "stop, and keep what was paid for". What that takes depends on where the run is:
- before anything is sent (checks, the estimate): stop at once (``Interrupted``, exit 3);
- while requests are in flight: the scheduler stops taking work and gives them a grace period; a second signal
  cancels them (``target``, set by the online runner);
- while the output is written at the end: the write finishes (it holds every answer), and the run then ends
  as interrupted; only a second signal there cuts it short, and the earlier output file is left as it was, since
  the new one is renamed over it only when whole.

The handlers stay installed until the run returns, so a late signal never meets Python's default handler (a
traceback from inside asyncio, or a bare exit 143 that skips the final write).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType, TracebackType

from pipeline.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """The run's signal handlers, as a context manager; ``reason`` is the first signal's, if one came."""

    def __init__(self, resume_hint: str = "") -> None:
        self.resume_hint = resume_hint
        self.reason: Interrupted | None = None
        self.count = 0
        self.target: Callable[[Interrupted], None] | None = None  # the scheduler's, while it runs
        self.deferring = False
        self._before: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopSignals:
        self._before = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        reason = Interrupted(f"stopped by {signal.Signals(signum).name}{self.resume_hint}")
        if self.reason is None:
            self.reason = reason
        if self.target is not None:
            self.target(reason)
            return
        if self.deferring and self.count < 2:
            return
        raise reason

    def raise_if_stopped(self) -> None:
        """Between two steps that are each safe to cut: a signal that came is acted on now."""
        if self.reason is not None:
            raise self.reason
