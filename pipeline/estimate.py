"""The pre-run estimate: prompt tokens, cost bounds, the time the limits impose, rows that cannot fit.

Prompt tokens are exact where the provider's tokenizer is known (tiktoken, with the chat framing); for Claude,
whose tokenizer is not available offline, they are an upper bound (``tokens.BoundingTokenCounter``), labelled
so (``prompt_tokens_exact`` is False) until ``exact=True`` asks the provider's free counting endpoint for every
unique request (``exact.py``). Output tokens are unknowable before the run, so the estimate gives an upper
bound (every answer uses ``max_tokens``) and, when the job states a typical answer length in
``[estimate].output_tokens``, an expected figure. Identical requests are counted once, as the executor sends
them once.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Set
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.endpoints import endpoint_of, no_price_for
from pipeline.job import Job
from pipeline.keys import key_id
from pipeline.pricing import Price, Usage
from pipeline.providers.registry import DESCRIPTORS
from pipeline.source import ROW

if TYPE_CHECKING:
    from pipeline.measured import Measured

LARGEST_LISTED = 3  # the largest rows an estimate names
MAX_LISTED_IDS = 1000
@dataclass
class Estimate:
    """What a run of the job will send, cost and take. Costs are None when the model has no price."""

    job: str
    model: str
    rows: int = 0
    input_files: int = 0                    # the files (or objects) the rows came from
    input_remote: bool = False              # read in place on object storage (Parquet: only the columns used)
    rows_skipped: int = 0
    rows_bad_image: int = 0                 # rows failed before the run: an image that cannot be sent
    bad_images: list[tuple[Any, str]] = field(default_factory=list)  # (row id, why), the first MAX_LISTED_IDS
    rows_already_done: int = 0
    requests: int = 0
    http_requests: int = 0
    batch_available: bool = True            # the provider's Batch API takes this endpoint's requests
    chain: dict[str, Any] | None = None     # [reduce]: the fold's rounds (requests, prompt tokens) and cost bound
    made: tuple[str, str] | None = None     # what the requests make or take, where rows do not say it: (what, how much)
    duplicate_rows: int = 0
    prompt_tokens: int = 0
    prompt_tokens_exact: bool = True        # False: an upper bound, or the tokenizer is only close
    prompt_tokens_basis: str = "tiktoken, exact"
    image_tokens: int = 0                   # of prompt_tokens, what the images count for
    image_tokens_basis: str | None = None   # the rule they are counted by (None: no images)
    url_images: int = 0                     # images sent as URLs, counted at the rule's most
    max_output_tokens: int = 0
    expected_output_tokens: int | None = None
    expected_output_basis: str | None = None  # where the expected figure comes from: the job, or a sample
    cache_prefix_tokens: int = 0            # the static prompt prefix every request shares
    expected_cached_tokens: int = 0         # of prompt_tokens, expected to be read from the provider's cache
    expected_cache_write_tokens: int = 0    # written to the cache (Anthropic bills them at their own rate)
    cache_saved_usd_expected: float | None = None  # what caching takes off the expected cost
    largest_request_tokens: int = 0
    # the rows with the most prompt tokens, largest first: (row id, prompt tokens); one huge row can be most of a
    # job's cost, and the user should know before paying for it
    largest_requests: list[tuple[Any, int]] = field(default_factory=list)
    cost_usd_max: float | None = None
    cost_usd_expected: float | None = None
    batch_cost_usd_max: float | None = None
    batch_cost_usd_expected: float | None = None
    duration_s: float | None = None
    binding_limit: str | None = None
    context_window: int | None = None
    over_context_rows: int = 0
    over_context_ids: list[Any] = field(default_factory=list)
    price: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy, for --json output and the manifest."""
        return asdict(self)


