"""The breaker over mock HTTP on a virtual clock: a server refusing every request's shape stops the run within a
few requests, and a down endpoint is paused and probed instead of spending every row's attempts."""

from __future__ import annotations

import asyncio

import httpx
import orjson

from pipeline.breaker import Breaker
from pipeline.errors import AbortError
from tests.test_execute import Harness, chat_ok, chat_requests


def same_500(request, state):
    return httpx.Response(500, content=orjson.dumps({"error": {"message": "json_schema is not supported"}}))


def test_the_same_500_for_every_request_stops_the_run_after_three_quoting_the_server(tmp_path):
    h = Harness(tmp_path, same_500, concurrency=16, max_attempts=6,
                breaker=lambda: Breaker(lambda status, msg: 'set [api].structured_output = "json_object"'))
    result = h.run(chat_requests([f"q{i}" for i in range(200)]))
    assert isinstance(result, AbortError) and result.kind == "refused_request"
    assert "HTTP 500: json_schema is not supported" in str(result)
    assert '[api].structured_output = "json_object"' in str(result)
    assert len(h.seen) == 4  # the first wave, not 200 rows x 6 attempts


def test_without_the_breaker_every_row_would_spend_its_attempts(tmp_path):
    h = Harness(tmp_path, same_500, concurrency=16, max_attempts=3)
    stats = h.run(chat_requests([f"q{i}" for i in range(20)]))
    assert len(h.seen) == 60 and stats.failed == 20  # what the breaker saves


def test_identical_4xx_answers_need_more_evidence_so_a_few_filtered_rows_do_not_stop_a_run(tmp_path):
    def handler(request, state):
        if b"bad" in request.content:
            return httpx.Response(400, content=orjson.dumps({"error": {"message": "flagged by the content filter"}}))
        return chat_ok()

    h = Harness(tmp_path, handler, concurrency=4, breaker=lambda: Breaker(lambda s, m: "hint"))
    stats = h.run(chat_requests([f"bad {i}" for i in range(5)] + [f"q{i}" for i in range(20)]))
    assert stats.failed == 5 and stats.ok == 20


def test_answers_after_the_first_success_are_never_taken_as_a_refused_shape(tmp_path):
    def handler(request, state):
        state["n"] = state.get("n", 0) + 1
        return chat_ok() if state["n"] == 1 else same_500(request, state)

    h = Harness(tmp_path, handler, concurrency=2, max_attempts=1, breaker=lambda: Breaker(lambda s, m: "hint"))
    stats = h.run(chat_requests([f"q{i}" for i in range(6)]))
    assert stats.ok == 1 and stats.failed == 5  # failed row by row, not stopped


def test_a_down_endpoint_is_paused_then_probed_by_one_request_and_resumes(tmp_path):
    def handler(request, state):
        now = asyncio.get_running_loop().time()
        if state.setdefault("down_until", None) is None:
            state["down_until"] = now + 10.0  # the first request finds it answering, then it goes down for 10 s
            return chat_ok()
        if now < state["down_until"]:
            return httpx.Response(503, content=f"upstream unavailable at {now:.6f}".encode())  # bodies differ
        return chat_ok()

    breaker = Breaker(lambda s, m: "hint", trip_after=8, pause_s=2.0)
    h = Harness(tmp_path, handler, concurrency=8, max_attempts=6, breaker=lambda: breaker)
    stats = h.run(chat_requests([f"q{i}" for i in range(40)]))
    assert stats.ok == 40 and breaker.trips == 1
    down = [t for t, _ in h.seen if t < h.state["down_until"]]
    # a few answers trip it; while it is paused only single probes go out (2 s, 4 s, 8 s apart)
    assert len(down) <= 8 + 8 + 4


def test_until_the_first_answer_only_the_first_wave_is_in_flight(tmp_path):
    in_flight = {"now": 0, "most": 0}

    async def handler(request, state):
        in_flight["now"] += 1
        in_flight["most"] = max(in_flight["most"], in_flight["now"])
        await asyncio.sleep(1.0)
        in_flight["now"] -= 1
        return chat_ok()

    h = Harness(tmp_path, handler, concurrency=32, breaker=lambda: Breaker(lambda s, m: "hint"))
    stats = h.run(chat_requests([f"q{i}" for i in range(100)]))
    assert stats.ok == 100
    first_second = [t for t, _ in h.seen if t < 0.5]
    assert len(first_second) == 4 and in_flight["most"] == 32  # then the whole concurrency
