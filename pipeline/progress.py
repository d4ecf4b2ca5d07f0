"""Progress for people: a rich bar on a terminal, plain log lines when output is piped or logged.

The executor never prints; it calls ``update(stats)`` every half second and this module decides how to show it.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from pipeline.ledger import BatchPart, describe_part
from pipeline.outcome import RunStats

LOG_EVERY_S = 5.0


def _rates(stats: RunStats) -> tuple[float, float]:
    elapsed = max(stats.elapsed_s, 1e-6)
    return stats.requests_sent / elapsed, (stats.prompt_tokens + stats.completion_tokens) / elapsed


RECENT_S = 15.0  # the ETA follows the rate of the last seconds, not the whole run's (a slow start misleads)


class RecentRate:
    """Rows per second over the last ``RECENT_S`` seconds of updates."""

    def __init__(self) -> None:
        self._points: deque[tuple[float, int]] = deque()

    def eta_s(self, stats: RunStats) -> float | None:
        """Seconds left at the recent rate (None before there is one)."""
        now, done = stats.elapsed_s, stats.rows_done
        self._points.append((now, done))
        while len(self._points) > 2 and now - self._points[0][0] > RECENT_S:
            self._points.popleft()
        t0, d0 = self._points[0]
        total = stats.rows_total or 0
        if not total or now - t0 <= 0 or done <= d0 or done >= total:
            return None
        return (total - done) / ((done - d0) / (now - t0))


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def summary_line(stats: RunStats, eta_s: float | None = None) -> str:
    """One line with everything a person watching a run wants to know."""
    req_s, tok_s = _rates(stats)
    total = stats.rows_total or 0
    pct = f" ({stats.rows_done / total:.0%})" if total else ""
    eta = f" | ETA {_clock(eta_s)}" if eta_s is not None else ""
    return (f"rows {stats.rows_done:,}/{total:,}{pct} | elapsed {_clock(stats.elapsed_s)}{eta} | "
            f"{req_s:,.0f} req/s | {tok_s:,.0f} tok/s | ${stats.cost_usd:,.4f} | errors {stats.failed:,} | "
            f"retries {stats.retries:,} | 429s {stats.rate_limited:,} | in flight {stats.in_flight}")


class ProgressDisplay:
    """``with ProgressDisplay() as p: run(..., on_progress=p.update)``."""

    def __init__(self, stream: TextIO | None = None, force_plain: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.plain = force_plain or not self.stream.isatty()
        self._last_log = 0.0
        self._progress: Progress | None = None
        self._task: Any = None
        self._recent = RecentRate()

    def __enter__(self) -> ProgressDisplay:
        if not self.plain:
            self._progress = Progress(
                TextColumn("[bold]rows"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[line]}"),
                console=Console(file=self.stream), transient=False, refresh_per_second=4)
            self._progress.__enter__()
            self._task = self._progress.add_task("run", total=None, line="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def update(self, stats: RunStats) -> None:
        """Show the latest totals (the executor calls this twice a second)."""
        eta = self._recent.eta_s(stats)
        if self._progress is not None:
            req_s = _rates(stats)[0]
            line = (f"{_clock(stats.elapsed_s)}  ETA {_clock(eta) if eta is not None else '-'}  {req_s:,.0f} req/s  "
                    f"in flight {stats.in_flight}  ${stats.cost_usd:,.4f}  errors {stats.failed:,}  "
                    f"retries {stats.retries:,}  429s {stats.rate_limited:,}")
            self._progress.update(self._task, total=stats.rows_total or None, completed=stats.rows_done, line=line)
            return
        now = time.monotonic()
        if now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            print(summary_line(stats, eta), file=self.stream, flush=True)


class BatchDisplay:
    """Batch API mode: one line per batch whenever its status or counts change (polls are minutes apart, so
    a line per change reads better than a bar)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self._shown: dict[int, str] = {}

    def update(self, parts: list[BatchPart]) -> None:
        """Print the batches that changed since the last call."""
        for p in parts:
            line = describe_part(p)
            if self._shown.get(p.part) != line:
                self._shown[p.part] = line
                print(line, file=self.stream, flush=True)
