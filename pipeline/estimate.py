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
from array import array
from collections.abc import Callable, Mapping, Set
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any

import polars as pl

from pipeline.endpoints import endpoint_of, price_for
from pipeline.job import Job
from pipeline.keys import key_id
from pipeline.pricing import Price, Usage, no_price_warning
from pipeline.providers import DESCRIPTORS
from pipeline.render import PreparedChunk, Renderer
from pipeline.rendered import RenderedChunk
from pipeline.rowprints import RowPrints, split_done
from pipeline.source import DEFAULT_CHUNK_ROWS, ROW, Source, iter_chunks, open_source
from pipeline.tokens import CountingFailed, CountingProcess, release_encodings

if TYPE_CHECKING:
    from pipeline.measured import Measured

LARGEST_LISTED = 3  # the largest rows an estimate names
MAX_LISTED_IDS = 1000
# Past this many texts to count an estimate counts tokens in a process of its own, beside the rendering; below, the
# process's start (about 0.4 s, 68 MiB) costs more than it saves (bench/estimate.py). Texts, not rows: a resume renders
# only what is left, and its answered rows count nothing.
COUNT_ELSEWHERE_TEXTS = 50_000


@dataclass
class _Waiting:
    """A rendered chunk waiting for its token counts, with what its finishing needs."""

    prepared: PreparedChunk
    height: int
    by_print: int
    new_prints: list[Any]
    chunk: pl.DataFrame  # its rows, for the ids of rows the estimate lists (a lean pass)


def _counted_in(firsts: set[str], before: Callable[[str], bool], key: str) -> bool:
    return key in firsts or before(key)


class _Counting:
    """Where an estimate's token counting happens: in this process for the first ``COUNT_ELSEWHERE_TEXTS`` texts,
    then in a ``CountingProcess``, one chunk behind the rendering. If that process fails, counting comes back
    here: the counts are the same either way, only slower."""

    def __init__(self, renderer: Renderer) -> None:
        self._counter = renderer.counter
        self._texts = 0
        self._process: CountingProcess | None = None
        self._tried = False

    def seen(self, item: _Waiting) -> None:
        """Add up the texts a chunk had to count; start the process once there are enough."""
        self._texts += len(item.prepared.texts)
        if not self._tried and self._texts >= COUNT_ELSEWHERE_TEXTS:
            self._tried = True
            try:
                self._process = CountingProcess(self._counter.encoding_name)
            except OSError:
                self._process = None
                return
            # This process's own tables (about 46 MiB; bench/estimate.py's peak) are not needed while the child counts;
            # they come back if anything here counts again (a failed child, an answer without usage).
            release_encodings()

    def submit(self, item: _Waiting) -> bool:
        """Hand a chunk's texts to the process; False: count them here (no process, or texts it cannot take)."""
        if self._process is None:
            return False
        try:
            self._process.submit(item.prepared.texts)
        except CountingFailed:
            return False
        return True

    def collect(self, item: _Waiting) -> list[int]:
        """The counts of a submitted chunk."""
        if self._process is not None:
            try:
                return self._counter.scaled(self._process.result())
            except CountingFailed:
                self.close()
        return self._counter.count_texts(item.prepared.texts)

    def close(self) -> None:
        """Stop the process, if there is one."""
        if self._process is not None:
            self._process.close()
            self._process = None


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
        self.est = Estimate(job=job.name, model=job.request.model)
        self._largest: list[tuple[int, int, Any]] = []  # a min-heap of (prompt tokens, row, id): the largest rows
        # A typical answer's length: the job's own figure wins; else what the latest sample measured.
        self.expected_out: int | None = job.estimate.output_tokens
        if self.expected_out is not None:
            self.est.expected_output_basis = "[estimate].output_tokens"
        elif measured is not None:
            self.expected_out = math.ceil(measured.output_tokens_mean)
            self.est.expected_output_basis = (f"measured by `--sample` on {measured.requests} request(s): "
                                              f"{measured.output_tokens_mean:,.1f} output tokens each")
        self._seen: set[int] = set()  # 64 bits a key: a third of the strings' memory (bench/estimate.py)
        self._over_context: set[int] = set()  # keys of requests over the context window (their repeats are too)
        self._costs = [0.0, 0.0, 0.0, 0.0]
        self._budget_tokens = 0
        self._flat = price is None or price.flat
        if price is None:
            self.est.warnings.append(no_price_warning(job.request.model, DESCRIPTORS[job.api.provider].price_ids))
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
                costs[0] += price.cost(Usage(r.prompt_tokens, r.max_output_tokens))
                costs[1] += price.cost(Usage(r.prompt_tokens, r.max_output_tokens), batch=True)
                if expected_out is not None:
                    costs[2] += price.cost(Usage(r.prompt_tokens, expected_out))
                    costs[3] += price.cost(Usage(r.prompt_tokens, expected_out), batch=True)

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
            self._costs = [self.price.cost(Usage(est.prompt_tokens, est.max_output_tokens)),
                           self.price.cost(Usage(est.prompt_tokens, est.max_output_tokens), batch=True),
                           self.price.cost(Usage(est.prompt_tokens, expected_out)),
                           self.price.cost(Usage(est.prompt_tokens, expected_out), batch=True)]
        saved = self._cache_savings()
        if self.price is not None:
            est.cost_usd_max, est.batch_cost_usd_max = self._costs[0], self._costs[1]  # bounds rely on no cache
            if est.expected_output_tokens is not None:
                est.cost_usd_expected = self._costs[2] - saved[0]
                est.batch_cost_usd_expected = self._costs[3] - saved[1]
        est.http_requests = self.endpoint.http_requests(self.job.request, est.requests - est.over_context_rows,
                                                        self._budget_tokens)
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


