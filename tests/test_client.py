import asyncio

import httpx
import orjson
import pytest

from pipeline.access import check_transport_security
from pipeline.client import ApiClient, redact
from pipeline.errors import AbortError, RowError, TransientError, UsageError
from pipeline.providers.openai import OpenAIProvider
from pipeline.providers.openai_wire import classify, parse_duration, retry_after
from pipeline.spec import RequestSpec

OK = orjson.dumps({"id": "x", "object": "chat.completion", "model": "gpt-4o-mini-2024-07-18",
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": None},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 4},
                             "completion_tokens_details": {"reasoning_tokens": 1}}})

CHAT = OpenAIProvider().codec(RequestSpec(model="m"), "t")  # reads a chat response


def err(code=None, type_=None, message="m"):
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}})


def test_ok_answer_parses_usage_details():
    a = classify(200, httpx.Headers({"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-tokens": "6m0s"}), OK)
    assert (a.content, a.finish_reason, a.model) == ("hi", "stop", "gpt-4o-mini-2024-07-18")
    assert (a.usage.prompt_tokens, a.usage.cached_tokens, a.usage.completion_tokens, a.usage.reasoning_tokens) == \
        (10, 4, 2, 1)
    assert a.rate.remaining_requests == 59 and a.rate.reset_tokens_s == 360


def test_usage_details_may_be_absent():
    body = orjson.dumps({"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None}})
    a = classify(200, httpx.Headers(), body)
    assert a.usage.cached_tokens == 0 and a.usage.reasoning_tokens == 0


@pytest.mark.parametrize("status,code,type_,expected,kind", [
    (400, "context_length_exceeded", "invalid_request_error", RowError, "context_length"),
    (400, None, "invalid_request_error", RowError, "http_400"),
    (422, None, None, RowError, "http_422"),
    (401, "invalid_api_key", "invalid_request_error", AbortError, "auth"),
    (403, None, None, AbortError, "permission"),
    (404, "model_not_found", "invalid_request_error", AbortError, "model_not_found"),
    (429, "insufficient_quota", "insufficient_quota", AbortError, "insufficient_quota"),
    (429, "rate_limit_exceeded", "tokens", TransientError, "rate_limit"),
    (408, None, None, TransientError, "timeout"),
    (409, None, None, TransientError, "server_error"),
    (500, None, "server_error", TransientError, "server_error"),
    (502, None, None, TransientError, "server_error"),
    (503, None, None, TransientError, "server_error"),
    (504, None, None, TransientError, "server_error"),
])
def test_classification_table(status, code, type_, expected, kind):
    with pytest.raises(expected) as e:
        classify(status, httpx.Headers(), err(code, type_))
    assert e.value.kind == kind and e.value.status == status


def test_retry_after_is_honoured_and_too_long_is_not_retried():
    with pytest.raises(TransientError) as e:
        classify(429, httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"}), err("rate_limit_exceeded"))
    assert e.value.retry_after == 1.5
    with pytest.raises(RowError):
        classify(503, httpx.Headers({"retry-after": "600"}), err())


def test_x_should_retry_overrides_status():
    with pytest.raises(RowError):
        classify(500, httpx.Headers({"x-should-retry": "false"}), err())
    with pytest.raises(TransientError):
        classify(400, httpx.Headers({"x-should-retry": "true"}), err())


def test_malformed_success_body_is_transient():
    with pytest.raises(TransientError) as e:
        classify(200, httpx.Headers(), b'{"choices": [')
    assert e.value.kind == "malformed_response"


def test_non_json_error_body_is_kept_short():
    with pytest.raises(TransientError, match="HTTP 502: <html>bad gateway</html>"):
        classify(502, httpx.Headers(), b"<html>bad gateway</html>")


@pytest.mark.parametrize("text,seconds", [("20ms", 0.02), ("1s", 1), ("6m0s", 360), ("1h2m3.5s", 3723.5),
                                          ("4m12.172s", 252.172), ("0.5", 0.5), ("", None), ("soon", None)])
def test_go_durations(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_http_date():
    assert retry_after(httpx.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0


def test_redact_removes_key_and_its_prefix():
    key = "sk-proj-abcdef1234567890"
    assert redact(f"Incorrect API key provided: {key}.", key) == "Incorrect API key provided: [redacted]."
    assert "abcdef" not in redact("Incorrect API key provided: sk-proj-****7890.", key)


def test_plain_http_with_key_only_to_loopback():
    check_transport_security("http://127.0.0.1:8000/v1", True, False)
    check_transport_security("http://localhost:8000/v1", True, False)
    check_transport_security("https://api.openai.com/v1", True, False)
    check_transport_security("http://10.0.0.5/v1", False, False)
    check_transport_security("http://10.0.0.5/v1", True, True)
    with pytest.raises(UsageError):
        check_transport_security("http://10.0.0.5/v1", True, False)


def test_client_sends_bearer_key_and_body_through_the_transport_seam():
    seen = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers["authorization"]
        seen["url"] = str(request.url)
        seen["body"] = request.content
        return httpx.Response(200, content=OK)

    async def go():
        async with ApiClient("https://api.example/v1", "sk-abc", timeout_s=5, concurrency=2,
                             transport=httpx.MockTransport(handler)) as c:
            return await c.call("/chat/completions", b'{"model": "m"}', CHAT.answer)

    a = asyncio.run(go())
    assert a.content == "hi"
    assert seen == {"auth": "Bearer sk-abc", "url": "https://api.example/v1/chat/completions",
                    "body": b'{"model": "m"}'}


def test_error_messages_are_redacted():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, content=err("invalid_api_key", message="Incorrect API key provided: sk-secret-9999"))

    async def go():
        async with ApiClient("https://x/v1", "sk-secret-9999", timeout_s=5, concurrency=1,
                             transport=httpx.MockTransport(handler)) as c:
            await c.call("/chat/completions", b"{}", CHAT.answer)

    with pytest.raises(AbortError) as e:
        asyncio.run(go())
    assert "sk-secret" not in str(e.value)


def test_a_form_carries_every_field_and_the_file_from_its_path_without_the_json_content_type(tmp_path):
    audio = tmp_path / "call.wav"
    audio.write_bytes(b"RIFF0000WAVE" + b"\x01" * 100)
    seen: dict[str, bytes | str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["type"] = request.headers["content-type"]
        seen["auth"] = request.headers["authorization"]
        seen["body"] = request.read()
        return httpx.Response(200, json={"text": "ok"})

    async def go() -> tuple[int, object, bytes]:
        async with ApiClient("http://x/v1", "sk-test", timeout_s=5, concurrency=1,
                             transport=httpx.MockTransport(handler)) as c:
            return await c.post_form("/audio/transcriptions", [("model", "whisper-1"),
                                                               ("timestamp_granularities[]", "word"),
                                                               ("timestamp_granularities[]", "segment")],
                                     ("file", "audio.wav", audio, "audio/wav"))

    status, _headers, _body = asyncio.run(go())
    body = seen["body"]
    assert status == 200 and str(seen["type"]).startswith("multipart/form-data; boundary=")
    assert seen["auth"] == "Bearer sk-test"
    assert isinstance(body, bytes) and body.count(b'name="timestamp_granularities[]"') == 2
    assert b'filename="audio.wav"' in body and audio.read_bytes() in body
