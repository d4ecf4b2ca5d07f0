"""What every provider module hands back, whatever its wire format: answers, usage and rate-limit readings.

These are the types the rest of the flow sees. A provider module turns its dialect into them (and its error
responses into the classes of ``errors.py``); nothing after the provider reads a header or a JSON body.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from pipeline.errors import ProviderError
from pipeline.images import OPENAI_LIMITS, Image, ImageLimits, ImageRule, openai_rule
from pipeline.pricing import PriceIds, Usage
from pipeline.rates import NO_RATE as NO_RATE  # part of the provider seam, re-exported
from pipeline.rates import RateInfo as RateInfo
from pipeline.spec import RequestSpec
from pipeline.tokens import ChatTokenCounter

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PromptCache:
    """How a provider caches repeated prompt prefixes: ``automatic`` (OpenAI: prefixes of ``min_tokens`` and
    more, hit in steps of ``step`` tokens) or ``breakpoint`` (Anthropic: only where a request marks it, from
    ``min_tokens``; the first request writes the prefix, at its own price), or ``none`` (not counted)."""

    style: str = "none"
    min_tokens: int = 1024
    step: int = 1

    def read_tokens(self, prefix_tokens: int) -> int:
        """What a request repeating a prefix of ``prefix_tokens`` reads from the cache."""
        if self.style == "none" or prefix_tokens < self.min_tokens:
            return 0
        return prefix_tokens // self.step * self.step


NO_CACHE = PromptCache()


@dataclass(frozen=True, slots=True)
class Answer:
    """A successful chat completion, reduced to what the output table needs. ``usage`` is None when the server
    sent none (some compatible servers): the sender then counts it and marks it estimated."""

    content: str | None
    finish_reason: str | None
    refusal: str | None
    model: str | None
    usage: Usage | None
    rate: RateInfo
    usage_estimated: bool = False
    tool_calls: str | None = None  # JSON [{id, name, arguments (JSON text)}] when the model called tools


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One image of an image-generation answer: its bytes (decoded from base64), or the URL to fetch them from
    at once (URLs expire)."""

    data: bytes | None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass(frozen=True, slots=True)
class ImageAnswer:
    """An image-generation response: the images in order, their file format where the API says it, and the
    usage (text input tokens as prompt tokens, image output tokens as completion tokens)."""

    images: list[GeneratedImage]
    output_format: str | None
    model: str | None
    usage: Usage | None
    rate: RateInfo


@dataclass(frozen=True, slots=True)
class TranscriptAnswer:
    """A transcription response: the text, and what the response format adds (language, duration, segments),
    with the usage the API reports (tokens, or seconds of audio as ``units``; None when it sends none)."""

    text: str
    language: str | None
    duration_s: float | None
    segments: list[dict[str, Any]] | None
    model: str | None
    usage: Usage | None
    rate: RateInfo


@dataclass(frozen=True, slots=True)
class EmbeddingAnswer:
    """An embeddings response: one float32 vector (little-endian bytes) per input, in input order."""

    vectors: list[bytes]
    prompt_tokens: int
    model: str | None
    rate: RateInfo


@dataclass(frozen=True)
class BatchState:
    """A provider's batch in the runner's terms, whichever Batch API made it: each client maps its own object
    to this, so nothing outside a provider reads another's shape.

    ``status`` uses OpenAI's words (``validating``, ``in_progress``, ``finalizing``, ``completed``, ``failed``,
    ``expired``, ``cancelling``, ``cancelled``); ``counts`` are the provider's request counts (``total``,
    ``completed``, ``failed``); ``output_file_id`` is where the result lines are read from once it has ended."""

    id: str
    status: str
    counts: Mapping[str, int]
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float = 0.0
    input_file_id: str | None = None
    errors: tuple[str, ...] = ()  # why the provider failed the batch, each "code: message (line n)"

    @property
    def counts_text(self) -> str:
        """The counts as the ledger keeps them (JSON, sorted keys)."""
        return json.dumps(dict(self.counts), sort_keys=True)


@dataclass(frozen=True, slots=True)
class BatchResult:
    """One request's result in a Batch API results file: its answer, or why it has none."""

    key: str
    answer: Answer | EmbeddingAnswer | ImageAnswer | TranscriptAnswer | None = None
    error: ProviderError | None = None
    attempts: int = 1  # 0: never executed (the batch ended first)


