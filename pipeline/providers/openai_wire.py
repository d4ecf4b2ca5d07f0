"""OpenAI's wire format as it comes back: rate-limit headers, what an error status means, and answers (chat,
embeddings, images) read from a response body. Shared by the online provider (``openai.py``) and the Batch API's result
lines (``openai_batch.py``), which read the same answers. Pure functions of bytes and headers, so every branch of
the error table in ``../shared/openai-wire.md`` is tested without a server.
"""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import pybase64

from pipeline.errors import AbortError, RateLimited, RowError, TransientError
from pipeline.pricing import Usage
from pipeline.providers.base import (
    NO_RATE,
    Answer,
    EmbeddingAnswer,
    GeneratedImage,
    ImageAnswer,
    RateInfo,
    TranscriptAnswer,
)

# The ``url`` of each endpoint in a Batch API input line (and the batch's ``endpoint``).
BATCH_URLS = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings", "images": "/v1/images/generations"}
RETRYABLE_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
MAX_SERVER_WAIT_S = 120.0  # the SDK's rule: a server asking for longer than this is not worth waiting for
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: str | None) -> float | None:
    """Go-style durations as in x-ratelimit-reset-*: ``20ms``, ``6m0s``, ``1h2m3.5s``."""
    if not value:
        return None
    parts = _DURATION.findall(value)
    if not parts:
        try:
            return float(value)
        except ValueError:
            return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except ValueError:
        return None


def parse_rate(headers: Any) -> RateInfo:
    """The x-ratelimit-* headers of a response (absent ones stay None)."""
    g = headers.get
    return RateInfo(
        limit_requests=_int(g("x-ratelimit-limit-requests")), limit_tokens=_int(g("x-ratelimit-limit-tokens")),
        remaining_requests=_int(g("x-ratelimit-remaining-requests")),
        remaining_tokens=_int(g("x-ratelimit-remaining-tokens")),
        reset_requests_s=parse_duration(g("x-ratelimit-reset-requests")),
        reset_tokens_s=parse_duration(g("x-ratelimit-reset-tokens")),
    )


def retry_after(headers: Any) -> float | None:
    """The wait the server asked for: ``retry-after-ms`` first, then ``retry-after`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra:
        try:
            return max(0.0, float(ra))
        except ValueError:
            from email.utils import parsedate_to_datetime

            try:
                return max(0.0, parsedate_to_datetime(ra).timestamp() - time.time())
            except (TypeError, ValueError):
                return None
    return None


def _error_fields(body: bytes) -> tuple[str, str | None, str | None]:
    """(message, type, code) of an error body, parsed defensively: compatible servers vary."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace").strip()
        return (text[:300] or "no error message"), None, None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        code = err.get("code")
        return str(err.get("message") or "no error message")[:500], err.get("type"), None if code is None else str(code)
    if isinstance(err, str):
        return err[:500], None, None
    return str(data)[:300], None, None


def classify(status: int, headers: Any, body: bytes, parse: Callable[[bytes, Any], Any] | None = None) -> Any:
    """Turn one HTTP response into an answer (``parse`` reads a 200; a chat completion by default), or raise
    the error class that says what to do about it."""
    if status == 200:
        return (parse or parse_chat)(body, headers)
    raise_for_status(status, headers, body)
    raise AssertionError("unreachable")  # pragma: no cover


def raise_for_status(status: int, headers: Any, body: bytes) -> None:
    """Raise the error class a non-200 response calls for (see the table in DESIGN.md)."""
    message, type_, code = _error_fields(body)
    text = f"HTTP {status}" + (f" {code}" if code else "") + f": {message}"
    should = headers.get("x-should-retry")
    wait = retry_after(headers)
    if status == 429 and "insufficient_quota" in (code, type_):
        raise AbortError(text, kind="insufficient_quota", status=status)
    if status == 401:
        raise AbortError(text, kind="auth", status=status)
    if status == 403:
        raise AbortError(text, kind="permission", status=status)
    if status == 404:
        # Unknown model or a wrong base_url: either way every other row would get the same answer.
        kind = "model_not_found" if code == "model_not_found" else "not_found"
        raise AbortError(text + " (check [request].model and [api].base_url)", kind=kind, status=status)
    retryable = status in RETRYABLE_STATUS if should not in ("true", "false") else should == "true"
    if retryable and (wait is None or wait <= MAX_SERVER_WAIT_S):
        kind = "rate_limit" if status == 429 else "timeout" if status == 408 else "server_error"
        err = (RateLimited if status == 429 else TransientError)(text, kind=kind, status=status, retry_after=wait)
        err.rate = parse_rate(headers)
        raise err
    kind = "context_length" if code == "context_length_exceeded" else f"http_{status}"
    raise RowError(text, kind=kind, status=status)


