"""Shared fixtures: every test runs in its own folder with a clean environment, and builds jobs with factories."""

from __future__ import annotations

import asyncio
import selectors
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

SECRET = "sk-test-SECRET-never-print-me-0123456789"


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a temp folder; no real key or base URL can leak in from the developer's shell."""
    monkeypatch.chdir(tmp_path)
    for var in ("OPENAI_API_KEY", "PIPELINE_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def reviews(n: int = 20) -> pl.DataFrame:
    """A small deterministic input with text, a product, a rating and a string id."""
    return pl.DataFrame({
        "review_id": [f"r{i:04d}" for i in range(n)],
        "product": [["lamp", "kettle", "tent"][i % 3] for i in range(n)],
        "rating": [1 + i % 5 for i in range(n)],
        "text": [f"Review number {i}: the product was {'great' if i % 2 else 'poor'} and arrived on day {i % 7}."
                 for i in range(n)],
    })


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """Write an input file and a job file; keyword arguments replace whole sections of the TOML text."""

    def make(*, rows: int = 20, data: pl.DataFrame | None = None, fmt: str = "parquet", name: str = "t",
             request: str | None = None, input: str | None = None, extra: str = "", limits: str = "",
             output: str | None = None) -> Path:
        df = reviews(rows) if data is None else data
        path = tmp_path / f"input.{fmt}"
        {"parquet": df.write_parquet, "csv": df.write_csv, "jsonl": df.write_ndjson}[fmt](path)
        input = input if input is not None else f'path = "input.{fmt}"\nid = "review_id"\nkeep = ["product"]'
        request = request if request is not None else textwrap.dedent('''\
            model = "gpt-4o-mini"
            system = "Summarise in one sentence."
            prompt = "Review of {{ product }}: {{ text }}"
            max_tokens = 50''')
        output = output if output is not None else 'path = "out/result.parquet"'
        job = (f'name = "{name}"\n\n[input]\n{input}\n\n[request]\n{request}\n\n[output]\n{output}\n\n'
               f'[limits]\n{limits}\n{extra}\n')
        p = tmp_path / "job.toml"
        p.write_text(job)
        return p

    return make


def wait_for(check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Wait for a state (not a time): poll ``check`` until it holds, failing after ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def run_cli(*args: Any, input: str | None = None) -> Any:
    """Invoke the click app in-process; returns click's Result."""
    from click.testing import CliRunner

    from pipeline.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], input=input, catch_exceptions=False)


@pytest.fixture
def sim() -> Any:
    """Start simulators on free loopback ports: ``with sim(rpm=600) as s: s.base_url``."""
    from pipeline.sim import SimConfig, SimServer

    def start(**config: Any) -> SimServer:
        return SimServer(SimConfig(**config))

    return start


@pytest.fixture
def sim_process() -> Any:
    """Start ``pipeline sim`` in its own process (its own core), for tests that need full speed.

    ``with sim_process("--rpm", "600") as (base_url, stats): ...``; ``stats()`` reads /v1/sim/stats.
    """
    import contextlib

    import httpx

    from pipeline.sim import simulator_process

    @contextlib.contextmanager
    def start(*args: str) -> Any:
        with simulator_process(*args) as (url, _):
            yield url, lambda: httpx.get(f"{url}/sim/stats", timeout=5).json()

    return start


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock jumps to the next timer whenever nothing is ready: sleeps, timeouts, retry
    waits and the limiter's buckets all run on it in no real time (as aiolimiter's own tests move the loop's
    clock). Real I/O and threads still work: with no timer due, it waits for them for real."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(selector=_VirtualSelector(self))
        self._clock_resolution = 1e-6  # timers due within a microsecond run now: float round-off cannot stall it

    def time(self) -> float:
        """The virtual clock."""
        return self.now


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        # A turn of the loop takes a little time on a real clock too; without it, a limiter whose level is a
        # float hair above its threshold re-arms a timer at "now" forever (aiolimiter does, on a frozen clock).
        self._loop.now += 1e-9
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:
            return super().select(None)
        self._loop.now += max(timeout, 1e-6)
        return []


def run_virtual(coro: Any) -> Any:
    """Run a coroutine on a fresh virtual-time loop; returns its result."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(coro)


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Any:
    """A local S3 server (moto) on 127.0.0.1 with a bucket ``data``; yields pyarrow's filesystem on it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from pipeline.sim.server import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
                 "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket="data")
    from pipeline.storage import filesystem

    try:
        yield lambda url: filesystem(url)[0]
    finally:
        server.stop()
