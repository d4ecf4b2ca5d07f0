"""Anthropic's wire format as it comes back: rate-limit headers, what an error means, and a message read as an
answer (its usage mapped to ours). Shared by the online provider (``anthropic.py``) and the Message Batches'
result lines (``anthropic_batch.py``). Pure functions of bytes and headers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from pipeline.errors import AbortError, RateLimited, RowError, TransientError
from pipeline.pricing import Usage
from pipeline.providers.base import (
    NO_RATE,
    Answer,
    RateInfo,
)
from pipeline.providers.openai_wire import MAX_SERVER_WAIT_S, _error_fields, _int, retry_after

PATHS = {"chat": "/v1/messages", "count_tokens": "/v1/messages/count_tokens", "batches": "/v1/messages/batches"}
TOOL_NAME = "answer"
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "stop",
          "pause_turn": "stop", "refusal": "refusal", "model_context_window_exceeded": "length"}
TRANSIENT_TYPES = frozenset({"api_error", "overloaded_error", "rate_limit_error", "timeout_error"})


def _seconds_until(value: str | None) -> float | None:
    """An RFC 3339 time (``anthropic-ratelimit-*-reset``) as seconds from now."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, when.timestamp() - datetime.now(tz=when.tzinfo).timestamp())


def parse_rate(headers: Any) -> RateInfo:
    """The anthropic-ratelimit-* headers: requests, the tightest token limit, and input and output apart."""
    g = headers.get
    p = "anthropic-ratelimit-"
    return RateInfo(
        limit_requests=_int(g(p + "requests-limit")), remaining_requests=_int(g(p + "requests-remaining")),
        reset_requests_s=_seconds_until(g(p + "requests-reset")),
        limit_input_tokens=_int(g(p + "input-tokens-limit")),
        remaining_input_tokens=_int(g(p + "input-tokens-remaining")),
        reset_input_tokens_s=_seconds_until(g(p + "input-tokens-reset")),
        limit_output_tokens=_int(g(p + "output-tokens-limit")),
        remaining_output_tokens=_int(g(p + "output-tokens-remaining")),
        reset_output_tokens_s=_seconds_until(g(p + "output-tokens-reset")),
    )


def raise_for_status(status: int, headers: Any, body: bytes) -> None:
    """Raise the error class of a non-200 Messages response (Anthropic's error table)."""
    message, type_, _code = _error_fields(body)
    text = f"HTTP {status}" + (f" {type_}" if type_ else "") + f": {message}"
    wait = retry_after(headers)
    should = headers.get("x-should-retry")
    if status == 401:
        raise AbortError(text, kind="auth", status=status)
    if status == 403:
        raise AbortError(text, kind="permission", status=status)
    if status == 404:
        raise AbortError(text + " (check [request].model and [api].base_url)", kind="not_found", status=status)
    retryable = (status in (408, 409, 429, 500, 502, 503, 504, 529) or type_ in TRANSIENT_TYPES
                 if should not in ("true", "false") else should == "true")
    if retryable and (wait is None or wait <= MAX_SERVER_WAIT_S):
        kind = {429: "rate_limit", 529: "overloaded", 408: "timeout"}.get(status, "server_error")
        err = (RateLimited if status == 429 else TransientError)(text, kind=kind, status=status, retry_after=wait)
        err.rate = parse_rate(headers)
        raise err
    kind = "request_too_large" if status == 413 else f"http_{status}"
    raise RowError(text, kind=kind, status=status)


def message_answer(data: Any, rate: RateInfo = NO_RATE, *, user_tools: bool = False) -> Answer:
    """A Message (parsed JSON) as an answer: text blocks joined, or the forced tool's input as JSON; with the
    job's own tools (``user_tools``), the text and the calls apart."""
    try:
        blocks = data["content"]
        texts = [b["text"] for b in blocks if b.get("type") == "text"]
        tools = [b for b in blocks if b.get("type") == "tool_use"]
        u = data.get("usage")
        usage = None
        if isinstance(u, dict):
            read, written = int(u.get("cache_read_input_tokens") or 0), int(u.get("cache_creation_input_tokens") or 0)
            usage = Usage(prompt_tokens=int(u.get("input_tokens") or 0) + read + written,
                          completion_tokens=int(u.get("output_tokens") or 0), cached_tokens=read,
                          cache_write_tokens=written)
        stop = data.get("stop_reason")
    except (KeyError, TypeError, AttributeError, ValueError):
        raise TransientError("HTTP 200 with a malformed body (not a Message)", kind="malformed_response",
                             status=200) from None
    text = "".join(texts) if texts else None
    calls = None
    if user_tools:
        content = text
        calls = orjson.dumps([{"id": b.get("id"), "name": b.get("name"),
                               "arguments": orjson.dumps(b.get("input")).decode()} for b in tools]).decode() \
            if tools else None
    else:
        content = orjson.dumps(tools[0].get("input")).decode() if tools else text
    refusal = None
    if stop == "refusal":
        refusal, content = content or "the model refused to answer (stop_reason: refusal)", None
    return Answer(content=content, finish_reason=FINISH.get(stop, stop), refusal=refusal, model=data.get("model"),
                  usage=usage, rate=rate, tool_calls=calls)


def parse_message(status: int, headers: Any, body: bytes, *, user_tools: bool = False) -> Answer:
    """A Messages response: the answer, or the error class that says what to do about it."""
    if status != 200:
        raise_for_status(status, headers, body)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    return message_answer(data, parse_rate(headers), user_tools=user_tools)


def count_answer(status: int, headers: Any, body: bytes) -> int:
    """A count_tokens response: its ``input_tokens``."""
    if status != 200:
        raise_for_status(status, headers, body)
    try:
        return int(orjson.loads(body)["input_tokens"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise TransientError("HTTP 200 with a malformed body (not a token count)", kind="malformed_response",
                             status=200) from None


# -- requests --------------------------------------------------------------------------------------------------