class BatchApi(Protocol):
    """A provider's Batch API client (``Provider.batch_api``): files go up, batches are made, polled, cancelled
    and their result lines read; every call retried under the job's policy, and the provider's objects come back
    as ``BatchState``."""

    def __enter__(self) -> BatchApi: ...

    def __exit__(self, *exc: object) -> None: ...

    def retrying(self) -> Iterable[Any]:
        """The retry policy's attempts, for a call the caller makes safe to repeat (tenacity's ``Retrying``)."""
        ...

    def retried(self, call: Callable[[], T]) -> T:
        """``call()`` under the retry policy."""
        ...

    def upload(self, path: Path, filename: str) -> str:
        """A Batch input file sent to the provider (where it takes one); returns what ``create`` names it by."""
        ...

    def create(self, file_id: str, endpoint: str, metadata: dict[str, str]) -> BatchState:
        """A batch of an uploaded file's requests (one try: ``find`` first when it may exist already)."""
        ...

    def find(self, input_file_id: str, since: float, taken: frozenset[str] = frozenset()) -> BatchState | None:
        """The batch made from a file, if there is one (after a kill or a lost reply)."""
        ...

    def retrieve(self, batch_id: str) -> BatchState:
        """The batch as it stands."""
        ...

    def cancel(self, batch_id: str) -> BatchState:
        """Ask the provider to cancel the batch; what ended stays collectable."""
        ...

    def lines(self, file_id: str) -> Iterator[bytes]:
        """A results file's lines, streamed."""
        ...


@runtime_checkable
class CountsTokens(Protocol):
    """A provider with an endpoint that counts a request's prompt tokens exactly (Anthropic's free
    ``count_tokens``): what ``pipeline estimate --exact`` needs."""

    count_path: str

    def count_tokens_body(self, body: bytes) -> bytes:
        """The counting request of one request body."""
        ...

    def count_answer(self, status: int, headers: Any, body: bytes) -> int:
        """The exact prompt tokens of a counting response, or raise its error class."""
        ...


class Codec(Protocol):
    """One endpoint's wire format at one provider, built once for a job: where its requests go, and its Batch
    API lines. Each endpoint's codec adds its own bodies and answers (``ChatCodec``, ``EmbeddingsCodec``); a
    provider serves an endpoint by having a codec for it."""

    path: str  # the URL path of the endpoint, after the base URL

    def added_tokens(self, counter: ChatTokenCounter) -> int:
        """Prompt tokens the dialect adds to every request beyond the rendered text (a schema in the system
        prompt, a tool definition), so the estimate counts them."""
        ...

    def mark_cache(self) -> None:
        """Mark the end of the static system prompt as a cache breakpoint, where the dialect has them."""
        ...

    def batch_line(self, key: str, body: bytes) -> bytes:
        """One request of a Batch input file, carrying its request key."""
        ...

    def batch_result(self, raw: bytes) -> BatchResult | None:
        """One line of a Batch results file; None for a line that is not ours."""
        ...


class ChatCodec(Codec, Protocol):
    """The chat endpoint's codec."""

    def body(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image] = ()) -> bytes:
        """One row's chat body from its rendered messages (system, few-shot, user) and its images (in the user
        message)."""
        ...

    def answer(self, status: int, headers: Any, body: bytes) -> Answer:
        """A chat response as an answer, or raise its error class."""
        ...


class EmbeddingsCodec(Codec, Protocol):
    """The embeddings endpoint's codec."""

    def body(self, text: str) -> bytes:
        """One row's embeddings body."""
        ...

    def group(self, bodies: Sequence[bytes]) -> bytes:
        """Many rows' embeddings bodies as one request."""
        ...

    def answer(self, status: int, headers: Any, body: bytes, n_inputs: int) -> EmbeddingAnswer:
        """An embeddings response as vectors, or raise its error class."""
        ...

    def dims(self) -> int | None:
        """The vector size the job should get back, when it is known."""
        ...


class ImagesCodec(Codec, Protocol):
    """The image-generation endpoint's codec."""

    def body(self, prompt: str) -> bytes:
        """One row's image-generation body from its rendered prompt."""
        ...

    def answer(self, status: int, headers: Any, body: bytes) -> ImageAnswer:
        """An image-generation response as its images, or raise its error class."""
        ...


