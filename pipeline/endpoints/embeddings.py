"""The embeddings endpoint: many rows per request, plain text in, a float32 vector per row out.

An embeddings unit is many rows in one request, split in halves when the API refuses it as a whole; the rows'
answers stay together as one ``VectorBlock`` (one journal record, one output append).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

import numpy as np

from pipeline.endpoints.base import Endpoint, Vectors, mode_of
from pipeline.errors import RowError
from pipeline.outcome import Outcome, VectorBlock, embedding_outcome, failed, split_tokens, unsendable_input
from pipeline.pricing import Usage
from pipeline.spec import EmbeddingSpec, RequestSpec
from pipeline.tables import Table, default_of, shown

EMBEDDING_FORMATS = ("base64", "float")

if TYPE_CHECKING:
    from pathlib import Path

    from pipeline.pricing import Price
    from pipeline.providers.base import BatchResult, Codec, EmbeddingAnswer, EmbeddingsCodec
    from pipeline.rendered import Request
    from pipeline.senders import Sending, Sent
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter


def _limits(spec: RequestSpec) -> EmbeddingSpec:
    """The embeddings part of a job's request (its parser always sets it)."""
    assert spec.embedding is not None
    return spec.embedding


class Embeddings(Endpoint):
    """``endpoint = "embeddings"``: ``[request].input`` is the text; rows are grouped into requests."""

    name = "embeddings"
    prompt_role = "input"
    chat_messages = False
    bills_output = False
    row_prints = False  # an answer lives in a block of many rows
    size_limit = "input limit"

    def parse(self, req: Table, base: Path) -> RequestSpec:
        """The embeddings keys: model, input (the template), dimensions, encoding_format and the batch limits."""
        for key in ("prompt", "prompt_file", "system", "messages", "max_tokens", "temperature", "top_p", "seed", "stop",
                    "reasoning_effort", "response_schema", "response_schema_file", "schema_retries", "images",
                    "image_position", "tools", "tool_choice"):
            if req.has(key):
                raise req.fail(key, 'does not apply to endpoint = "embeddings" (its template is [request].input)')
        model = req.str("model", required=True)
        template = req.str("input", required=True)
        assert model is not None and template is not None
        fmt = req.str("encoding_format", default_of(EmbeddingSpec, "encoding_format"))
        if fmt not in EMBEDDING_FORMATS:
            raise req.fail("encoding_format", f"must be one of {', '.join(EMBEDDING_FORMATS)}, got {shown(fmt)}")
        batch_size = req.int("batch_size", default_of(EmbeddingSpec, "batch_size"))
        if batch_size > 2048:
            raise req.fail("batch_size", "can be at most 2048 (the API's limit of inputs per request), got "
                                         f"{batch_size}")
        embedding = EmbeddingSpec(
            dimensions=req.int("dimensions"), encoding_format=fmt, batch_size=batch_size,
            batch_tokens=req.int("batch_tokens", default_of(EmbeddingSpec, "batch_tokens")),
            max_input_tokens=req.int("max_input_tokens", default_of(EmbeddingSpec, "max_input_tokens")))
        spec = RequestSpec(endpoint=self.name, model=model, prompt=template, prompt_source=req.where("input"),
                           max_tokens=0, embedding=embedding, mode=mode_of(req))
        req.done()
        return spec

    def body(self, codec: Codec, messages: list[dict[str, str]]) -> bytes:
        """The one-input body of the row's text (a request groups many such bodies)."""
        return cast("EmbeddingsCodec", codec).body(messages[0]["content"])

    def text_body(self, codec: Codec) -> Callable[[str], bytes]:
        """A row's text is its body's input: no message list per row."""
        return cast("EmbeddingsCodec", codec).body

    def sender(self, sending: Sending, spec: RequestSpec, *, codec: Codec, checker: Checker | None,
               counter: ChatTokenCounter | None) -> EmbeddingsSender:
        """Rows grouped into requests under the job's batch limits."""
        return EmbeddingsSender(sending, spec, cast("EmbeddingsCodec", codec))

    def refuse_staged(self, key: str, prompt_tokens: int, spec: RequestSpec) -> Outcome | None:
        """An input too long for the model, or empty, fails alone rather than fail its Batch API file."""
        return unsendable_input(key, prompt_tokens, _limits(spec).max_input_tokens)

    def http_requests(self, spec: RequestSpec, sendable: int, tokens: int) -> int:
        """The requests the batches will make: cut at ``batch_size`` inputs or ``batch_tokens`` tokens."""
        if sendable <= 0:
            return 0
        return max(math.ceil(sendable / _limits(spec).batch_size), math.ceil(tokens / _limits(spec).batch_tokens))

    def context_window(self, spec: RequestSpec, model_window: int | None) -> int | None:
        """The model's input limit (``max_input_tokens``), not a chat context window."""
        return _limits(spec).max_input_tokens

    def vectors(self, codec: Codec) -> Vectors:
        """The vector column, of the model's dimensions where the provider knows them."""
        return Vectors(cast("EmbeddingsCodec", codec).dims())

    def batch_outcome(self, r: BatchResult, price: Price | None, *, codec: Codec,
                      checker: Checker | None) -> Outcome:
        """A one-input result line as its row's vector, priced at the Batch API price."""
        a: EmbeddingAnswer = r.answer  # type: ignore[assignment]
        cost = price.cost(Usage(prompt_tokens=a.prompt_tokens), batch=True) if price else None
        dims = cast("EmbeddingsCodec", codec).dims()
        return embedding_outcome(r.key, a.vectors[0], dims, model=a.model, prompt_tokens=a.prompt_tokens,
                                 cost_usd=cost, attempts=1)


