"""Anthropic's Messages API: request bodies, auth, answers and usage, rate-limit headers, and what errors mean.

The job is the same as for OpenAI; what differs is said here alone. The system prompt is a top-level field
(system and developer messages are joined into it), ``max_tokens`` is always sent, ``stop`` is
``stop_sequences``. A response schema is asked for with Anthropic's JSON output format
(``output_config.format``) on the models that have it (Claude Opus, Sonnet and Haiku 4.5 and later), else with
one forced tool whose ``input_schema`` is the schema (the way structured output worked before); the answer is
the JSON either way, and goes through the same validation and typed columns as OpenAI's. ``[api].
structured_output`` can force either (``json_schema`` / ``tool``) or neither (``none``: the schema is said in the
system prompt).

Usage: ``input_tokens`` excludes the prompt-cache parts, so our ``prompt_tokens`` adds back the cache reads
(``cached_tokens``) and writes (``cache_write_tokens``), each priced at its own rate. ``stop_reason`` is mapped
to OpenAI's ``finish_reason`` words (``end_turn`` -> ``stop``, ``max_tokens`` -> ``length``), so one filter works
across providers; a ``refusal`` stop fills the refusal column. There is no exact offline tokenizer for Claude:
prompt tokens are an upper bound (``tokens.BoundingTokenCounter``) until ``pipeline estimate --exact`` asks
the free ``count_tokens`` endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.images import CLAUDE_LIMITS, Image, claude_rule
from pipeline.providers.anthropic_wire import (
    PATHS,
    TOOL_NAME,
    count_answer,
    parse_message,
)
from pipeline.providers.base import (
    Answer,
    BatchApi,
    BatchResult,
    Descriptor,
    PromptCache,
)
from pipeline.providers.openai import schema_instruction
from pipeline.spec import ApiSpec, RequestSpec
from pipeline.tokens import BoundingTokenCounter, ChatTokenCounter

ANTHROPIC_VERSION = "2023-06-01"  # [api].anthropic_version's default: the version every model takes

_FAMILY = re.compile(r"claude-(opus|sonnet|haiku)-(\d+)(?:-(\d{1,2}))?(?!\d)")


def has_json_output(model: str) -> bool:
    """Whether the model takes ``output_config.format`` (JSON outputs): Claude 4.5 families and later.
    Older models (Claude 3.x, Claude 4.0 and 4.1) answer through a forced tool instead."""
    m = _FAMILY.search(model.lower())
    if m is None:
        return False
    major, minor = int(m.group(2)), int(m.group(3) or 0)
    return (major, minor) >= (4, 5)


def cache_minimum(model: str) -> int:
    """The shortest prefix Claude caches (docs.anthropic.com, prompt caching: 4,096 tokens for Opus 4.5 and
    Haiku 4.5, 2,048 for the Haiku 3 models, 1,024 for the others)."""
    name = model.lower()
    m = _FAMILY.search(name)
    if m is not None and m.group(1) in ("opus", "haiku") and (int(m.group(2)), int(m.group(3) or 0)) >= (4, 5):
        return 4096
    if "haiku" in name and (m is None or int(m.group(2)) < 4):
        return 2048
    return 1024


def structured_style(api: ApiSpec, model: str) -> str:
    """How a response schema is asked for: ``json_schema``, ``tool`` or ``none`` (``auto`` picks by model)."""
    if api.structured_output == "auto":
        return "json_schema" if has_json_output(model) else "tool"
    return api.structured_output


# -- reading responses -----------------------------------------------------------------------------------------

def static_body(spec: RequestSpec, api: ApiSpec) -> dict[str, Any]:
    """The fields every row's body shares, in a fixed order (the body's bytes are its request key)."""
    body: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens}
    if spec.chat.temperature is not None:
        body["temperature"] = spec.chat.temperature
    if spec.chat.top_p is not None:
        body["top_p"] = spec.chat.top_p
    if spec.chat.stop:
        body["stop_sequences"] = list(spec.chat.stop)
    if spec.chat.tools:
        body["tools"] = [{"name": t.name, **({"description": t.description} if t.description else {}),
                          "input_schema": dict(t.parameters), **({"strict": True} if t.strict else {})}
                         for t in spec.chat.tools]
        choice = spec.chat.tool_choice
        body["tool_choice"] = ({"type": "auto"} if choice == "auto" else {"type": "any"} if choice == "required"
                               else {"type": "tool", "name": choice})
    if spec.chat.response_schema is not None:
        style = structured_style(api, spec.model)
        if style == "json_schema":
            body["output_config"] = {"format": {"type": "json_schema", "schema": spec.chat.response_schema}}
        elif style == "tool":
            body["tools"] = [{"name": TOOL_NAME, "description": "Give the answer, in this structure.",
                              "input_schema": spec.chat.response_schema}]
            body["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
    return body


class AnthropicBodies:
    """The Messages bodies of one job: system and developer messages become the top-level ``system``."""

    def __init__(self, spec: RequestSpec, api: ApiSpec) -> None:
        self.head = static_body(spec, api)
        self._images_first = spec.chat.image_position == "before"
        self._cache_system = False  # mark_cache: the system prompt is sent as a block with a breakpoint
        style = structured_style(api, spec.model) if spec.chat.response_schema is not None else None
        self.instruction = schema_instruction(spec.chat.response_schema) if style == "none" else None  # type: ignore[arg-type]
        # The tool definition, or the JSON output schema (which the API turns into a system prompt), is prompt
        # the model reads: the bound counts it.
        self._schema_text = (orjson.dumps(self.head["tools"]).decode() if "tools" in self.head else
                             orjson.dumps(spec.chat.response_schema).decode() if "output_config" in self.head else "")

    def chat(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image] = ()) -> bytes:
        """One row's body from its rendered messages, its images in the user message."""
        system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
        if self.instruction is not None:
            system.append(self.instruction)
        turns: list[dict[str, Any]] = [{"role": m["role"], "content": m["content"]} for m in messages
                                       if m["role"] not in ("system", "developer")]
        if images:
            parts = [{"type": "image", "source": {"type": "url", "url": i.url} if i.url else
                      {"type": "base64", "media_type": i.mime, "data": i.base64()}} for i in images]
            text = [{"type": "text", "text": turns[-1]["content"]}] if turns[-1]["content"] else []
            turns[-1] = {"role": turns[-1]["role"], "content": [*parts, *text] if self._images_first
                         else [*text, *parts]}
        body = dict(self.head)
        if system and self._cache_system:  # tools and system, the static prefix, cached at this breakpoint
            body["system"] = [{"type": "text", "text": "\n\n".join(system), "cache_control": {"type": "ephemeral"}}]
        elif system:
            body["system"] = "\n\n".join(system)
        body["messages"] = turns
        return bytes(memoryview(orjson.dumps(body)))

    def mark_cache(self) -> None:
        """Send the system prompt with a cache breakpoint: the same text in a block, so the prompt is unchanged."""
        self._cache_system = True

    def added_tokens(self, counter: ChatTokenCounter) -> int:
        """The tool definition or the schema instruction, which the prompt carries too."""
        extra = self._schema_text + (self.instruction or "")
        return counter.fixed(extra) if extra else 0


