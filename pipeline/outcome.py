"""The result of a request and of a row: the one type every stage after sending shares.

An ``Outcome`` is what became of one request key (answered, or failed with its error); a ``VectorBlock`` is
the answered rows of one embeddings request, kept together. The journal stores them, the sink writes them,
the stats add them up; every way a row can end is built by one function here, so a reason, a price or a
retry flag is decided in one place.

The output table's result columns are declared on the ``Outcome`` fields themselves (``_column``): a new
answer column is one new field, and the sink, the journal and the output schema follow from it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import pairwise
from operator import attrgetter
from typing import Any, Literal, Protocol

import numpy as np
import polars as pl

from pipeline.errors import ProviderError, TransientError
from pipeline.pricing import Price, Usage
from pipeline.providers.base import Answer

Status = Literal["ok", "error", "skipped", "in_batch"]
"""What became of a row:

- ``ok``: answered; ``content`` (or ``embedding``) holds the answer.
- ``error``: failed after its attempts; ``error`` says why, ``error_type`` is a short stable label, and
  ``retryable`` says whether a plain rerun tries again (transient trouble that outlasted the retries).
- ``skipped``: not sent because a column its templates use is null and the job says ``skip_nulls``.
- ``in_batch``: not an answer but a marker: the request sits in an open Batch API batch, so the estimate and
  the submission count it as taken care of. Never journaled nor written to the output.
"""


def _column(dtype: pl.DataType, default: Any = None) -> Any:
    """A field that is also an output column of this type."""
    return field(default=default, metadata={"column": dtype})


@dataclass(frozen=True, slots=True)
class Outcome:
    """The final answer to one request key: answered, or failed with its error after its attempts."""

    key: str
    status: Status = field(metadata={"column": pl.String()})
    content: str | None = _column(pl.String())
    finish_reason: str | None = _column(pl.String())
    refusal: str | None = _column(pl.String())
    prompt_tokens: int | None = _column(pl.Int64())
    cached_tokens: int | None = _column(pl.Int64())
    completion_tokens: int | None = _column(pl.Int64())
    reasoning_tokens: int | None = _column(pl.Int64())
    cache_write_tokens: int | None = _column(pl.Int64())
    usage_estimated: bool | None = _column(pl.Boolean())  # the server sent no usage: counted by our tokenizer
    cost_usd: float | None = _column(pl.Float64())
    latency_ms: float | None = _column(pl.Float64())
    attempts: int | None = _column(pl.Int32(), 0)
    error: str | None = _column(pl.String())
    error_type: str | None = _column(pl.String())
    model: str | None = _column(pl.String())
    embedding: bytes | None = None  # float32 little-endian, for embeddings jobs (a column of its own type)
    tool_calls: str | None = None  # JSON [{id, name, arguments}], for tool jobs (typed columns in the sink)
    retryable: bool = False  # failed on transient trouble (retries ran out): a plain rerun tries again

    def as_duplicate(self) -> Outcome:
        """This answer as an identical row's: same answer, no cost and no attempts of its own."""
        return replace(self, cost_usd=None if self.cost_usd is None else 0.0, attempts=0)

    # As a ``Result``: one row's answer (``VectorBlock`` is the other shape a request can end as).

    def outcome(self, i: int) -> Outcome:
        """The outcome of the request's row ``i`` (a row's own request has one row)."""
        return self

    def record_in(self, store: ResultStore) -> None:
        """Buffer this result in the journal."""
        store.add(self)

    def write_to(self, sink: ResultSink, rows: list[int], keys: list[tuple[Any, ...]], stats: RunStats) -> None:
        """Hand the row its answer and count it."""
        sink.add(rows[0], keys[0], self)
        stats.count(self)

    def spend_into(self, stats: RunStats) -> None:
        """Add what this answer cost to the run's totals."""
        stats.cost_usd += self.cost_usd or 0.0
        stats.prompt_tokens += self.prompt_tokens or 0
        stats.completion_tokens += self.completion_tokens or 0
        stats.cached_tokens += self.cached_tokens or 0
        stats.reasoning_tokens += self.reasoning_tokens or 0
        stats.cache_write_tokens += self.cache_write_tokens or 0
        stats.usage_estimated += bool(self.usage_estimated)


