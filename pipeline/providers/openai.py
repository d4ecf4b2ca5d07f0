"""OpenAI's wire dialect: request bodies, auth, answers and usage, rate-limit headers, and what errors mean.

Everything here is a pure function of bytes and headers (the body of a request from rendered messages; an
answer, or the error class that says what to do about a response), so every branch of the error table in
``../shared/openai-wire.md`` is tested without a server. Azure OpenAI and the OpenAI-compatible servers speak
this dialect with differences; ``azure.py`` and ``compatible.py`` are variations of ``OpenAIProvider``, and the
differences are settings of the job's ``[api]`` table (``max_tokens_field``, ``structured_output``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from pipeline.images import Image
from pipeline.providers.base import (
    Answer,
    BatchApi,
    BatchResult,
    Descriptor,
    EmbeddingAnswer,
    ImageAnswer,
    PromptCache,
    TranscriptAnswer,
)
from pipeline.providers.openai_wire import (
    BATCH_URLS,
    chat_answer,
    classify,
    embeddings_answer,
    images_answer,
    parse_chat,
    parse_embeddings,
    parse_images,
    transcript_reader,
)
from pipeline.spec import DEFAULT_BASE_URL, OPENAI_BATCH_LIMITS, ApiSpec, RequestSpec
from pipeline.tokens import ChatTokenCounter

# -- requests --------------------------------------------------------------------------------------------------

PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "images": "/images/generations",
         "transcriptions": "/audio/transcriptions"}
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
    if spec.embedding is not None:
        if spec.embedding.dimensions is not None:
            body["dimensions"] = spec.embedding.dimensions
        body["encoding_format"] = spec.embedding.encoding_format
        return body
    if spec.transcription is not None:  # a multipart form, built per row by its codec (``form``)
        return body
    if spec.image is not None:  # image generation: the model's own parameters, only those the job gave
        body.update((k, v) for k, v in vars(spec.image).items() if v is not None and (k != "n" or v != 1))
        return body
    if spec.chat.temperature is not None:
        body["temperature"] = spec.chat.temperature
    if spec.chat.top_p is not None:
        body["top_p"] = spec.chat.top_p
    if spec.chat.seed is not None:
        body["seed"] = spec.chat.seed
    if spec.chat.stop:
        body["stop"] = list(spec.chat.stop)
    if spec.chat.reasoning_effort:
        body["reasoning_effort"] = spec.chat.reasoning_effort
    body[api.max_tokens_field] = spec.max_tokens
    if spec.chat.tools:
        body["tools"] = [{"type": "function", "function": {
            "name": t.name, **({"description": t.description} if t.description else {}),
            "parameters": dict(t.parameters), **({"strict": True} if t.strict else {})}} for t in spec.chat.tools]
        body["tool_choice"] = (spec.chat.tool_choice if spec.chat.tool_choice in ("auto", "required")
                               else {"type": "function", "function": {"name": spec.chat.tool_choice}})
        if any(t.strict for t in spec.chat.tools) and api.provider in ("openai", "azure"):
            # OpenAI: strict schemas are not kept for parallel calls, so a strict job asks for one call at a time
            body["parallel_tool_calls"] = False
    if spec.chat.response_schema is not None:
        if api.structured_output == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": schema_name(job_name), "schema": spec.chat.response_schema, "strict": True}}
        elif api.structured_output == "json_object":
            # OpenAI's json_object has no other key (and OpenAI refuses unknown parameters): the schema is in the
            # prompt. Some compatible servers also read it beside the type, when the job says so.
            body["response_format"] = ({"type": "json_object", "schema": spec.chat.response_schema}
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
        schema = spec.chat.response_schema
        self.instruction = (schema_instruction(schema)
                            if schema is not None and api.structured_output != "json_schema" else None)
        self._has_system = bool(spec.system)
        self._images_first = spec.chat.image_position == "before"
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


class _OpenAICodec(OpenAIBodies):
    """What every endpoint's codec shares in this dialect: its path and its Batch API lines."""

    endpoint = ""

    def __init__(self, spec: RequestSpec, job_name: str, api: ApiSpec, model: str, *, path: str,
                 batch_url: str) -> None:
        super().__init__(spec, job_name, api, model)
        self.spec, self.path, self._batch_url = spec, path, batch_url

    def batch_line(self, key: str, body: bytes) -> bytes:
        """One request of a Batch input file (``custom_id`` = the request key)."""
        from pipeline.providers.openai_batch import batch_line

        return batch_line(key, self._batch_url, body)

    def batch_result(self, raw: bytes) -> BatchResult | None:
        """One line of a results or errors file."""
        from pipeline.providers.openai_batch import batch_result

        return batch_result(raw, self.read_result)

    @staticmethod
    def read_result(body: Any) -> Any:
        """The answer of a Batch API result line's body (parsed JSON), as this endpoint's answer type."""
        return chat_answer(body)


class OpenAIChatCodec(_OpenAICodec):
    """``/chat/completions``: a row's messages in, the answer (or the error class) out."""

    endpoint = "chat"

    def body(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image] = ()) -> bytes:
        """One row's chat body (``OpenAIBodies.chat``)."""
        return self.chat(messages, images)

    def answer(self, status: int, headers: Any, body: bytes) -> Answer:
        """A chat response: the answer, or the error class that says what to do about it."""
        return classify(status, headers, body, parse_chat)  # type: ignore[no-any-return]