class EmbeddingsSender:
    """Many rows per request, up to ``batch_size`` inputs and ``batch_tokens`` tokens (and never more than a
    minute of the tokens limit). A request the API refuses as a whole (a 400) is split in halves and sent
    again, so only the row at fault fails, at the cost of a few extra requests for that batch alone."""

    def __init__(self, sending: Sending, spec: RequestSpec, codec: EmbeddingsCodec) -> None:
        self.sending, self.spec, self.codec, self.dims = sending, spec, codec, codec.dims()
        self.limits = _limits(spec)
        self._batch: list[Request] = []
        self._tokens = 0

    def refuse(self, req: Request) -> Outcome | None:
        """An input too long for the model, or empty, fails alone before it joins a request."""
        return unsendable_input(req.key, req.prompt_tokens, self.limits.max_input_tokens)

    def add(self, req: Request) -> list[Request] | None:
        """Returns the batch this row closed, if it closed one (not a coroutine: it runs once per row)."""
        full = None
        tpm = self.sending.budget.token_cap
        cap = min(self.limits.batch_tokens, tpm or self.limits.batch_tokens)
        if self._batch and (len(self._batch) >= self.limits.batch_size or self._tokens + req.prompt_tokens > cap):
            full = self.drain()
        self._batch.append(req)
        self._tokens += req.prompt_tokens
        return full

    def drain(self) -> list[Request] | None:
        """The rows not yet in a request."""
        batch, self._batch, self._tokens = self._batch, [], 0
        return batch or None

    async def send(self, unit: list[Request]) -> Sent:
        """One request for many rows; usage and cost are shared by the rows' token counts."""
        s = self.sending
        tokens = sum(r.prompt_tokens for r in unit)
        client, n, codec = s.client, len(unit), self.codec
        body = codec.group([r.body for r in unit])
        got = await s.spending(tokens, 0, lambda: s.call(tokens, lambda: client.call(
            codec.path, body, lambda st, h, c: codec.answer(st, h, c, n))))
        if got is None:
            return []
        if got.answer is not None:
            return shared(unit, got.answer, s.price, self.dims, attempts=got.attempts, latency_ms=got.latency_ms)
        if isinstance(got.error, RowError) and len(unit) > 1:
            half = len(unit) // 2
            return [*await self.send(unit[:half]), *await self.send(unit[half:])]
        assert got.error is not None
        return [([r], failed(r.key, got.error, attempts=got.attempts)) for r in unit]


def shared(batch: Sequence[Request], a: EmbeddingAnswer, price: Price | None, dims: int | None, *,
           attempts: int, latency_ms: float) -> Sent:
    """An embeddings answer as the rows' results: the billed tokens split by the rows' own counts, one price
    for the request split like its tokens (embeddings have no tiers: cost is linear in tokens).

    The rows stay together as one ``VectorBlock`` (one journal record, one output append): per-row objects
    were most of the cost of a batched embeddings run (bench/embed.py). Rows whose vector has the wrong size fail one by
    one.
    """
    counts = np.fromiter((r.prompt_tokens for r in batch), dtype=np.float64, count=len(batch))
    shares = split_tokens(a.prompt_tokens, counts)
    batch_cost = None if price is None else price.cost(Usage(prompt_tokens=a.prompt_tokens))
    per_token = batch_cost / a.prompt_tokens if batch_cost is not None and a.prompt_tokens else 0.0
    costs = None if batch_cost is None else shares * per_token
    if dims is not None and any(len(v) != 4 * dims for v in a.vectors):
        return [([r], embedding_outcome(r.key, vec, dims, model=a.model, prompt_tokens=int(shares[i]),
                                        cost_usd=None if costs is None else float(costs[i]), attempts=attempts,
                                        latency_ms=latency_ms))
                for i, (r, vec) in enumerate(zip(batch, a.vectors, strict=True))]
    vectors = np.frombuffer(b"".join(a.vectors), dtype="<f4").reshape(len(batch), -1)
    block = VectorBlock(keys=[r.key for r in batch], vectors=vectors, prompt_tokens=shares, cost_usd=costs,
                        model=a.model, latency_ms=latency_ms, attempts=attempts)
    return [(batch, block)]