OUTCOME_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Outcome))
_OUTPUT_FIELDS = tuple(f.name for f in fields(Outcome) if "column" in f.metadata)
RESULT_SCHEMA: dict[str, pl.DataType] = {
    **{f.name: f.metadata["column"] for f in fields(Outcome) if "column" in f.metadata},
    "deduplicated": pl.Boolean(),  # answered by an identical earlier row's request; its cost is on that row
}
output_values = attrgetter(*_OUTPUT_FIELDS)  # an outcome's result-column values, in RESULT_SCHEMA order


# -- how a row can end --------------------------------------------------------------------------------------

def answered(key: str, a: Answer, price: Price | None, *, attempts: int, latency_ms: float | None,
             rejected: Sequence[Usage] = (), batch: bool = False) -> Outcome:
    """A chat answer, priced (at the Batch API price with ``batch``). Answers ``rejected`` before it (invalid
    for the schema) were paid too, so they count. A bare refusal is a failed row. An answer without usage (the
    server sent none and nothing counted it) has no token or cost figures rather than made-up ones."""
    usages = [*rejected, *([a.usage] if a.usage is not None else [])]
    known = a.usage is not None
    cost = sum(price.cost(u, batch=batch) for u in usages) if price is not None and known else None
    tokens: dict[str, Any] = {name: sum(getattr(u, name) for u in usages) if known else None for name in (
        "prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cache_write_tokens")}
    tokens["usage_estimated"] = a.usage_estimated or not known
    if a.refusal and not a.content:
        return Outcome(key, "error", refusal=a.refusal, finish_reason=a.finish_reason, model=a.model,
                       cost_usd=cost, latency_ms=latency_ms, attempts=attempts,
                       error="the model refused to answer", error_type="refusal", **tokens)
    return Outcome(key, "ok", content=a.content, finish_reason=a.finish_reason, refusal=a.refusal,
                   model=a.model, cost_usd=cost, latency_ms=latency_ms, attempts=attempts,
                   tool_calls=a.tool_calls, **tokens)


def invalid_answer(outcome: Outcome, problem: str) -> Outcome:
    """An answer that does not match the job's schema: failed, with what was paid for it."""
    return replace(outcome, status="error", error=problem, error_type="invalid_answer")


def failed(key: str, e: ProviderError, *, attempts: int) -> Outcome:
    """A request the provider did not answer: retryable on a plain rerun when the trouble was transient."""
    return Outcome(key, "error", attempts=attempts, error=str(e), error_type=e.kind,
                   retryable=isinstance(e, TransientError))


def too_large(key: str, tokens: int, tpm: int | None) -> Outcome:
    """A request larger than a whole minute of tokens: no wait would ever admit it."""
    return Outcome(key, "error", error=f"the request needs {tokens} tokens, more than tokens_per_minute ({tpm}): "
                   "it can never be admitted", error_type="too_large")


def unsendable_input(key: str, prompt_tokens: int, max_input_tokens: int) -> Outcome | None:
    """The failed outcome of an embeddings input too long for the model, or empty; None when it can be sent.

    Such a row fails alone, before anything is sent: it must not fail the request (or Batch API file) it
    would have joined.
    """
    if 0 < prompt_tokens <= max_input_tokens:
        return None
    why = (f"the input has {prompt_tokens} tokens, more than the model takes ({max_input_tokens})"
           if prompt_tokens else "the input is empty")
    return Outcome(key, "error", prompt_tokens=prompt_tokens, error=why,
                   error_type="input_too_long" if prompt_tokens else "empty_input")


def skipped(reason: str, error_type: str | None = None) -> Outcome:
    """A row not sent: skipped (a null cell under ``skip_nulls``), or failed before sending when ``error_type``
    says why (a bad image). No request, so no key, tokens or attempts; nothing is journaled, so a fixed input
    is sent on the next run."""
    if error_type is not None:
        return Outcome("", "error", attempts=None, error=reason, error_type=error_type)
    return Outcome("", "skipped", attempts=None, error=reason)


def batch_missing(key: str, batch_status: str, why: str, *, retryable: bool) -> Outcome:
    """A request whose batch ended without a result line for it."""
    return Outcome(key, "error", error=f"no result: the batch ended {batch_status}{why}",
                   error_type=f"batch_{batch_status}", retryable=retryable)



def embedding_row(key: str, vector: bytes, *, model: str | None, prompt_tokens: int, cost_usd: float | None,
                  attempts: int, latency_ms: float | None = None) -> Outcome:
    """An answered embeddings row: a vector and no completion (its other token counts are 0)."""
    return Outcome(key, "ok", model=model, prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0,
                   reasoning_tokens=0, cache_write_tokens=0, cost_usd=cost_usd, latency_ms=latency_ms,
                   attempts=attempts, embedding=vector)