def _json_or_none(body: bytes) -> Any:
    """A 200's body as JSON, or None when it is not JSON (a proxy's page, a cut stream): the reader of each answer
    then raises the transient fault it calls for."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def parse_chat(body: bytes, headers: Any) -> Answer:
    """A 200 chat completion; a body that is not the expected JSON is a transient fault (a proxy, a cut stream)."""
    return chat_answer(_json_or_none(body), parse_rate(headers))


def chat_answer(data: Any, rate: RateInfo = NO_RATE) -> Answer:
    """A chat completion already parsed from JSON (a Batch API result line carries it that way)."""
    try:
        choice = data["choices"][0]
        message = choice.get("message") or {}
        u = data.get("usage")
        usage = None
        if isinstance(u, dict) and ("prompt_tokens" in u or "completion_tokens" in u):
            pd = u.get("prompt_tokens_details") or {}
            cd = u.get("completion_tokens_details") or {}
            usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                          completion_tokens=int(u.get("completion_tokens") or 0),
                          cached_tokens=int(pd.get("cached_tokens") or 0),
                          reasoning_tokens=int(cd.get("reasoning_tokens") or 0))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise TransientError("HTTP 200 with a malformed body (not a chat completion)", kind="malformed_response",
                             status=200) from None
    return Answer(content=message.get("content"), finish_reason=choice.get("finish_reason"),
                  refusal=message.get("refusal"), model=data.get("model"), usage=usage, rate=rate,
                  tool_calls=_tool_calls(message.get("tool_calls")))


def _tool_calls(calls: Any) -> str | None:
    """The message's function calls as ``[{id, name, arguments}]`` JSON (arguments as the model wrote them)."""
    if not calls:
        return None
    if not isinstance(calls, list):
        raise TransientError("HTTP 200 with a malformed body (tool_calls is not a list)", kind="malformed_response",
                             status=200)
    out = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            continue  # a call of another kind (custom tools): not ours to read
        args = fn.get("arguments")
        out.append({"id": c.get("id"), "name": fn.get("name"),
                    "arguments": args if isinstance(args, str) else orjson.dumps(args).decode()})
    return orjson.dumps(out).decode() if out else None


def parse_embeddings(body: bytes, headers: Any, n_inputs: int) -> EmbeddingAnswer:
    """A 200 embeddings response, mapped back by ``index`` (the order of ``data`` is not promised)."""
    return embeddings_answer(_json_or_none(body), n_inputs, parse_rate(headers))


def embeddings_answer(data: Any, n_inputs: int, rate: RateInfo = NO_RATE) -> EmbeddingAnswer:
    """An embeddings list already parsed from JSON (as in a Batch API result line)."""
    try:
        vectors: list[bytes | None] = [None] * n_inputs
        for item in data["data"]:
            emb = item["embedding"]
            if isinstance(emb, str):
                # Already float32 little-endian, as the API documents. pybase64 (SIMD) decodes a 256-float
                # vector in 0.5 us against binascii's 3 us: that was a fifth of a batched run's event loop.
                raw = pybase64.b64decode(emb, validate=True)
            else:
                raw = np.asarray(emb, dtype="<f4").tobytes()
            vectors[int(item["index"])] = raw
        usage = data.get("usage") or {}
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error):
        raise TransientError("HTTP 200 with a malformed body (not an embeddings list)", kind="malformed_response",
                             status=200) from None
    if any(v is None for v in vectors):
        raise TransientError(f"embeddings response has {sum(v is not None for v in vectors)} vectors for "
                             f"{n_inputs} inputs", kind="malformed_response", status=200)
    return EmbeddingAnswer(vectors=vectors, prompt_tokens=int(usage.get("prompt_tokens") or 0),  # type: ignore[arg-type]
                           model=data.get("model"), rate=rate)