class AnthropicChatCodec(AnthropicBodies):
    """``/v1/messages``: a row's messages in, the answer (or the error class) out; Message Batches lines."""

    path = PATHS["chat"]

    def __init__(self, spec: RequestSpec, api: ApiSpec, *, user_tools: bool) -> None:
        super().__init__(spec, api)
        self.user_tools = user_tools  # the job has its own tools: answers carry calls, not a forced tool's input

    def body(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image] = ()) -> bytes:
        """One row's Messages body (``AnthropicBodies.chat``)."""
        return self.chat(messages, images)

    def answer(self, status: int, headers: Any, body: bytes) -> Answer:
        """A Messages response: the answer, or the error class."""
        return parse_message(status, headers, body, user_tools=self.user_tools)

    def batch_line(self, key: str, body: bytes) -> bytes:
        """One request of a batch (``custom_id`` = the request key: 32 hex digits fit ``^[a-zA-Z0-9_-]{1,64}$``)."""
        return b'{"custom_id":"' + key.encode() + b'","params":' + body + b"}\n"

    def batch_result(self, raw: bytes) -> BatchResult | None:
        """One line of a batch's results."""
        from pipeline.providers.anthropic_batch import batch_result

        return batch_result(raw, user_tools=self.user_tools)


def count_tokens_body(body: bytes) -> bytes:
    """The count_tokens request of a Messages body: everything that shapes the prompt (the JSON output format
    is one: the API turns it into a system prompt), without the sampling settings."""
    data = orjson.loads(body)
    return orjson.dumps({k: data[k] for k in ("model", "system", "messages", "tools", "tool_choice", "output_config")
                         if k in data})


