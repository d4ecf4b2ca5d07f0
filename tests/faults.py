"""Faults the tests put in front of the code they test (never in the package): pickled by value for Ray's
workers, which cannot import the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class KillAfter:
    """A task sink wrapper: the first task to have committed ``rows`` rows while ``marker`` does not exist
    creates it and exits at once, as a killed worker would (``os._exit``: no cleanup, nothing flushed)."""

    def __init__(self, rows: int, marker: Path) -> None:
        self.rows, self.marker = rows, marker

    def __call__(self, sink: Any) -> Any:
        return _Killing(sink, self.rows, self.marker)


class _Killing:
    def __init__(self, sink: Any, rows: int, marker: Path) -> None:
        self._sink, self._rows, self._marker = sink, rows, marker
        self.checker = sink.checker

    def add(self, *args: Any, **kwargs: Any) -> None:
        self._sink.add(*args, **kwargs)
        if self._marker is not None and self._sink.rows_committed >= self._rows:
            try:
                fd = os.open(self._marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self._marker = None  # another task died already: this one lives
                return
            os.close(fd)
            os._exit(17)

    def add_block(self, *args: Any, **kwargs: Any) -> None:
        self._sink.add_block(*args, **kwargs)