class TranscriptionsCodec(Codec, Protocol):
    """The transcription endpoint's codec: a multipart form of the request's fields and its audio file."""

    def form(self, body: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The form fields (all but the file) of a request from its logical body."""
        ...

    def answer(self, status: int, headers: Any, body: bytes) -> TranscriptAnswer:
        """A transcription response as its text and parts, or raise its error class."""
        ...


@dataclass(frozen=True)
class Descriptor:
    """A provider's facts, declared once in its module: what the job file's parser checks ``[api]`` and
    ``[request]`` against, and how ``provider_for`` builds the provider. Nothing outside ``providers/`` names a
    provider; it reads these."""

    name: str                            # [api].provider
    default_base_url: str                # "" where the user must give one (Azure, a compatible server)
    key_env: str                         # the environment variable the key is read from by default
    hosts: tuple[str, ...]               # the API's own host names (a leading "." matches a suffix)
    structured_outputs: tuple[str, ...]  # [api].structured_output choices, the default first
    max_tokens_fields: tuple[str, ...]   # [api].max_tokens_field choices, the default first; () when fixed
    max_images: int                      # images one request may carry (the provider's vision docs)
    batch_limits: tuple[int, int]        # Batch API (requests, bytes) per file or batch
    endpoints: tuple[str, ...]           # the [request].endpoint values it serves
    # [api] strings only this provider takes, each with its default (None: unset), kept in ApiSpec.options
    options: Mapping[str, str | None] = field(default_factory=dict)
    # other [api] keys only this provider takes, each with why another provider has no use for it
    own_keys: Mapping[str, str] = field(default_factory=dict)
    requires: Mapping[str, str] = field(default_factory=dict)  # [api] key -> the key it needs beside it
    batch_endpoints: tuple[str, ...] = ("chat", "embeddings")  # the endpoints its Batch API takes
    request_keys_refused: tuple[str, ...] = ()  # chat [request] keys its API has no counterpart for
    image_detail: bool = True            # images take a `detail` setting
    image_limits: ImageLimits = OPENAI_LIMITS  # what one image may be (the provider's vision docs)
    image_rule: Callable[[str], ImageRule] = openai_rule  # a model's image-token rule
    price_ids: PriceIds = ("openai",)  # where its models' prices are looked up (genai-prices' ids, in turn)
    example_base_url: str = "http://localhost:8000/v1"  # shown when a base URL is missing
    make: Callable[..., Provider] | None = field(default=None, compare=False, repr=False)  # (api, request)

    @property
    def own_api_keys(self) -> dict[str, str]:
        """Every ``[api]`` key only this provider takes (its options and its other own keys), each with why another
        provider has no use for it ("" for an option): what the job parser refuses elsewhere."""
        return {**dict.fromkeys(self.options, ""), **self.own_keys}

    def serves_host(self, host: str) -> bool:
        """Whether ``host`` is one of this API's own."""
        return any(host.endswith(h) if h.startswith(".") else host == h for h in self.hosts)


class Provider(Protocol):
    """Everything that depends on a provider's wire dialect; nothing outside ``providers/`` reads its bytes.

    Per endpoint, a codec (``codec``): the bodies of a job, the path, a response read as an answer or raised as
    the error class that says what to do (``errors.py``) with its rate-limit readings, and the Batch API's input
    and result lines. For the provider as a whole: the headers (auth), token counting, prompt caching, the
    Batch API client.
    """

    name: str

    def base_url(self, url: str) -> str:
        """The base URL as this provider's paths expect it (Anthropic's with or without ``/v1``)."""
        ...

    def counter(self, model: str) -> ChatTokenCounter:
        """The prompt-token counter of ``model``: exact where the tokenizer is known, else an upper bound."""
        ...

    def prompt_cache(self, model: str) -> PromptCache:
        """How this provider caches ``model``'s repeated prompt prefixes."""
        ...

    def hint(self, status: int, message: str) -> str:
        """The job setting most likely to fix a server that refuses every request with this answer."""
        ...

    def codec(self, spec: RequestSpec, job_name: str) -> Codec:
        """The codec of the job's endpoint (``spec.endpoint``), built for this job."""
        ...

    def headers(self, api_key: str | None) -> dict[str, str]:
        """Every request's headers, auth included."""
        ...

    def batch_api(self, base_url: str, api_key: str | None, *, timeout_s: float, max_attempts: int) -> BatchApi:
        """A client of the provider's Batch API (upload, create, find, retrieve, cancel, lines)."""
        ...