def parse_images(body: bytes, headers: Any) -> ImageAnswer:
    """A 200 image-generation response."""
    return images_answer(_json_or_none(body), parse_rate(headers))


def images_answer(data: Any, rate: RateInfo = NO_RATE) -> ImageAnswer:
    """An image-generation response already parsed from JSON (a Batch API result line carries it that way): each
    image decoded from base64 (GPT image models) or kept as its URL (servers that answer with URLs)."""
    try:
        images = []
        for item in data["data"]:
            b64, url = item.get("b64_json"), item.get("url")
            if not isinstance(b64, str) and not isinstance(url, str):
                raise ValueError("an image with neither b64_json nor url")
            images.append(GeneratedImage(data=pybase64.b64decode(b64, validate=True) if isinstance(b64, str) else None,
                                         url=None if isinstance(b64, str) else url,
                                         revised_prompt=item.get("revised_prompt")))
        u = data.get("usage")
        usage = None
        if isinstance(u, dict) and ("input_tokens" in u or "output_tokens" in u):
            details = u.get("input_tokens_details") or {}
            usage = Usage(prompt_tokens=int(u.get("input_tokens") or 0),
                          completion_tokens=int(u.get("output_tokens") or 0),
                          cached_tokens=int(details.get("cached_tokens") or 0))
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, binascii.Error):
        raise TransientError("HTTP 200 with a malformed body (not an image-generation response)",
                             kind="malformed_response", status=200) from None
    if not images:
        raise TransientError("HTTP 200 with no image in the response", kind="malformed_response", status=200)
    fmt = data.get("output_format")
    return ImageAnswer(images=images, output_format=fmt if isinstance(fmt, str) else None, model=data.get("model"),
                       usage=usage, rate=rate)


def transcript_reader(response_format: str) -> Callable[[bytes, Any], TranscriptAnswer]:
    """The reader of a 200 transcription response in ``response_format``: JSON for json and verbose_json, the
    body's own text for text, srt and vtt."""
    def read(body: bytes, headers: Any) -> TranscriptAnswer:
        rate = parse_rate(headers)
        if response_format not in ("json", "verbose_json"):
            try:
                return TranscriptAnswer(body.decode("utf-8"), None, None, None, None, None, rate)
            except UnicodeDecodeError:
                raise TransientError("HTTP 200 with a transcript that is not UTF-8 text", kind="malformed_response",
                                     status=200) from None
        try:
            data = orjson.loads(body)
            text = data["text"]
            if not isinstance(text, str):
                raise TypeError
            segments = data.get("segments")
            duration = data.get("duration")
            return TranscriptAnswer(text, data.get("language"), float(duration) if duration is not None else None,
                                    [{"id": s.get("id"), "start": s.get("start"), "end": s.get("end"),
                                      "text": s.get("text")} for s in segments] if isinstance(segments, list)
                                    else None, data.get("model"), transcript_usage(data.get("usage")), rate)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise TransientError("HTTP 200 with a malformed body (not a transcription)", kind="malformed_response",
                                 status=200) from None

    return read


def transcript_usage(u: Any) -> Usage | None:
    """A transcription's usage: tokens (the gpt-4o models: text and audio in, text out), or seconds of audio
    (whisper-1, billed by duration)."""
    if not isinstance(u, dict):
        return None
    if u.get("type") == "duration":
        return Usage(units=float(u.get("seconds") or 0.0))
    details = u.get("input_token_details") or {}
    return Usage(prompt_tokens=int(u.get("input_tokens") or 0), completion_tokens=int(u.get("output_tokens") or 0),
                 audio_tokens=int(details.get("audio_tokens") or 0))
