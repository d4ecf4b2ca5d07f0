"""What the simulator's dialects share with it: its settings, its counters, a call as it reads one, and the
``Host`` protocol (admission, delay, the answer) a dialect module serves its routes through. The server builds
the dialects; the dialects know only this module, so neither imports the other back.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from aiohttp import web

from pipeline.tokens import ChatTokenCounter


@dataclass
class SimConfig:
    """What the simulator enforces and injects. Rates are probabilities per request, in [0, 1]."""

    rpm: int | None = None
    tpm: int | None = None
    lenient: bool = False            # accept what the real APIs refuse (unknown parameters, wrong ranges, ...)
    limit_model: str = "window"      # "window": a bucket of limit_window_s seconds of the limit, starting full;
    #                                  "token-bucket": a continuous bucket holding a whole minute's limit
    start_empty: bool = False        # token-bucket: start drained, as a busy account's bucket is
    tpm_count: str = "exact"         # what TPM charges at admission besides max_tokens: "exact" prompt tokens,
    #                                  or "chars": about 4 characters a token, as OpenAI documents its estimate
    limit_window_s: float = 60.0     # the slice the limits are enforced over: 60 lets a full minute through at
    #                                  once; OpenAI documents sub-minute slices (e.g. 1 s: 60,000 RPM as 1,000/s)
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    error_rate: float = 0.0          # 500/502/503
    rate_429: float = 0.0            # injected 429s, beyond the real limits
    drop_rate: float = 0.0           # connection closed without an answer
    slow_body_rate: float = 0.0      # half the body, a pause, then the rest
    slow_body_ms: float = 500.0
    malformed_rate: float = 0.0      # a 200 whose body is not valid JSON
    insufficient_quota: bool = False
    overloaded_rate: float = 0.0     # Anthropic routes: 529 overloaded_error
    itpm: int | None = None          # Anthropic: input tokens per minute
    otpm: int | None = None          # Anthropic: output tokens per minute (charged max_tokens at admission)
    api_key: str | None = None       # when set, requests must carry it (in each dialect's own header)
    models: tuple[str, ...] = ()     # when set, other models get 404 model_not_found
    context_window: int = 128_000
    seed: int = 0
    # the Batch API
    batch_delay_s: float = 1.0        # from creation to completion
    batch_line_error_rate: float = 0.0  # lines answered with a 500 in the error file
    batch_fail: bool = False          # every batch fails validation
    batch_expire_fraction: float | None = None  # batches expire after this share of their lines
    batch_create_hold_s: float = 0.0  # POST /v1/batches waits this long; a client gone by then made nothing
    batch_create_drop_replies: int = 0  # this many creates succeed but their reply is lost


class Bucket:
    """A per-minute budget refilled continuously, holding at most ``window_s`` seconds of it: OpenAI's model of
    RPM/TPM (a 60 s window lets a client spend a whole minute's worth at once; shorter windows model the
    sub-minute slices OpenAI says it also enforces)."""

    def __init__(self, limit: int, window_s: float = 60.0, *, start_empty: bool = False) -> None:
        self.limit = limit
        self.capacity = max(1.0, limit * window_s / 60.0)
        self.level = 0.0 if start_empty else self.capacity
        self.t = time.monotonic()

    def _refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.t) * self.limit / 60.0)
        self.t = now

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` fits (0 when it fits now); more than the window holds fits a full bucket."""
        self._refill(now)
        amount = min(amount, self.capacity)
        return 0.0 if self.level >= amount else (amount - self.level) * 60.0 / self.limit

    def take(self, amount: float) -> None:
        self.level -= amount

    def reset_s(self) -> float:
        """Time until the bucket is full again, which is what x-ratelimit-reset-* means."""
        return (self.capacity - self.level) * 60.0 / self.limit


@dataclass
class SimStats:
    """What the simulator saw; served at /v1/sim/stats."""

    requests: int = 0
    ok: int = 0
    rate_limited: int = 0              # 429s from the real RPM/TPM limits
    injected: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    duplicate_ok: int = 0              # answered OK for a body it had already answered OK
    max_in_flight: int = 0
    first_request_at: float | None = None   # wall clock (time.time()) of the first request
    last_request_at: float | None = None
    admitted_per_s: Counter[int] = field(default_factory=Counter)  # requests past the limits, per second of the run
    files_uploaded: int = 0
    batches_created: int = 0
    batches_by_input_file: Counter[str] = field(default_factory=Counter)  # >1 for a file: a duplicate batch
    batch_polls: int = 0
    batch_lines: int = 0
    by_dialect: Counter[str] = field(default_factory=Counter)  # requests per API: openai, azure, anthropic
    count_tokens_calls: int = 0
    billed_input_tokens: int = 0       # Anthropic: input tokens billed on answered requests

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, for --json output and the manifest."""
        d = asdict(self)
        d["injected"] = dict(self.injected)
        d["batches_by_input_file"] = dict(self.batches_by_input_file)
        d["admitted_per_s"] = [self.admitted_per_s.get(i, 0) for i in range(max(self.admitted_per_s, default=-1) + 1)]
        d["statuses"] = {str(k): v for k, v in self.statuses.items()}
        d["by_dialect"] = dict(self.by_dialect)
        return d


@dataclass
class ChatCall:
    """A checked chat body and its prompt tokens."""

    body: dict[str, Any]
    model: str
    messages: list[Any]
    max_out: int
    prompt_tokens: int
    counter: ChatTokenCounter
    prompt: str = ""  # the last message's text
    images: tuple[str, ...] = ()  # a few words about each image of the last message
    prefix: tuple[bytes, int] = (b"", 0)  # what precedes the last message (its hash, its tokens): the cacheable part


@dataclass
class EmbeddingsCall:
    """A checked embeddings body and each input's tokens."""

    body: dict[str, Any]
    model: str
    inputs: list[str]
    counts: list[int]


class Host(Protocol):
    """What a dialect (``anthropic.py``, ``batches.py``) needs of the simulator serving it."""

    config: SimConfig
    stats: SimStats
    rng: Any
    rpm: Bucket | None
    itpm: Bucket | None
    otpm: Bucket | None

    def unauthorised(self, request: web.Request) -> web.Response | None: ...

    def arrived(self) -> None: ...

    async def in_flight(self, answer: Any) -> web.StreamResponse: ...

    async def admit(self, request: web.Request, raw: bytes, body: dict[str, Any], cost_tokens: int,
                    model: str, output_tokens: int = 0) -> web.Response | None: ...

    async def delay(self) -> None: ...

    def count_ok(self, raw: bytes) -> None: ...

    async def respond(self, request: web.Request, raw: bytes, payload: dict[str, Any]) -> web.StreamResponse: ...

    def chat_call(self, body: dict[str, Any]) -> ChatCall: ...

    def chat_answer(self, call: ChatCall) -> dict[str, Any]: ...

    def embeddings_call(self, body: dict[str, Any]) -> EmbeddingsCall: ...

    def embeddings_answer(self, call: EmbeddingsCall) -> dict[str, Any]: ...

    def answer_body(self, url: str, body: dict[str, Any]) -> dict[str, Any]: ...
