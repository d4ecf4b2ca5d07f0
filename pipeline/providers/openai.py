"""OpenAI's wire dialect: request bodies, auth, answers and usage, rate-limit headers, and what errors mean.

Everything here is a pure function of bytes and headers (the body of a request from rendered messages; an
answer, or the error class that says what to do about a response), so every branch of the error table in
``../shared/openai-wire.md`` is tested without a server. Azure OpenAI and the OpenAI-compatible servers speak
this dialect with differences; ``azure.py`` and ``compatible.py`` are variations of ``OpenAIProvider``, and the
differences are settings of the job's ``[api]`` table (``max_tokens_field``, ``structured_output``).
"""

from __future__ import annotations

import binascii
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import pybase64

from pipeline.errors import AbortError, RateLimited, RowError, TransientError
from pipeline.images import Image
from pipeline.pricing import Usage
from pipeline.providers.base import (
    NO_RATE,
    Answer,
    BatchResult,
    Descriptor,
    EmbeddingAnswer,
    PromptCache,
    RateInfo,
)
from pipeline.spec import DEFAULT_BASE_URL, OPENAI_BATCH_LIMITS, ApiSpec, RequestSpec
from pipeline.tokens import ChatTokenCounter

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


def parse_chat(body: bytes, headers: Any) -> Answer:
    """A 200 chat completion; a body that is not the expected JSON is a transient fault (a proxy, a cut stream)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    return chat_answer(data, parse_rate(headers))


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
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    return embeddings_answer(data, n_inputs, parse_rate(headers))


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




# -- requests --------------------------------------------------------------------------------------------------

PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings"}
OPENAI_CACHE = PromptCache("automatic", min_tokens=1024, step=128)
EMBEDDING_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}
SCHEMA_INSTRUCTION = "Answer with one JSON object, and nothing else, that is valid for this JSON Schema:\n"


def schema_name(job_name: str) -> str:
    """A Structured Outputs schema name: ``[a-zA-Z0-9_-]``, at most 64 characters."""
    return (re.sub(r"[^a-zA-Z0-9_-]", "_", job_name) or "result")[:64]


def schema_instruction(schema: Mapping[str, Any]) -> str:
    """The schema, said in the system prompt, for servers that do not take it as a response format."""
    return SCHEMA_INSTRUCTION + orjson.dumps(schema).decode()


def static_body(spec: RequestSpec, job_name: str, api: ApiSpec | None = None,
                model: str | None = None) -> dict[str, Any]:
    """The fields every row's body shares, in a fixed order (the body's bytes are its request key).

    ``api`` says the dialect's variations: which field caps the output (``max_completion_tokens``, or the
    older ``max_tokens`` many compatible servers only know), and how a response schema is asked for
    (``json_schema`` strict; ``json_object``, the schema in the prompt and, for a compatible server that reads it,
    beside the type too; or ``none``, the schema in the prompt).
    """
    api = api or ApiSpec()
    body: dict[str, Any] = {"model": model or spec.model}
    if spec.is_embeddings:
        if spec.dimensions is not None:
            body["dimensions"] = spec.dimensions
        body["encoding_format"] = spec.encoding_format
        return body
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    if spec.top_p is not None:
        body["top_p"] = spec.top_p
    if spec.seed is not None:
        body["seed"] = spec.seed
    if spec.stop:
        body["stop"] = list(spec.stop)
    if spec.reasoning_effort:
        body["reasoning_effort"] = spec.reasoning_effort
    body[api.max_tokens_field] = spec.max_tokens
    if spec.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": dict(t.parameters), **({"strict": True} if t.strict else {})}} for t in spec.tools]
        body["tool_choice"] = (spec.tool_choice if spec.tool_choice in ("auto", "required")
                               else {"type": "function", "function": {"name": spec.tool_choice}})
        if any(t.strict for t in spec.tools) and api.provider in ("openai", "azure"):
            # OpenAI: strict schemas are not kept for parallel calls, so a strict job asks for one call at a time
            body["parallel_tool_calls"] = False
    if spec.response_schema is not None:
        if api.structured_output == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": schema_name(job_name), "schema": spec.response_schema, "strict": True}}
        elif api.structured_output == "json_object":
            # OpenAI's json_object has no other key (and OpenAI refuses unknown parameters): the schema is in the
            # prompt. Some compatible servers also read it beside the type, when the job says so.
            body["response_format"] = ({"type": "json_object", "schema": spec.response_schema}
                                       if api.json_object_schema else {"type": "json_object"})
    return body


class OpenAIBodies:
    """The request bodies of one job: what every row shares is built once, each row adds its messages."""

    def __init__(self, spec: RequestSpec, job_name: str, api: ApiSpec | None = None, model: str | None = None) -> None:
        api = api or ApiSpec()
        self.head = static_body(spec, job_name, api, model)
        # Embeddings: a row's body is this prefix, its input as a JSON string, and "}" (``embedding``).
        self._input_prefix = orjson.dumps(self.head)[:-1] + b',"input":'
        # Without strict structured outputs the model learns the schema from the system prompt.
        self.instruction = (schema_instruction(spec.response_schema)
                            if spec.response_schema is not None and api.structured_output != "json_schema" else None)
        self._has_system = bool(spec.system)
        self._images_first = spec.image_position == "before"
        # The tool definitions are prompt the model reads: the estimate counts their JSON (OpenAI frames them
        # its own undocumented way, so this is close, not exact).
        self._tools_text = orjson.dumps(self.head["tools"]).decode() if "tools" in self.head else ""

    def chat(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image] = ()) -> bytes:
        """One row's chat body, its images in the user message. orjson hands back its 4 KiB working buffer as
        the bytes object; a copy of the exact size is a tenth of the memory of the requests a run holds
        (measured: 4,074 bytes per 400-byte body before)."""
        if self.instruction is not None:
            messages = self._with_instruction(messages)
        if images:
            last = messages[-1]
            parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {
                "url": i.url or i.data_url(), **({"detail": i.detail} if i.detail else {})}} for i in images]
            text = [{"type": "text", "text": last["content"]}] if last["content"] else []
            content = [*parts, *text] if self._images_first else [*text, *parts]
            messages = [*messages[:-1], {"role": last["role"], "content": content}]  # type: ignore[dict-item]
        return bytes(memoryview(orjson.dumps({**self.head, "messages": messages})))

    def _with_instruction(self, messages: Sequence[Mapping[str, str]]) -> list[Mapping[str, str]]:
        if self._has_system and messages and messages[0].get("role") == "system":
            first = messages[0]
            return [{"role": "system", "content": f"{first['content']}\n\n{self.instruction}"}, *messages[1:]]
        return [{"role": "system", "content": str(self.instruction)}, *messages]

    def mark_cache(self) -> None:
        """Nothing to mark: OpenAI's caching is automatic."""

    def added_tokens(self, counter: ChatTokenCounter) -> int:
        """The schema instruction's tokens (in the system message, or a message of its own), or the tools'."""
        if self._tools_text:
            return counter.fixed(self._tools_text)
        if self.instruction is None:
            return 0
        if self._has_system:
            return counter.fixed("\n\n" + self.instruction)
        return counter.per_message + counter.fixed("system") + counter.fixed(self.instruction)

    def embedding(self, text: str) -> bytes:
        """One row's embeddings body (the sender puts many rows' inputs in one request). The key still
        hashes model, dimensions, format and text, so changing any of them embeds again."""
        return self._input_prefix + orjson.dumps(text) + b"}"

    @staticmethod
    def group(bodies: Sequence[bytes]) -> bytes:
        """One embeddings request for many rows, spliced from their own bodies without parsing them.

        Every row body of a job is ``{<the same head>,"input":<JSON string>}`` ("input" last), and
        ``,"input":`` cannot occur inside the head or inside a JSON string (its quotes would be escaped), so
        the inputs are the bytes after it, up to the closing brace.
        """
        cut = bodies[0].index(b',"input":')
        start = cut + len(b',"input":')
        return bodies[0][:cut] + b',"input":[' + b",".join(b[start:-1] for b in bodies) + b"]}"


