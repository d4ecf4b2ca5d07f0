"""The scheduler and the senders, driven through httpx.MockTransport on a virtual-time loop: no server, no
real sleeps. Every wait here (retry-after, backoff, the grace period, a slow answer) passes in loop time only;
the same behaviours are tested end to end against the simulator in test_run.py and test_chaos.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import polars as pl
import pytest

from pipeline.client import ApiClient
from pipeline.endpoints.chat import ChatSender
from pipeline.endpoints.embeddings import EmbeddingsSender
from pipeline.errors import AbortError, BudgetExceeded, Interrupted
from pipeline.execute import Scheduler
from pipeline.job import RequestSpec
from pipeline.journal import Journal
from pipeline.keys import request_key
from pipeline.limits import RateBudget
from pipeline.pricing import Price, Rate
from pipeline.providers.openai import OpenAIProvider
from pipeline.rendered import RenderedChunk, Request
from pipeline.retry import RetryPolicy
from pipeline.senders import Sending
from pipeline.sink import OutputPaths, PartWriter
from pipeline.spec import EmbeddingSpec
from tests.conftest import run_virtual


def chat_ok(content: str = "fine", prompt: int = 10, completion: int = 5) -> httpx.Response:
    return httpx.Response(200, content=orjson.dumps({
        "model": "m", "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}))


def error(status: int, code: str | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, headers=headers or {},
                          content=orjson.dumps({"error": {"message": f"said {status}", "code": code}}))


def chat_requests(texts: list[str]) -> list[Request]:
    out = []
    for i, text in enumerate(texts):
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}]})
        out.append(Request(i, f"r{i}", request_key("chat", body), body, 10, 5, ()))
    return out


class Harness:
    """One scheduler run over mock HTTP: what the server saw (with loop times) and what the output holds."""

    def __init__(self, tmp_path: Path, handler: Callable[[httpx.Request, dict[str, Any]], Any], *,
                 concurrency: int = 4, max_attempts: int = 3, rpm: int | None = None, price: Price | None = None,
                 max_cost_usd: float | None = None, grace_s: float = 5.0, embeddings: RequestSpec | None = None,
                 chunk_rows: int = 1000, breaker: Any = None) -> None:
        self.tmp, self.handler = tmp_path, handler
        self.concurrency, self.max_attempts, self.rpm, self.price = concurrency, max_attempts, rpm, price
        self.max_cost_usd, self.grace_s, self.embeddings = max_cost_usd, grace_s, embeddings
        self.chunk_rows, self.breaker = chunk_rows, breaker
        self.seen: list[tuple[float, bytes]] = []  # (loop time, body) of every request the "server" got
        self.state: dict[str, Any] = {}
        self.scheduler: Scheduler | None = None

    async def _serve(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((asyncio.get_running_loop().time(), request.content))
        await asyncio.sleep(0)  # an answer arrives through the loop, as from a socket: other tasks get a turn
        got = self.handler(request, self.state)
        return await got if asyncio.iscoroutine(got) else got

    def run(self, requests: list[Request], during: Callable[[Scheduler], Any] | None = None) -> Any:
        paths = OutputPaths(self.tmp / "out.parquet")
        sink = PartWriter(paths, {"id": pl.String()}, vectors=self.embeddings is not None, vector_dims=2)
        journal = Journal(paths.journal)

        async def main() -> Any:
            async with ApiClient("http://127.0.0.1:1/v1", "sk-x", timeout_s=60, concurrency=self.concurrency,
                                 transport=httpx.MockTransport(self._serve)) as client:
                scheduler = self.scheduler = Scheduler(journal=journal, sink=sink, key_of_row=lambda r: (r.row_id,),
                                                       concurrency=self.concurrency, grace_s=self.grace_s)
                sending = Sending(client, RateBudget(self.rpm, None), RetryPolicy(self.max_attempts),
                                  scheduler.stats, scheduler, price=self.price, max_cost_usd=self.max_cost_usd,
                                  breaker=self.breaker() if self.breaker is not None else None)
                sender = (EmbeddingsSender(sending, self.embeddings, OpenAIProvider().codec(self.embeddings, "t"))
                          if self.embeddings is not None
                          else ChatSender(sending, OpenAIProvider().codec(RequestSpec(model="m"), "t")))

                async def chunks() -> Any:
                    for lo in range(0, len(requests), self.chunk_rows):
                        yield RenderedChunk(requests=requests[lo:lo + self.chunk_rows], skipped=[])

                if during is not None:
                    asyncio.get_running_loop().call_soon(during, scheduler)
                try:
                    return await scheduler.run(chunks(), sender)
                except (AbortError, BudgetExceeded, Interrupted) as e:
                    return e

        try:
            self.result = run_virtual(main())
        finally:
            journal.close()
            sink.finish()
        self.output = pl.read_parquet(paths.output)
        return self.result


def test_a_429_pauses_every_worker_until_its_retry_after(tmp_path):
    def handler(request, state):
        if "limited" not in state:
            state["limited"] = asyncio.get_running_loop().time()
            return error(429, headers={"retry-after": "2"})
        return chat_ok()

    h = Harness(tmp_path, handler, concurrency=4)
    stats = h.run(chat_requests([f"q{i}" for i in range(12)]))
    limited_at = h.state["limited"]
    after = [t for t, _ in h.seen if t > limited_at]
    assert after and min(after) >= limited_at + 2.0  # nobody sent during the pause, not just the one refused
    assert stats.rate_limited == 1 and stats.retries == 1 and stats.ok == 12
    assert h.output["status"].to_list() == ["ok"] * 12
    assert h.output.filter(pl.col("id") == "r0")["attempts"].item() == 2


def test_the_first_systemic_error_stops_a_run_that_has_no_answer_yet(tmp_path):
    h = Harness(tmp_path, lambda request, state: error(401), concurrency=2)
    result = h.run(chat_requests([f"q{i}" for i in range(50)]))
    assert isinstance(result, AbortError) and result.kind == "auth"
    assert len(h.seen) <= 2  # the requests already in flight, not one per row
    assert h.output.height == 0  # nothing answered; nothing recorded as failed for the rerun to skip


def test_after_some_answers_a_run_stops_on_the_third_systemic_error(tmp_path):
    def handler(request, state):
        state["n"] = state.get("n", 0) + 1
        return chat_ok() if state["n"] <= 5 else error(403)

    h = Harness(tmp_path, handler, concurrency=1)
    result = h.run(chat_requests([f"q{i}" for i in range(40)]))
    assert isinstance(result, AbortError) and result.kind == "permission"
    assert len(h.seen) == 5 + 3  # a flaky 403 is not a verdict; three are
    assert h.output["status"].to_list() == ["ok"] * 5


def test_the_budget_stops_the_run_before_it_is_crossed(tmp_path):
    price = Price(model="m", input=Rate(1e6), output=Rate(1e6), cached_input=Rate(1e6),  # $1 a token
                  batch_input=Rate(5e5), batch_output=Rate(5e5), batch_cached_input=Rate(5e5), source="test",
                  source_date=None)
    h = Harness(tmp_path, lambda request, state: chat_ok(prompt=10, completion=5), concurrency=3, price=price,
                max_cost_usd=100.0)
    result = h.run(chat_requests([f"q{i}" for i in range(30)]))
    assert isinstance(result, BudgetExceeded)
    spent = h.output["cost_usd"].sum()
    assert 0 < spent <= 100.0 and h.scheduler is not None and h.scheduler.stats.cost_usd <= 100.0
    assert len(h.seen) == h.output.height  # every request sent was paid and written


def test_identical_rows_are_sent_once_and_share_the_answer(tmp_path):
    async def handler(request, state):
        await asyncio.sleep(0.5)  # still in flight when its twins are queued
        text = orjson.loads(request.content)["messages"][0]["content"]
        return chat_ok(content=f"answer to {text}")

    h = Harness(tmp_path, handler, concurrency=4)
    stats = h.run(chat_requests(["same", "other", "same", "same", "other"]))
    assert len(h.seen) == 2
    out = h.output.sort("id")
    assert out["content"].to_list() == ["answer to same", "answer to other", "answer to same", "answer to same",
                                        "answer to other"]
    assert out["deduplicated"].to_list() == [False, False, True, True, True]
    assert out.filter(pl.col("deduplicated"))["attempts"].to_list() == [0, 0, 0]
    assert stats.deduplicated == 3 and stats.ok == 5


def embed_requests(texts: list[str]) -> tuple[list[Request], RequestSpec]:
    spec = RequestSpec(model="text-embedding-3-small", endpoint="embeddings",
                       embedding=EmbeddingSpec(batch_size=8, dimensions=2))
    codec = OpenAIProvider().codec(spec, "t")
    reqs = []
    for i, text in enumerate(texts):
        body = codec.body(text)
        reqs.append(Request(i, f"r{i}", request_key("embeddings", body), body, 3, 0, ()))
    return reqs, spec


def embed_handler(request, state):
    inputs = orjson.loads(request.content)["input"]
    if "BAD" in inputs:
        return error(400, code="invalid_input")
    vectors = [{"index": i, "embedding": [float(len(t)), 1.0]} for i, t in enumerate(inputs)]
    return httpx.Response(200, content=orjson.dumps({"data": vectors, "model": "text-embedding-3-small",
                                                     "usage": {"prompt_tokens": 3 * len(inputs)}}))


def test_a_refused_embeddings_batch_is_halved_until_only_the_bad_row_fails(tmp_path):
    texts = [f"t{i}" for i in range(8)]
    texts[5] = "BAD"
    reqs, spec = embed_requests(texts)
    h = Harness(tmp_path, embed_handler, embeddings=spec)
    stats = h.run(reqs)
    sizes = [len(orjson.loads(body)["input"]) for _, body in h.seen]
    assert sizes == [8, 4, 4, 2, 1, 1, 2]  # 8 refused; 0-3 ok; 4-7 refused; 4-5 refused; 4 ok; 5 fails; 6-7 ok
    out = h.output.sort("id")
    assert out.filter(pl.col("status") == "error")["id"].to_list() == ["r5"]
    assert out.filter(pl.col("status") == "error")["error_type"].item() == "http_400"
    assert stats.ok == 7 and stats.failed == 1
    vec = out.filter(pl.col("id") == "r7")["embedding"].item()
    assert np.allclose(vec.to_numpy(), [2.0, 1.0])


def slow(request, state):
    async def answer() -> httpx.Response:
        await asyncio.sleep(state.get("delay", 100.0))
        return chat_ok()
    return answer()


def test_ctrl_c_gives_requests_in_flight_their_grace_period_then_stops(tmp_path):
    h = Harness(tmp_path, slow, concurrency=2, grace_s=5.0)
    h.state["delay"] = 3.0  # finishes within the grace period

    def interrupt(scheduler: Scheduler) -> None:
        asyncio.get_running_loop().call_later(1.0, scheduler.interrupt, Interrupted("stopped by SIGINT"))

    result = h.run(chat_requests([f"q{i}" for i in range(10)]), during=interrupt)
    assert isinstance(result, Interrupted)
    assert len(h.seen) == 2  # no new work after the signal
    assert h.output["status"].to_list() == ["ok", "ok"]  # the two in flight were answered and kept


def test_requests_still_in_flight_after_the_grace_period_are_cancelled(tmp_path):
    h = Harness(tmp_path, slow, concurrency=2, grace_s=5.0)  # answers would take 100 s

    def interrupt(scheduler: Scheduler) -> None:
        asyncio.get_running_loop().call_later(1.0, scheduler.interrupt, Interrupted("stopped by SIGINT"))

    result = h.run(chat_requests([f"q{i}" for i in range(10)]), during=interrupt)
    assert isinstance(result, Interrupted) and h.output.height == 0


def test_a_second_ctrl_c_cancels_at_once(tmp_path):
    h = Harness(tmp_path, slow, concurrency=2, grace_s=60.0)
    ended: list[float] = []

    def interrupt(scheduler: Scheduler) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(1.0, scheduler.interrupt, Interrupted("stopped by SIGINT"))
        loop.call_later(2.0, scheduler.interrupt, Interrupted("stopped by a second SIGINT"))

    async def watch(scheduler: Scheduler) -> None:
        await scheduler.stopping.wait()
        while scheduler._workers and not all(t.done() for t in scheduler._workers):
            await asyncio.sleep(0.1)
        ended.append(asyncio.get_running_loop().time())

    def during(scheduler: Scheduler) -> None:
        interrupt(scheduler)
        asyncio.get_running_loop().create_task(watch(scheduler))

    result = h.run(chat_requests([f"q{i}" for i in range(10)]), during=during)
    assert isinstance(result, Interrupted) and str(result) == "stopped by SIGINT"  # the first reason is kept
    assert ended and ended[0] < 3.0  # not the 60 s grace period
    assert h.output.height == 0


def test_transient_errors_are_retried_with_backoff_and_recorded_when_they_outlast_it(tmp_path):
    h = Harness(tmp_path, lambda request, state: error(503), concurrency=1, max_attempts=3)
    stats = h.run(chat_requests(["q0"]))
    times = [t for t, _ in h.seen]
    assert len(times) == 3 and stats.retries == 2
    row = h.output.row(0, named=True)
    assert row["status"] == "error" and row["error_type"] == "server_error" and row["attempts"] == 3


@pytest.mark.parametrize("rpm", [600])
def test_requests_are_paced_by_the_rate_budget(tmp_path, rpm):
    h = Harness(tmp_path, lambda request, state: chat_ok(), concurrency=8, rpm=rpm)
    h.run(chat_requests([f"q{i}" for i in range(40)]))
    times = sorted(t for t, _ in h.seen)
    # 10 a second after a burst of half a second's worth (5): 40 requests take about 3.5 s of loop time
    assert 3.0 <= times[-1] - times[0] <= 4.5
    assert all(sum(1 for t in times if w <= t < w + 1.0) <= 10 + 5 for w in np.arange(0, times[-1], 0.25))