class EstimateBuilder:
    """Accumulates an estimate chunk by chunk, so the run can reuse the same pass."""

    def __init__(self, job: Job, price: Price | None, measured: Measured | None = None,
                 cache: tuple[int, int, bool] = (0, 0, False)) -> None:
        self.job, self.price = job, price
        self.endpoint = endpoint_of(job.request.endpoint)
        # (the static prefix's tokens, what each request after the first reads of it, whether the first writes)
        self._cache = cache
        self.est = Estimate(job=job.name, model=job.request.model,
                            batch_available=job.request.endpoint in DESCRIPTORS[job.api.provider].batch_endpoints)
        self._largest: list[tuple[int, int, Any]] = []  # a min-heap of (prompt tokens, row, id): the largest rows
        # A typical answer's length: the job's own figure wins; else what the latest sample measured.
        self.expected_out: int | None = job.estimate.output_tokens
        if self.expected_out is not None:
            self.est.expected_output_basis = "[estimate].output_tokens"
        elif measured is not None:
            self.expected_out = math.ceil(measured.output_tokens_mean)
            self.est.expected_output_basis = (f"measured by `--sample` on {measured.requests} request(s): "
                                              f"{measured.output_tokens_mean:,.1f} output tokens each")
        elif (known := self.endpoint.known_output(job.request)) is not None:
            self.expected_out, self.est.expected_output_basis = known
        self._seen: set[int] = set()  # 64 bits a key: a third of the strings' memory (bench/estimate.py)
        self._over_context: set[int] = set()  # keys of requests over the context window (their repeats are too)
        self._costs = [0.0, 0.0, 0.0, 0.0]
        self._units = 0.0  # billed units that are not tokens (seconds of audio), summed over the requests
        self._budget_tokens = 0
        self._flat = price is None or price.flat
        if price is None:
            self.est.warnings.append(no_price_for(job))
        else:
            self.est.price = price.describe()
        self.est.context_window = self.endpoint.context_window(job.request, price.context_window if price else None)

    def add(self, chunk: Any, done: Set[str] = frozenset(), done_unrendered: int = 0) -> None:
        """Fold one RenderedChunk in; rows whose key is in ``done`` (answered in an earlier run) cost nothing,
        nor do ``done_unrendered`` more rows known answered by their print (``rowprints``)."""
        est, price = self.est, self.price
        est.rows += len(chunk.requests) + len(chunk.skipped) + done_unrendered
        est.rows_already_done += done_unrendered
        for s in chunk.skipped:
            if s.error_type is None:
                est.rows_skipped += 1
                continue
            est.rows_bad_image += 1
            if len(est.bad_images) < MAX_LISTED_IDS:
                est.bad_images.append((s.row_id, s.reason))
        est.url_images += chunk.url_images
        ctx = est.context_window
        expected_out = self.expected_out
        costs = self._costs
        per_request = price is not None and not self._flat
        largest = self._largest
        units_of = self.endpoint.units if self.endpoint.billed_units else None
        u = 0.0
        for r in chunk.requests:
            seen_id = key_id(r.key)
            if ctx is not None and (r.budget_tokens > ctx or seen_id in self._over_context):
                self._over_context.add(seen_id)
                est.over_context_rows += 1
                if len(est.over_context_ids) < MAX_LISTED_IDS:
                    est.over_context_ids.append(r.row_id)
            if r.key in done:
                est.rows_already_done += 1
                self._seen.add(seen_id)
                continue
            if seen_id in self._seen:
                est.duplicate_rows += 1
                continue
            self._seen.add(seen_id)
            est.requests += 1
            if units_of is not None:
                u = units_of(r)
                self._units += u
            est.prompt_tokens += r.prompt_tokens
            est.image_tokens += r.image_tokens
            est.max_output_tokens += r.max_output_tokens
            self._budget_tokens += r.budget_tokens
            est.largest_request_tokens = max(est.largest_request_tokens, r.budget_tokens)
            if len(largest) < LARGEST_LISTED or r.prompt_tokens > largest[0][0]:
                item = (r.prompt_tokens, r.row, r.row_id)
                (heapq.heappush if len(largest) < LARGEST_LISTED else heapq.heapreplace)(largest, item)
            if per_request:
                assert price is not None
                costs[0] += price.cost(Usage(r.prompt_tokens, r.max_output_tokens, units=u))
                costs[1] += price.cost(Usage(r.prompt_tokens, r.max_output_tokens, units=u), batch=True)
                if expected_out is not None:
                    costs[2] += price.cost(Usage(r.prompt_tokens, expected_out, units=u))
                    costs[3] += price.cost(Usage(r.prompt_tokens, expected_out, units=u), batch=True)

    def _cache_savings(self) -> tuple[float, float]:
        """What prompt caching takes off the expected cost (standard and Batch prices): every request after the
        first reads the shared prefix at the cached rate; with breakpoints the first writes it, at its rate."""
        est, price = self.est, self.price
        prefix, read, writes = self._cache
        est.cache_prefix_tokens = prefix
        if not read or not est.requests:
            return 0.0, 0.0
        est.expected_cached_tokens = read * (est.requests - 1)
        est.expected_cache_write_tokens = read if writes else 0
        if price is None:
            return 0.0, 0.0
        out = []
        for batch in (False, True):
            each = price.cost(Usage(prefix, 0), batch=batch) - price.cost(Usage(prefix, 0, cached_tokens=read),
                                                                           batch=batch)
            extra = (price.cost(Usage(read, 0, cache_write_tokens=read), batch=batch)
                     - price.cost(Usage(read, 0), batch=batch)) if writes else 0.0
            out.append(each * (est.requests - 1) - extra)
        est.cache_saved_usd_expected = out[0]
        return out[0], out[1]

    def counted_before(self, key: str) -> bool:
        """Whether an earlier chunk had this key: a repeat needs no counting (it is not sent again)."""
        return key_id(key) in self._seen

    def name_largest(self, chunk: pl.DataFrame, id_column: str) -> None:
        """Give the largest rows of a lean pass (which carry their row number as id) the ids ``chunk`` holds."""
        rows = chunk.get_column(ROW)
        first, last = rows[0], rows[-1]
        if not any(first <= row <= last and row_id == row for _, row, row_id in self._largest):
            return
        ids = dict(zip(rows.to_list(), chunk.get_column(id_column).to_list(), strict=True))
        self._largest = [(t, row, ids[row]) if row_id == row and row in ids else (t, row, row_id)
                         for t, row, row_id in self._largest]
        heapq.heapify(self._largest)

    def finish(self) -> Estimate:
        """Close the estimate: costs, duration under the limits, warnings."""
        est, lim = self.est, self.job.limits
        est.largest_requests = [(row_id, tokens) for tokens, _row, row_id in sorted(self._largest, reverse=True)]
        if self.expected_out is not None and self.endpoint.bills_output:
            est.expected_output_tokens = self.expected_out * est.requests
        if self.price is not None and self.price.flat:
            expected_out = est.expected_output_tokens or 0
            units = self._units
            self._costs = [self.price.cost(Usage(est.prompt_tokens, est.max_output_tokens, units=units)),
                           self.price.cost(Usage(est.prompt_tokens, est.max_output_tokens, units=units), batch=True),
                           self.price.cost(Usage(est.prompt_tokens, expected_out, units=units)),
                           self.price.cost(Usage(est.prompt_tokens, expected_out, units=units), batch=True)]
        saved = self._cache_savings()
        if self.price is not None:
            est.cost_usd_max, est.batch_cost_usd_max = self._costs[0], self._costs[1]  # bounds rely on no cache
            if est.expected_output_tokens is not None:
                est.cost_usd_expected = self._costs[2] - saved[0]
                est.batch_cost_usd_expected = self._costs[3] - saved[1]
        est.http_requests = self.endpoint.http_requests(self.job.request, est.requests - est.over_context_rows,
                                                        self._budget_tokens)
        est.made = self.endpoint.made(self.job.request, est.requests - est.over_context_rows, self._units)
        by_limit = {}
        if lim.requests_per_minute:
            by_limit["requests_per_minute"] = est.http_requests / lim.requests_per_minute * 60
        if lim.tokens_per_minute:
            by_limit["tokens_per_minute"] = self._budget_tokens / lim.tokens_per_minute * 60
            if est.largest_request_tokens > lim.tokens_per_minute:
                est.warnings.append(f"the largest request needs {est.largest_request_tokens} tokens, more than "
                                    f"tokens_per_minute ({lim.tokens_per_minute}): it can never be sent")
        if lim.input_tokens_per_minute:  # Anthropic: input and output apart, output charged at max_tokens
            by_limit["input_tokens_per_minute"] = est.prompt_tokens / lim.input_tokens_per_minute * 60
        if lim.output_tokens_per_minute:
            by_limit["output_tokens_per_minute"] = est.max_output_tokens / lim.output_tokens_per_minute * 60
        if by_limit:
            est.binding_limit = max(by_limit, key=lambda k: by_limit[k])
            est.duration_s = by_limit[est.binding_limit]
        if est.rows_bad_image:
            est.warnings.append(f"{est.rows_bad_image} row(s) have an image that cannot be sent; they fail before "
                                "the run (`pipeline validate` lists them)")
        if est.over_context_rows:
            est.warnings.append(f"{est.over_context_rows} row(s) need more than the model's "
                                f"{self.endpoint.size_limit} "
                                f"({est.context_window} tokens, prompt + max_tokens); they will fail")
        return est




