"""pipeline: send every row of a table to an OpenAI-compatible API and get a clean Parquet table back."""

import contextlib
import ctypes
import os
import sys

# Arrow's buffers from the C allocator rather than its bundled mimalloc, which keeps what it took: writing the
# output's row groups left 18 MiB more resident at the end of a 20k-row run (275 against 257 MiB peak;
# bench/throughput.py). Read by Arrow when it loads, so it is set before anything imports pyarrow; a user's own setting
# wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


def _one_malloc_arena() -> None:
    """The command line's process gets one glibc malloc arena (``MALLOC_ARENA_MAX=1``) unless the user chose.

    glibc gives each thread that allocates an arena of its own, and polars' and pyarrow's worker threads leave
    memory resident in theirs: the 1M-row estimate peaked at 338 MiB with them and 288 MiB without, in the
    same time (bench/estimate.py). It must happen before polars and pyarrow start their threads, so here, before they
    are imported; and only for the `pipeline` command, which owns its process (a library caller's keeps its own).
    """
    if os.path.basename(sys.argv[0] if sys.argv else "") != "pipeline" or "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(AttributeError, OSError):  # not glibc: its allocator keeps its own ways
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


_one_malloc_arena()

from pipeline.errors import PipelineError  # noqa: E402 - after the allocator's setting
from pipeline.estimate import Estimate  # noqa: E402 - after the allocator's setting
from pipeline.frames import amap, estimate, map  # noqa: E402 - last: `estimate` takes a frame or a Job
from pipeline.job import Job  # noqa: E402 - after the allocator's setting
from pipeline.run import RunResult, run  # noqa: E402 - after the allocator's setting

__all__ = ["Estimate", "Job", "PipelineError", "RunResult", "amap", "estimate", "map", "run"]
