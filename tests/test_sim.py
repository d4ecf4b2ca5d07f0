"""The simulator speaks the wire format the client relies on."""

import httpx

from pipeline.providers.openai_wire import parse_duration
from pipeline.tokens import ChatTokenCounter

BODY = {"model": "gpt-4o-mini", "max_completion_tokens": 20,
        "messages": [{"role": "user", "content": "Summarise:\n\nThe kettle boils fast. It is loud."}]}


def test_chat_answer_usage_and_rate_headers(sim):
    with sim(rpm=100, tpm=10_000) as s:
        r = httpx.post(f"{s.base_url}/chat/completions", json=BODY)
    assert r.status_code == 200
    data = r.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["message"]["content"] == "In short: The kettle boils fast."
    prompt = ChatTokenCounter("gpt-4o-mini").count_messages(BODY["messages"])
    assert data["usage"]["prompt_tokens"] == prompt
    h = r.headers
    assert h["x-ratelimit-limit-requests"] == "100" and h["x-ratelimit-remaining-requests"] == "99"
    assert int(h["x-ratelimit-remaining-tokens"]) == 10_000 - prompt - 20
    assert parse_duration(h["x-ratelimit-reset-requests"]) > 0


def test_rate_limit_429_has_retry_after_and_openai_body(sim):
    with sim(rpm=2) as s:
        codes = [httpx.post(f"{s.base_url}/chat/completions", json=BODY) for _ in range(3)]
        assert s.stats.rate_limited == 1
    r = codes[-1]
    assert [c.status_code for c in codes] == [200, 200, 429]
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert float(r.headers["retry-after-ms"]) > 0 and int(r.headers["retry-after"]) >= 1


def test_length_limit_cuts_the_answer(sim):
    body = {**BODY, "max_completion_tokens": 3}
    with sim() as s:
        data = httpx.post(f"{s.base_url}/chat/completions", json=body).json()
    assert data["choices"][0]["finish_reason"] == "length" and data["usage"]["completion_tokens"] == 3


def test_embeddings_and_models_and_stats(sim):
    with sim() as s:
        r = httpx.post(f"{s.base_url}/embeddings", json={"model": "text-embedding-3-small", "input": ["a", "b"],
                                                        "dimensions": 8, "encoding_format": "float"})
        models = httpx.get(f"{s.base_url}/models").json()
        stats = httpx.get(f"{s.base_url}/sim/stats").json()
    data = r.json()
    assert [d["index"] for d in data["data"]] == [0, 1] and len(data["data"][0]["embedding"]) == 8
    assert data["usage"]["prompt_tokens"] == 2
    assert models["object"] == "list"
    assert stats["requests"] == 1 and stats["ok"] == 1


def test_context_window_is_enforced(sim):
    body = {**BODY, "max_completion_tokens": 200_000}
    with sim() as s:
        r = httpx.post(f"{s.base_url}/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_limits_enforced_over_a_short_window_refuse_bursts(sim):
    with sim(rpm=120, limit_window_s=1.0) as s:  # 2 requests a second, at most 2 at once
        codes = [httpx.post(f"{s.base_url}/chat/completions", json=BODY).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        stats = httpx.get(f"{s.base_url}/sim/stats").json()
    assert sum(stats["admitted_per_s"]) == 2 and stats["rate_limited"] == 1


def test_token_bucket_model_starts_empty_at_the_first_request_and_refills_continuously(sim):
    with sim(rpm=600, limit_model="token-bucket", start_empty=True) as s:
        now = [1000.0]
        s.sim.clock = lambda: now[0]  # the limits' time moves only when the test says: a busy machine cannot
        now[0] += 30  # the server has been up a while: the bucket is still empty at the first request
        first = httpx.post(f"{s.base_url}/chat/completions", json=BODY)
        assert first.status_code == 429 and float(first.headers["retry-after-ms"]) <= 100
        now[0] += 0.12  # 10 a second come back: one request's worth, and a fifth
        second = httpx.post(f"{s.base_url}/chat/completions", json=BODY)
        assert second.status_code == 200 and second.headers["x-ratelimit-remaining-requests"] == "0"
        # reset = the time until the bucket holds a whole minute again
        assert 55 < parse_duration(second.headers["x-ratelimit-reset-requests"]) <= 60
    with sim(rpm=600, limit_model="token-bucket") as s:  # starting full: a minute's worth at once
        codes = {httpx.post(f"{s.base_url}/chat/completions", json=BODY).status_code for _ in range(50)}
        assert codes == {200}


def test_tpm_counted_the_way_the_server_estimates_from_characters(sim):
    chars = sum(len(m["content"]) for m in BODY["messages"])
    with sim(tpm=10_000, tpm_count="chars") as s:
        r = httpx.post(f"{s.base_url}/chat/completions", json=BODY)
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 10_000 - 20 - -(-chars // 4)