class OpenAIEmbeddingsCodec(_OpenAICodec):
    """``/embeddings``: many rows' inputs in one request, a vector each out."""

    endpoint = "embeddings"

    def body(self, text: str) -> bytes:
        """One row's embeddings body (``OpenAIBodies.embedding``)."""
        return self.embedding(text)

    def answer(self, status: int, headers: Any, body: bytes, n_inputs: int) -> EmbeddingAnswer:
        """An embeddings response for ``n_inputs`` inputs: the vectors, or the error class."""
        return classify(status, headers, body,  # type: ignore[no-any-return]
                        lambda c, h: parse_embeddings(c, h, n_inputs))

    def dims(self) -> int | None:
        """The vector size to expect: the job's ``dimensions``, else the model's default when known."""
        return (self.spec.embedding.dimensions if self.spec.embedding else None) or EMBEDDING_DIMS.get(self.spec.model)

    @staticmethod
    def read_result(body: Any) -> Any:
        """A one-input embeddings list of a Batch API result line."""
        return embeddings_answer(body, 1)


class OpenAIImagesCodec(_OpenAICodec):
    """``/images/generations``: a row's prompt in, its images (base64, or URLs) out."""

    endpoint = "images"

    def __init__(self, spec: RequestSpec, job_name: str, api: ApiSpec, model: str, *, path: str,
                 batch_url: str) -> None:
        super().__init__(spec, job_name, api, model, path=path, batch_url=batch_url)
        # A row's body is this prefix, its prompt as a JSON string, and "}" (the prompt last, like an input).
        self._prompt_prefix = orjson.dumps(self.head)[:-1] + b',"prompt":'  # the head holds "model" at least

    def body(self, prompt: str) -> bytes:
        """One row's body: the job's parameters, then the row's prompt."""
        return self._prompt_prefix + orjson.dumps(prompt) + b"}"

    def answer(self, status: int, headers: Any, body: bytes) -> ImageAnswer:
        """An image-generation response: the images, or the error class."""
        return classify(status, headers, body, parse_images)  # type: ignore[no-any-return]

    @staticmethod
    def read_result(body: Any) -> Any:
        """The images of a Batch API result line."""
        return images_answer(body)


class OpenAITranscriptionsCodec(_OpenAICodec):
    """``/audio/transcriptions``: a multipart form of the job's fields and a row's audio file; the text out."""

    endpoint = "transcriptions"

    def __init__(self, spec: RequestSpec, job_name: str, api: ApiSpec, model: str, *, path: str,
                 batch_url: str) -> None:
        super().__init__(spec, job_name, api, model, path=path, batch_url=batch_url)
        assert spec.transcription is not None
        self._read = transcript_reader(spec.transcription.response_format)
        self._model = model

    def form(self, body: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The form fields, in the API's names (a list per granularity, as the API reads arrays in forms)."""
        fields = [("model", self._model)]
        for key in ("language", "prompt", "response_format"):
            if body.get(key) is not None:
                fields.append((key, str(body[key])))
        if body.get("temperature") is not None:
            fields.append(("temperature", repr(float(body["temperature"]))))
        fields += [("timestamp_granularities[]", g) for g in body.get("timestamp_granularities") or ()]
        return fields

    def answer(self, status: int, headers: Any, body: bytes) -> TranscriptAnswer:
        """A transcription response in the job's response format, or the error class."""
        return classify(status, headers, body, self._read)  # type: ignore[no-any-return]


CODECS: dict[str, type[_OpenAICodec]] = {
    "chat": OpenAIChatCodec, "embeddings": OpenAIEmbeddingsCodec, "images": OpenAIImagesCodec,
    "transcriptions": OpenAITranscriptionsCodec}


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

    def codec(self, spec: RequestSpec, job_name: str) -> _OpenAICodec:
        """The codec of the job's endpoint, with this dialect's path and Batch API url for it."""
        endpoint = spec.endpoint
        return CODECS[endpoint](spec, job_name, self.api, self.model(spec), path=self.path(endpoint),
                                batch_url=self.batch_urls().get(endpoint, ""))

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Every request's headers; the key goes in ``Authorization`` and nowhere else."""
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": "pipeline/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return headers

    def path(self, endpoint: str) -> str:
        """The URL path of an endpoint, after the base URL (its codec's ``path``)."""
        return PATHS[endpoint]

    # The Batch API half is imported by batch runs only.

    def batch_urls(self) -> dict[str, str]:
        """The ``url`` of each endpoint in a Batch input line (and the batch's ``endpoint``)."""
        return BATCH_URLS

    def batch_params(self) -> dict[str, str] | None:
        """Query parameters every Files and Batches call carries (none for OpenAI)."""
        return None

    def batch_api(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int) -> BatchApi:
        """The Files and Batches client."""
        from pipeline.providers.openai_batch import BatchClient

        return BatchClient(base_url, self.headers(api_key), api_key, urls=self.batch_urls(),
                           params=self.batch_params(), timeout_s=timeout_s, max_attempts=max_attempts)


DESCRIPTOR = Descriptor(
    name="openai", default_base_url=DEFAULT_BASE_URL, key_env="OPENAI_API_KEY", hosts=("api.openai.com",),
    structured_outputs=("json_schema", "json_object", "none"),
    max_tokens_fields=("max_completion_tokens", "max_tokens"),
    max_images=500,  # "500 images per request" (platform.openai.com/docs/guides/images-vision)
    batch_limits=OPENAI_BATCH_LIMITS,  # 50,000 requests, 200 MB per input file (platform.openai.com/docs/guides/batch)
    endpoints=("chat", "embeddings", "images", "transcriptions"), batch_endpoints=("chat", "embeddings", "images"),
    make=lambda api, request: OpenAIProvider(api))
