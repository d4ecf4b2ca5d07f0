"""Shared pieces of the benchmarks: data, the simulator in its own process, and timed runs of the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / "data"
BIN = Path(sys.executable).parent


def dataset(rows: int, seed: int = 42) -> Path:
    """A reviews Parquet file of ``rows`` rows, built once per size with a fixed seed.

    Built in a process of its own: a child's peak RSS as the kernel reports it starts at its parent's resident
    size when it is started, so building the rows here inflated the peak of every run measured after it (the
    1M-row estimate read 778 MiB on its first run, 366-373 MiB on the next ones).
    """
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"reviews-{rows}.parquet"
    if not path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from make_reviews "
                        "import make; make(int(sys.argv[2]), seed=int(sys.argv[3])).write_parquet(sys.argv[4])",
                        str(ROOT / "data"), str(rows), str(seed), str(path)], check=True)
        print(f"built {path.name} ({rows:,} rows, seed {seed}) in {time.perf_counter() - t:.1f} s")
    return path


@contextmanager
def simulator(*args: str) -> Iterator[str]:
    """``pipeline sim`` in its own process on a free loopback port; yields its base URL."""
    from pipeline.sim import simulator_process

    with simulator_process(*args) as (url, _):
        yield url


def sim_stats(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(f"{url}/sim/stats", timeout=5).json()


PROMPT = "Summarise this {{ rating }}-star review of {{ product }}:\n\n{{ text }}"


def write_job(name: str, data: Path, *, concurrency: int = 128, rpm: int | None = None, tpm: int | None = None,
              max_tokens: int = 120, prompt: str = PROMPT, keep: tuple[str, ...] = ("product", "rating"),
              max_attempts: int | None = None) -> Path:
    """A chat job over the bench reviews; ``prompt`` is the user template (Jinja)."""
    limits = f"concurrency = {concurrency}\n"
    if max_attempts:
        limits += f"max_attempts = {max_attempts}\n"
    if rpm:
        limits += f"requests_per_minute = {rpm}\n"
    if tpm:
        limits += f"tokens_per_minute = {tpm}\n"
    job = WORK / f"{name}.toml"
    job.write_text(f'''name = "{name}"
[input]
path = "{data}"
id = "review_id"
keep = {json.dumps(list(keep))}
[request]
model = "gpt-4o-mini"
system = "You summarise customer reviews in one sentence."
prompt = {json.dumps(prompt)}
max_tokens = {max_tokens}
[output]
path = "{WORK / 'out' / name}.parquet"
[limits]
{limits}''')
    return job


def clear_output(name: str) -> None:
    """Remove a bench job's earlier output, manifest and journal: each measurement starts from nothing
    (``--fresh`` would keep every old journal, renamed, and fill the disk over many runs)."""
    for f in (WORK / "out").glob(f"{name}.*"):
        if f.is_dir():
            import shutil

            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)


def timed_run(job: Path, url: str, *extra: str) -> dict[str, Any]:
    """Run ``pipeline run`` in a child process; returns wall time, peak RSS (MiB), CPU seconds and the manifest."""
    clear_output(job.stem)
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "pipeline"), "run", str(job), "--base-url", url, "--yes", "--plain", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENAI_API_KEY": "sk-bench"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    out, err = proc.stdout.read() if proc.stdout else "", proc.stderr.read() if proc.stderr else ""  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code not in (0, 1):
        raise SystemExit(f"run failed ({code}): {err[-2000:]}")
    manifest = json.loads((WORK / "out" / f"{job.stem}.manifest.json").read_text())
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            "manifest": manifest, "stdout": out}