def embedding_outcome(key: str, vector: bytes, dims: int | None, *, model: str | None, prompt_tokens: int,
                      cost_usd: float | None, attempts: int, latency_ms: float | None = None) -> Outcome:
    """One row's embedding as its outcome: failed when it has not the dimensions the job expects (either mode)."""
    if dims is not None and len(vector) != 4 * dims:
        return Outcome(key, "error", model=model, prompt_tokens=prompt_tokens, cost_usd=cost_usd, attempts=attempts,
                       latency_ms=latency_ms, error_type="wrong_dimensions",
                       error=f"the embedding has {len(vector) // 4} dimensions, expected {dims}")
    return embedding_row(key, vector, model=model, prompt_tokens=prompt_tokens, cost_usd=cost_usd,
                         attempts=attempts, latency_ms=latency_ms)


@dataclass(frozen=True, slots=True)
class VectorBlock:
    """The answered rows of one embeddings request, together: what the journal and the output store in one
    piece instead of an ``Outcome`` per row. Every row of a block is ``ok``."""

    keys: list[str]
    vectors: np.ndarray              # (rows, dims) float32
    prompt_tokens: np.ndarray        # (rows,) int64: the request's billed tokens, split by the rows' counts
    cost_usd: np.ndarray | None      # (rows,) float64; None when the model has no known price
    model: str | None
    latency_ms: float
    attempts: int

    def outcome(self, i: int) -> Outcome:
        """Row ``i`` as a stand-alone outcome (for the rare row that needs one: a duplicate, a resumed row)."""
        return embedding_row(self.keys[i], self.vectors[i].tobytes(), model=self.model,
                             prompt_tokens=int(self.prompt_tokens[i]),
                             cost_usd=None if self.cost_usd is None else float(self.cost_usd[i]),
                             latency_ms=self.latency_ms, attempts=self.attempts)

    def record_in(self, store: ResultStore) -> None:
        """Buffer the block in the journal as one record."""
        store.add_block(self)

    def write_to(self, sink: ResultSink, rows: list[int], keys: list[tuple[Any, ...]], stats: RunStats) -> None:
        """Hand the rows their vectors as arrays (no outcome per row) and count them: every row is ``ok``."""
        sink.add_block(rows, keys, self)
        stats.rows_done += len(rows)
        stats.ok += len(rows)

    def spend_into(self, stats: RunStats) -> None:
        """Add what the request cost to the run's totals (embeddings bill input tokens only)."""
        if self.cost_usd is not None:
            stats.cost_usd += float(self.cost_usd.sum())
        stats.prompt_tokens += int(self.prompt_tokens.sum())


class ResultStore(Protocol):
    """Where results are journaled (``journal.Store``)."""

    def add(self, outcome: Outcome) -> None: ...

    def add_block(self, block: VectorBlock) -> None: ...


class ResultSink(Protocol):
    """Where rows' results are written (``sink.PartWriter``, the Ray engine's commits)."""

    def add(self, row: int, keys: tuple[Any, ...], outcome: Outcome, *, deduplicated: bool = False) -> None: ...

    def add_block(self, rows: list[int], keys: list[tuple[Any, ...]], block: VectorBlock) -> None: ...


class Result(Protocol):
    """What one sent request ends as (an ``Outcome`` for one row, a ``VectorBlock`` for many rows' vectors):
    the scheduler journals it, writes it and counts it through these methods, never asking which it holds."""

    def outcome(self, i: int) -> Outcome: ...

    def record_in(self, store: ResultStore) -> None: ...

    def write_to(self, sink: ResultSink, rows: list[int], keys: list[tuple[Any, ...]],
                 stats: RunStats) -> None: ...

    def spend_into(self, stats: RunStats) -> None: ...


def split_tokens(total: int, counts: np.ndarray) -> np.ndarray:
    """Split ``total`` billed tokens over rows by their own counts (largest remainder: the parts sum up;
    ties go to the earlier row)."""
    exact = total * counts / (counts.sum() or 1)
    shares = exact.astype(np.int64)
    short = total - int(shares.sum())
    if short > 0:
        shares[np.argsort(-(exact - shares), kind="stable")[:short]] += 1
    return shares


# -- the totals of a run ------------------------------------------------------------------------------------

