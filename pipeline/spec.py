"""The typed pieces of a job: plain frozen objects, read by every stage.

They live apart from the job file's parser (``job.py``) so that the modules the parser consults (the providers'
descriptors, the endpoints) can use them without importing the parser back. Defaults are written here once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# The Batch API limits of OpenAI (requests, bytes) per input file: the defaults of [batch].
OPENAI_BATCH_LIMITS = (50_000, 200_000_000)


@dataclass(frozen=True)
class Message:
    """One templated chat message of a few-shot prefix."""

    role: str
    content: str


@dataclass(frozen=True)
class ImageSpec:
    """One image per row: a template giving an https URL, a local path (relative to the input's folder), or
    a bare reference to a binary column; ``detail`` where the provider has it."""

    template: str
    detail: str | None = None
    where: str = field(default="[request].images", compare=False)  # for messages only


@dataclass(frozen=True)
class ToolSpec:
    """One function the model may call: nothing is executed, its arguments are the row's extracted fields."""

    name: str
    description: str | None
    parameters: Mapping[str, Any]
    strict: bool = False


@dataclass(frozen=True)
class ImageGenSpec:
    """What one image-generation request asks for (``endpoint = "images"``): the model's own parameters, as
    the job gave them (None: the API's default, left out of the body)."""

    n: int = 1
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None
    output_compression: int | None = None
    moderation: str | None = None
    style: str | None = None
    response_format: str | None = None


@dataclass(frozen=True)
class EmbeddingSpec:
    """What embeddings requests ask for (``endpoint = "embeddings"``; ``input``, the template, is the request's
    ``prompt``) and how many rows one request groups."""

    dimensions: int | None = None
    encoding_format: str = "base64"
    batch_size: int = 2048
    batch_tokens: int = 300_000
    max_input_tokens: int = 8192


@dataclass(frozen=True)
class TranscriptionSpec:
    """What one transcription request asks for (``endpoint = "transcriptions"``); the audio's template is the
    request's ``prompt`` and the model's text prompt, a template too, is ``hint`` (None: the API's defaults)."""

    hint: str | None = None
    language: str | None = None
    response_format: str = "json"
    temperature: float | None = None
    timestamp_granularities: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReduceSpec:
    """``[reduce]``: the rows (or the map's answers) of each group folded into one answer, in as many rounds as the
    context window requires. Unset fields take the map's (model, system prompt's absence, max_tokens)."""

    prompt: str
    model: str
    max_tokens: int
    group_by: tuple[str, ...] = ()
    items: tuple[str, ...] = ()       # the columns each item carries (default: the map's answer, or every input column)
    order_by: tuple[str, ...] = ()
    system: str | None = None
    max_items_tokens: int | None = None  # the most prompt tokens a request may hold (default: the context window's)
    response_schema: Mapping[str, Any] | None = None
    output: str = ""                  # the reduce's table (default: OUT.reduce.parquet beside the map's)
    mode: str = "online"              # each round online, or as one Batch API batch (default: the map's mode)


@dataclass(frozen=True)
class InputSpec:
    """Where the rows come from and which of their columns travel to the output."""

    path: str
    id: str | None = None
    keep: tuple[str, ...] = ()
    skip_nulls: bool = False
    from_job: str | None = None  # the job file whose output this job reads (its reduce's table, if it has one)


@dataclass(frozen=True)
class ChatSpec:
    """What a chat request asks for beyond its messages (``endpoint = "chat"``): sampling, a typed answer (a
    response schema, or tools), images in the user message."""

    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reasoning_effort: str | None = None
    response_schema: Mapping[str, Any] | None = None
    schema_retries: int = 1
    images: tuple[ImageSpec, ...] = ()
    image_position: str = "after"  # the images follow the prompt's text in the user message, or precede it
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str = "auto"  # "auto", "required", or one tool's name


@dataclass(frozen=True)
class RequestSpec:
    """How one row becomes one request: the model, the templates every endpoint renders (``system``,
    ``messages``, ``prompt``), and the endpoint's own part (``chat``, ``embedding``, ``image``, ``transcription``:
    the one its parser sets)."""

    model: str
    endpoint: str = "chat"
    system: str | None = None
    prompt: str = ""
    prompt_source: str = field(default="[request].prompt", compare=False)  # for messages only
    messages: tuple[Message, ...] = ()
    max_tokens: int = 256
    mode: str = "online"  # or "batch": the Batch API (half the price, results within 24 h)
    chat: ChatSpec = ChatSpec()  # chat: sampling, response schema or tools, images (the defaults elsewhere)
    embedding: EmbeddingSpec | None = None  # embeddings: what they ask for, and the rows a request groups
    image: ImageGenSpec | None = None  # images: what each generation asks for
    transcription: TranscriptionSpec | None = None  # transcriptions: what each one asks for


@dataclass(frozen=True)
class OutputSpec:
    """Where the result table goes (a local path or an object-storage URL)."""

    path: str
    stage: str | None = None    # an object-storage output: its journal and working files, on this machine

    @property
    def local(self) -> str:
        """The path the run writes to on this machine (the output itself, or its stage)."""
        return self.stage or self.path


@dataclass(frozen=True)
class EngineSpec:
    """Where the scheduler runs: this process, or tasks on a Ray cluster over partitions of the input."""

    kind: str = "local"
    address: str | None = None      # a Ray cluster's address; none: a local Ray started and stopped by the run
    workers: int = 4                # tasks running at once (each with its share of the concurrency)
    partition_rows: int = 50_000    # rows per partition (Parquet: whole row groups up to about this many)
    commit_rows: int = 256          # answers a task commits at a time: the most a killed task loses


@dataclass(frozen=True)
class StorageSpec:
    """Object storage settings (credentials come from each cloud's own environment and config chain)."""

    endpoint_url: str | None = None  # an S3-compatible server; else AWS_ENDPOINT_URL


@dataclass(frozen=True)
class ApiSpec:
    """Where requests go and in which dialect; the key itself is read from the named environment variable only.

    ``provider`` picks the wire dialect (``providers/``); the other keys are the points where servers of one
    dialect differ. ``options`` holds the provider's own keys (its descriptor's ``options``, such as Azure's
    deployment): only the provider reads them, so a provider with keys of its own adds nothing here.
    """

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    provider: str = "openai"
    max_tokens_field: str = "max_completion_tokens"
    structured_output: str = "json_schema"
    json_object_schema: bool = False      # openai-compatible: the schema also beside json_object (an extension)
    options: tuple[tuple[str, str], ...] = ()  # (key, value) of the provider's own [api] keys, defaults filled in

    def option(self, key: str) -> str | None:
        """The provider's own ``[api]`` key ``key``: as the job set it, else its default, else None."""
        return next((value for k, value in self.options if k == key), None)


@dataclass(frozen=True)
class LimitsSpec:
    """The provider's limits and how hard to push against them."""

    concurrency: int = 64
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_attempts: int = 6
    timeout_s: float = 120.0
    input_tokens_per_minute: int | None = None   # Anthropic counts input and output tokens apart
    output_tokens_per_minute: int | None = None


@dataclass(frozen=True)
class BudgetSpec:
    """A spending cap: refuse to start above it, stop cleanly before crossing it."""

    max_cost_usd: float | None = None


@dataclass(frozen=True)
class PricingSpec:
    """Per-job price overrides, USD per million tokens; they win over the price table."""

    input_per_mtok: float | None = None
    cached_input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    context_window: int | None = None
    per_audio_minute_usd: float | None = None  # transcription: USD per minute of audio


@dataclass(frozen=True)
class BatchSpec:
    """How Batch API mode splits, submits and polls (the defaults are OpenAI's limits)."""

    max_requests_per_file: int = OPENAI_BATCH_LIMITS[0]
    max_bytes_per_file: int = OPENAI_BATCH_LIMITS[1]
    poll_interval_s: float = 10.0      # the first wait between polls; it grows while nothing changes
    poll_max_interval_s: float = 120.0


@dataclass(frozen=True)
class EstimateSpec:
    """What the user expects a typical answer to cost, for an estimate below the max_tokens bound."""

    output_tokens: int | None = None
