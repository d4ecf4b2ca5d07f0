"""One run per job output at a time: a second run of the same job would pay for every row again.

Two runs of one job that overlap (a nightly cron run still going when the next starts, a second terminal) both
find the same rows unanswered and both send them: the output comes out right, which hides that every row was paid
twice. So a run holds an exclusive lock tied to its output, ``NAME.lock`` beside it, for as long as it may send or
write. The lock is an OS file lock (``flock``) on that file, not the file's existence: the kernel releases it
when the process ends however it ends, so a ``kill -9`` never leaves a stale lock behind and nobody has to
delete anything. The file holds who took it (PID, host, start time, command) only so the refusal can name them.

Readers (``pipeline report``, ``pipeline batches``) never take it: reading while a run writes is safe (the
journal is SQLite in WAL mode, the output is replaced by a rename).
"""

from __future__ import annotations

import json
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

from pipeline.errors import OutputError, RunLocked

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; runs there are not locked
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """The exclusive lock of one output; ``with RunLock(path):`` or ``acquire()`` / ``release()``."""

    def __init__(self, output: Path) -> None:
        self.output = output
        self.path = output.with_suffix(".lock")
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock at once, or raise RunLocked naming the run that holds it."""
        if self._fd is not None or fcntl is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{self.path.parent}: cannot create the output folder: {e.strerror}") from None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create the run's lock file: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(f"{self.output}: another run of this job is going on ({holder}); "
                            "two runs at once would pay for every row twice. Wait for it to end (or stop it), "
                            "then run again: it resumes where that run stopped") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv[:6]))}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the lock go (the file stays: deleting it would race with a run taking it)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        os.close(fd)  # closing the only descriptor releases the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, as its file says (a run that has just taken it may not have written it yet)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "its details are not written yet"
    return (f"PID {record.get('pid')} on {record.get('host')}, started {record.get('started_at')}"
            + (f": {record['command']}" if record.get("command") else ""))