class AnthropicProvider:
    """Anthropic's Messages API and Message Batches; ``x-api-key`` auth with ``anthropic-version``."""

    name = "anthropic"

    def __init__(self, api: ApiSpec, *, user_tools: bool = False) -> None:
        self.api = api
        self.user_tools = user_tools  # the job has its own tools: answers carry calls, not a forced tool's input

    def base_url(self, url: str) -> str:
        """The API's root, with or without ``/v1`` as given (the paths carry it)."""
        url = url.rstrip("/")
        return url[:-3] if url.endswith("/v1") else url

    def counter(self, model: str) -> ChatTokenCounter:
        """An upper bound: no exact offline tokenizer exists for Claude."""
        return BoundingTokenCounter(model)

    def prompt_cache(self, model: str) -> PromptCache:
        """Claude caches where a request marks a breakpoint, from the model's minimum prefix."""
        return PromptCache("breakpoint", min_tokens=cache_minimum(model))

    def hint(self, status: int, message: str) -> str:
        """The ``[api]`` key most likely to fix every request refused this way."""
        text = message.lower()
        if "output_config" in text or "output_format" in text:
            return 'set [api].structured_output = "tool" (this model has no JSON output format)'
        return "check [request] and [api] against the Messages API (pipeline validate shows the requests)"

    def codec(self, spec: RequestSpec, job_name: str) -> AnthropicChatCodec:
        """The Messages API's codec (the only endpoint Anthropic serves; the job file's parser refuses others)."""
        assert spec.endpoint == "chat", spec.endpoint
        return AnthropicChatCodec(spec, self.api, user_tools=self.user_tools)

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Every request's headers; the key goes in ``x-api-key`` and nowhere else."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "pipeline/0.1",
                   "anthropic-version": self.api.option("anthropic_version") or ANTHROPIC_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        return headers

    count_path = PATHS["count_tokens"]

    def count_tokens_body(self, body: bytes) -> bytes:
        """The free count_tokens request of one Messages body."""
        return count_tokens_body(body)

    def count_answer(self, status: int, headers: Any, body: bytes) -> int:
        """The exact prompt tokens of a count_tokens response."""
        return count_answer(status, headers, body)

    def batch_api(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int) -> BatchApi:
        """The Message Batches client."""
        from pipeline.providers.anthropic_batch import MessageBatchClient

        return MessageBatchClient(base_url, self.headers(api_key), api_key, timeout_s=timeout_s,
                                  max_attempts=max_attempts)


DESCRIPTOR = Descriptor(
    name="anthropic", default_base_url="https://api.anthropic.com/v1", key_env="ANTHROPIC_API_KEY",
    hosts=("api.anthropic.com",), structured_outputs=("auto", "json_schema", "tool", "none"),
    max_tokens_fields=(),  # the Messages API always takes max_tokens
    max_images=100,  # "up to 100 images in a single API request" (docs.anthropic.com, vision)
    batch_limits=(100_000, 256_000_000),  # per Message Batch (docs.anthropic.com, batch processing)
    endpoints=("chat",), options={"anthropic_version": ANTHROPIC_VERSION},
    request_keys_refused=("seed", "reasoning_effort"),
    image_detail=False,  # Claude resizes large images itself
    image_limits=CLAUDE_LIMITS, image_rule=claude_rule, price_ids=("anthropic",),
    make=lambda api, request: AnthropicProvider(api, user_tools=bool(request.chat.tools)))