def counting_basis(renderer: Renderer) -> tuple[bool, str]:
    """Whether the renderer's prompt counts are exact, and what they rest on (shown with the figure)."""
    return renderer.counter.exact, renderer.counter.basis


def estimate_source(job: Job, source: Source, renderer: Renderer, price: Price | None, *,
                    limit: int | None = None, settled: Callable[[list[str]], Mapping[str, Any]] | None = None,
                    on_chunk: Callable[[int], None] | None = None, counted: array[int] | None = None,
                    keep: Callable[[RenderedChunk], None] | None = None,
                    exact: Mapping[str, int] | None = None,
                    prints: RowPrints | None = None,
                    measured: Measured | None = None) -> tuple[Estimate, array[int] | None]:
    """Render every row (sending nothing) and add up what a run will cost.

    With ``settled`` (the journal's lookup), rows answered before cost nothing, and the positions of the rows
    still to send come back too (None when that is every row, or without ``settled``). ``counted`` is filled
    with each row's prompt tokens by position (0 for rows not counted), for the run to reuse; ``keep`` is
    handed every rendered chunk (the run keeps them while they fit, or stages Batch API files from them).
    ``exact`` holds the provider's own prompt counts by request key, which replace ours. With ``prints``
    (online resumes), rows whose print leads to a settled answer are not rendered at all, and the prints of
    the rows rendered are recorded for the next run.
    """
    builder = EstimateBuilder(job, price, measured, (renderer.static_prefix_tokens, renderer.cached_prefix_tokens,
                                                     renderer.cache.style == "breakpoint"))
    est = builder.est
    est.prompt_tokens_exact, est.prompt_tokens_basis = counting_basis(renderer)
    if job.request.tools and est.prompt_tokens_exact:
        est.prompt_tokens_exact = False
        est.prompt_tokens_basis = "close (tiktoken; the tool definitions counted as their JSON)"
    if job.request.images:
        est.image_tokens_basis = renderer.image_rule.name
        est.prompt_tokens_exact = est.prompt_tokens_exact and renderer.image_rule.exact
    if exact is not None:
        est.prompt_tokens_exact, est.prompt_tokens_basis = True, "counted by the provider, exact"
    todo: array[int] = array("q")

    def finish(w: _Waiting, counts: list[int]) -> None:
        rendered = renderer.finish_chunk(w.prepared, counts)
        if prints is not None:
            prints.record(rendered, w.new_prints)
            prints.flush()
        if exact is not None:
            rendered = replace(rendered, requests=[replace(r, prompt_tokens=exact.get(r.key, r.prompt_tokens))
                                                   for r in rendered.requests])
        listed = len(builder.est.over_context_ids)
        builder.add(rendered, done=rendered.settled.keys(), done_unrendered=w.by_print)
        if lean and renderer.id_column:  # the largest rows found in this chunk carry row numbers: ids instead
            builder.name_largest(w.chunk, renderer.id_column)
        if lean and renderer.id_column and len(builder.est.over_context_ids) > listed:  # row numbers -> ids
            rows = w.chunk.get_column(ROW).to_list()
            ids = dict(zip(rows, w.chunk.get_column(renderer.id_column).to_list(), strict=True))
            builder.est.over_context_ids[listed:] = [ids[r] for r in builder.est.over_context_ids[listed:]]
        if keep is not None:
            keep(rendered)
        if settled is not None:
            # in input order (a chunk's requests may be grouped by prompt prefix), as the readers' masks need
            todo.extend(sorted(r.row for r in rendered.requests if r.key not in rendered.settled))
        if counted is not None:  # chunks come in input order, so positions index the array directly
            counted.extend(array(counted.typecode, bytes(counted.itemsize * w.height)))
            for r in rendered.requests:
                counted[r.row] = r.prompt_tokens
        if on_chunk is not None:
            on_chunk(w.height)

    # nothing kept, recorded or resumed: requests need no ids but for the rows the estimate lists
    lean = keep is None and counted is None and settled is None and prints is None and exact is None
    counting = _Counting(renderer)
    waiting: _Waiting | None = None  # the chunk whose texts the counting process is counting
    try:
        for chunk in iter_chunks(source, renderer.columns, chunk_rows=renderer.chunk_rows(DEFAULT_CHUNK_ROWS),
                                 limit=limit):
            todo_rows, by_print, new_prints = split_done(prints, chunk) if prints is not None else (chunk, 0, [])
            before = builder.counted_before
            if waiting is not None and waiting.prepared.firsts:  # not yet in the builder: counted meanwhile
                before = partial(_counted_in, waiting.prepared.firsts, builder.counted_before)
            item = _Waiting(renderer.prepare_chunk(todo_rows, settled=settled, counted_before=before, lean=lean),
                            chunk.height, by_print, new_prints, todo_rows)
            counted_one = (waiting, counting.collect(waiting)) if waiting is not None else None
            overlapped = counting.submit(item)  # before finishing the one counted: the child works meanwhile
            if counted_one is not None:
                finish(*counted_one)
            waiting = item if overlapped else None
            if not overlapped:
                finish(item, renderer.counter.count_texts(item.prepared.texts))
            counting.seen(item)
        if waiting is not None:
            finish(waiting, counting.collect(waiting))
    finally:
        counting.close()
    est = builder.finish()
    est.input_files, est.input_remote = len(source.files), bool(source.remote or source.origins)
    if est.url_images and exact is None:
        est.prompt_tokens_exact = False
        est.image_tokens_basis = f"{est.image_tokens_basis}; {est.url_images:,} URL image(s) at the most an image costs"
    return est, (None if settled is None or len(todo) == est.rows else todo)