# The manifest's name of each total beside ``RunStats``' own: the one list every writer and reader of totals
# follows (a new token count is one line here).
TOTALS: tuple[tuple[str, str], ...] = (
    ("rows", "rows_done"), ("ok", "ok"), ("failed", "failed"), ("skipped", "skipped"),
    ("resumed_from_journal", "resumed"), ("deduplicated", "deduplicated"), ("requests_sent", "requests_sent"),
    ("retries", "retries"), ("rate_limited_429", "rate_limited"), ("prompt_tokens", "prompt_tokens"),
    ("cached_tokens", "cached_tokens"), ("completion_tokens", "completion_tokens"),
    ("reasoning_tokens", "reasoning_tokens"), ("cache_write_tokens", "cache_write_tokens"),
    ("answers_with_estimated_usage", "usage_estimated"), ("cost_usd_this_run", "cost_usd"))
# What each run's entry in the manifest's history keeps (the report charts them).
RUN_TOTALS = ("rows", "ok", "failed", "resumed_from_journal", "requests_sent", "rate_limited_429", "retries",
              "prompt_tokens", "completion_tokens", "cost_usd_this_run")

@dataclass
class RunStats:
    """Live totals of a run, passed to the progress callback and written to the manifest."""

    rows_total: int = 0
    rows_done: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    pending: int = 0                   # Batch API mode: rows still waiting in a batch at the provider
    resumed: int = 0
    deduplicated: int = 0
    requests_sent: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0
    usage_estimated: int = 0           # answers whose server sent no usage (counted by our tokenizer)
    cost_usd: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)
    # the running totals at the first event of each second: what the report's timeline charts are made from
    _samples: list[tuple[float, ...]] = field(default_factory=list, repr=False)
    _second: int = field(default=-1, repr=False)

    def totals(self) -> dict[str, Any]:
        """The run's totals as the manifest names them (plain values: they cross to the Ray driver too)."""
        return {name: getattr(self, attr) for name, attr in TOTALS}

    def add_totals(self, totals: dict[str, Any], errors: dict[str, int] | None = None) -> None:
        """Add another run's (a partition's) ``totals()`` and errors to these."""
        for name, attr in TOTALS:
            setattr(self, attr, getattr(self, attr) + totals.get(name, 0))
        self.errors.update(errors or {})

    def tick(self) -> None:
        """Note the totals once a second (at the second's first event): a compact timeline of the run."""
        second = int(time.monotonic() - self.started)
        if second != self._second:
            self._second = second
            self._samples.append(self._totals(second))

    def _totals(self, at: float) -> tuple[float, ...]:
        return (at, self.requests_sent, self.ok, self.failed, self.rate_limited, self.retries,
                self.prompt_tokens + self.completion_tokens, self.cost_usd)

    def timeline(self, most_points: int = 1800) -> dict[str, Any]:
        """Per-bucket counts of the run (requests sent, answers, failures, 429s, retries, tokens, dollars);
        buckets are a second, or wider for a run longer than ``most_points`` seconds."""
        samples = [(0.0, 0, 0, 0, 0, 0, 0, 0.0), *self._samples, self._totals(round(self.elapsed_s, 3))]
        end = samples[-1][0]
        bucket = max(1, math.ceil(end / most_points))
        n = int(end // bucket) + 1
        names = ("requests", "ok", "failed", "rate_limited", "retries", "tokens", "cost_usd")
        series: dict[str, list[float]] = {name: [0] * n for name in names}  # type: ignore[misc]
        for before, after in pairwise(samples):
            slot = min(int(before[0] // bucket), n - 1)  # what happened since the last sample, at its second
            for i, name in enumerate(names, start=1):
                series[name][slot] += after[i] - before[i]
        series["cost_usd"] = [round(c, 8) for c in series["cost_usd"]]
        return {"bucket_s": bucket, "t": [i * bucket for i in range(n)], **series}

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started."""
        return time.monotonic() - self.started

    def spend(self, result: Result) -> None:
        """What an answer received in this run cost: its tokens and dollars."""
        result.spend_into(self)

    def count(self, outcome: Outcome, *, deduplicated: bool = False, resumed: bool = False) -> None:
        """One row written to the output with ``outcome`` (either mode counts rows the same way)."""
        self.tick()
        self.rows_done += 1
        if outcome.status == "ok":
            self.ok += 1
        elif outcome.status == "skipped":
            self.skipped += 1
            return
        else:
            self.failed += 1
            self.errors[outcome.error_type or "error"] += 1
        if deduplicated:
            self.deduplicated += 1
        elif resumed:
            self.resumed += 1