def shape_hint(api: ApiSpec, message: str) -> str:
    """Which ``[api]`` key likely fixes a server that refuses every request's shape, from its own words."""
    text = message.lower()
    if api.structured_output == "json_schema" and ("json_schema" in text or "response_format" in text
                                                   or "schema" in text):
        return 'set [api].structured_output = "json_object" (or "none") for this server'
    if api.max_tokens_field == "max_completion_tokens" and "max_completion_tokens" in text:
        return 'set [api].max_tokens_field = "max_tokens" for this server'
    if api.structured_output == "json_object" and ("json_object" in text or "response_format" in text):
        return 'set [api].structured_output = "none" for this server'
    return "check [request] and [api] against what this server accepts (pipeline validate shows the requests)"


class OpenAIProvider:
    """OpenAI's API (``/v1/chat/completions``, ``/v1/embeddings``, Files and Batches), bearer auth."""

    name = "openai"

    def __init__(self, api: ApiSpec | None = None) -> None:
        self.api = api or ApiSpec()

    def base_url(self, url: str) -> str:
        """The base URL, ending in its version path (``.../v1``), as given."""
        return url.rstrip("/")

    def counter(self, model: str) -> ChatTokenCounter:
        """tiktoken's encoding of the model: OpenAI's own count."""
        return ChatTokenCounter(model)

    def prompt_cache(self, model: str) -> PromptCache:
        """OpenAI caches every prompt's prefix of 1,024 tokens and more by itself, hit in steps of 128 tokens
        (platform.openai.com/docs/guides/prompt-caching); nothing to mark."""
        return OPENAI_CACHE

    def hint(self, status: int, message: str) -> str:
        """The ``[api]`` key most likely to fix a server refusing every request this way."""
        return shape_hint(self.api, message)

    def model(self, spec: RequestSpec) -> str:
        """The model name sent in the body."""
        return spec.model

    def bodies(self, spec: RequestSpec, job_name: str) -> OpenAIBodies:
        """The body builder of one job."""
        return OpenAIBodies(spec, job_name, self.api, self.model(spec))

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Every request's headers; the key goes in ``Authorization`` and nowhere else."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "pipeline/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def path(self, endpoint: str) -> str:
        """The URL path of an endpoint, after the base URL."""
        return PATHS[endpoint]

    def chat_answer(self, status: int, headers: Any, body: bytes) -> Answer:
        """A chat response: the answer, or the error class that says what to do about it."""
        return classify(status, headers, body, parse_chat)  # type: ignore[no-any-return]

    def embeddings_answer(self, status: int, headers: Any, body: bytes, n_inputs: int) -> EmbeddingAnswer:
        """An embeddings response for ``n_inputs`` inputs: the vectors, or the error class."""
        return classify(status, headers, body,  # type: ignore[no-any-return]
                        lambda c, h: parse_embeddings(c, h, n_inputs))

    def embedding_dims(self, model: str, dimensions: int | None) -> int | None:
        """The vector size to expect: the job's ``dimensions``, else the model's default when known."""
        return dimensions or EMBEDDING_DIMS.get(model)

    # The Batch API half is imported by batch runs only.

    def batch_urls(self) -> dict[str, str]:
        """The ``url`` of each endpoint in a Batch input line (and the batch's ``endpoint``)."""
        from pipeline.providers.openai_batch import BATCH_URLS

        return BATCH_URLS

    def batch_params(self) -> dict[str, str] | None:
        """Query parameters every Files and Batches call carries (none for OpenAI)."""
        return None

    def batch_api(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int) -> Any:
        """The Files and Batches client."""
        from pipeline.providers.openai_batch import BatchClient

        return BatchClient(base_url, self.headers(api_key), api_key, urls=self.batch_urls(),
                           params=self.batch_params(), timeout_s=timeout_s, max_attempts=max_attempts)

    def batch_line(self, key: str, endpoint: str, body: bytes) -> bytes:
        """One request of a Batch input file (``custom_id`` = the request key)."""
        from pipeline.providers.openai_batch import batch_line

        return batch_line(key, self.batch_urls()[endpoint], body)

    def batch_result(self, raw: bytes, endpoint: str) -> BatchResult | None:
        """One line of a results or errors file."""
        from pipeline.providers.openai_batch import batch_result

        return batch_result(raw, endpoint)


DESCRIPTOR = Descriptor(
    name="openai", default_base_url=DEFAULT_BASE_URL, key_env="OPENAI_API_KEY", hosts=("api.openai.com",),
    structured_outputs=("json_schema", "json_object", "none"),
    max_tokens_fields=("max_completion_tokens", "max_tokens"),
    max_images=500,  # "500 images per request" (platform.openai.com/docs/guides/images-vision)
    batch_limits=OPENAI_BATCH_LIMITS,  # 50,000 requests, 200 MB per input file (platform.openai.com/docs/guides/batch)
    endpoints=("chat", "embeddings"),
    make=lambda api, request: OpenAIProvider(api))