def estimate(job: Job, *, limit: int | None = None, on_chunk: Callable[[int], None] | None = None,
             exact: bool = False, base_url: str | None = None) -> Estimate:
    """Render every row (without sending anything) and add up what the run will cost. With ``exact``, prompt
    tokens a tokenizer cannot count exactly offline are counted by the provider (its free endpoint; the
    only thing an estimate ever sends), cached beside the output."""
    from pipeline.measured import measured_output

    source = open_source(job.input.path, job.storage.endpoint_url)
    renderer = Renderer(job, source)
    price = price_for(job)
    measured = measured_output(job)
    if not exact or renderer.counter.exact:
        est = estimate_source(job, source, renderer, price, limit=limit, on_chunk=on_chunk, measured=measured)[0]
        if exact:
            est.warnings.append("--exact: the offline count is already exact for this provider")
        return est
    counts = _provider_counts(job, source, renderer, limit=limit, base_url=base_url)
    return estimate_source(job, source, renderer, price, limit=limit, on_chunk=on_chunk, exact=counts,
                           measured=measured)[0]


def _provider_counts(job: Job, source: Source, renderer: Renderer, *, limit: int | None,
                     base_url: str | None) -> dict[str, int]:
    """Every unique request's exact prompt tokens from the provider (the cache's first)."""
    from pathlib import Path

    from pipeline.client import check_transport_security, resolve_api_key, resolve_base_url
    from pipeline.errors import UsageError
    from pipeline.exact import CountCache, count_exactly
    from pipeline.providers import provider_for
    from pipeline.providers.base import CountsTokens
    from pipeline.sink import OutputPaths

    provider = provider_for(job)
    if not isinstance(provider, CountsTokens):
        raise UsageError(f"{job.source}: --exact: provider {job.api.provider!r} has no token counting endpoint")
    url = resolve_base_url(job, base_url)
    key = resolve_api_key(job, url)
    check_transport_security(url, key is not None, allow_insecure=False)
    bodies: dict[str, bytes] = {}
    for chunk in iter_chunks(source, renderer.columns, limit=limit):
        bodies.update((r.key, r.body) for r in renderer.render_chunk(chunk).requests)
    cache = CountCache(OutputPaths(Path(job.output.local)).token_counts)
    try:
        return count_exactly(provider, bodies, cache, base_url=url, api_key=key, max_attempts=job.limits.max_attempts,
                             timeout_s=job.limits.timeout_s)
    finally:
        cache.close()
