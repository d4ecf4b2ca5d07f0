"""The planning pass: every row rendered once before anything is sent. It owns what is settled (the journal's
answers, the row prints of a resume), what is left to send, each row's prompt-token count (counted beside the
rendering in a process of its own past a size), and what is kept or staged for the run (rendered chunks, the
Batch API's input files); it feeds each chunk to the pure ``estimate.EstimateBuilder``. ``estimate(job)`` is the
pass with nothing kept: what ``pipeline estimate`` runs.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import polars as pl

from pipeline.endpoints import price_for
from pipeline.estimate import Estimate, EstimateBuilder
from pipeline.job import Job
from pipeline.pricing import Price
from pipeline.render import PreparedChunk, Renderer
from pipeline.rendered import RenderedChunk
from pipeline.rowprints import RowPrints, split_done
from pipeline.source import DEFAULT_CHUNK_ROWS, ROW, Source, iter_chunks, open_source
from pipeline.tokens import CountingFailed, CountingProcess, release_encodings

if TYPE_CHECKING:
    from pipeline.measured import Measured


@dataclass
class PassOptions:
    """What a planning pass does beside estimating.

    ``settled`` (the journal's lookup): rows answered before cost nothing, and the positions of the rows still
    to send come back (``Planned.todo``). ``counted`` is filled with each row's prompt tokens by position (0 for
    rows not counted), for the run to reuse; ``keep`` is handed every rendered chunk (the run keeps them while
    they fit, or stages Batch API files from them). ``exact`` holds the provider's own prompt counts by request
    key, which replace ours. With ``prints`` (online resumes), rows whose print leads to a settled answer are
    not rendered at all, and the prints of the rows rendered are recorded for the next run. ``measured``: what
    the latest ``--sample`` measured, for the expected figures."""

    limit: int | None = None
    settled: Callable[[list[str]], Mapping[str, Any]] | None = None
    on_chunk: Callable[[int], None] | None = None
    counted: array[int] | None = None
    keep: Callable[[RenderedChunk], None] | None = None
    exact: Mapping[str, int] | None = None
    prints: RowPrints | None = None
    measured: Measured | None = None


class Planned(NamedTuple):
    """What a planning pass found: the estimate, and the input positions still to send (None: every row, or
    nothing was settled to compare with)."""

    estimate: Estimate
    todo: array[int] | None


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


def planning_pass(job: Job, source: Source, renderer: Renderer, price: Price | None,
                  opts: PassOptions | None = None) -> Planned:
    """Render every row once (sending nothing): what is settled, what is left, what each row counts, what is
    kept or staged for the run, and, fed chunk by chunk to the ``EstimateBuilder``, what the run will cost."""
    o = opts or PassOptions()
    limit, settled, on_chunk, counted, keep = o.limit, o.settled, o.on_chunk, o.counted, o.keep
    exact, prints, measured = o.exact, o.prints, o.measured
    builder = EstimateBuilder(job, price, measured, (renderer.static_prefix_tokens, renderer.cached_prefix_tokens,
                                                     renderer.cache.style == "breakpoint"))
    est = builder.est
    est.prompt_tokens_exact, est.prompt_tokens_basis = renderer.counter.exact, renderer.counter.basis
    if job.request.chat.tools and est.prompt_tokens_exact:
        est.prompt_tokens_exact = False
        est.prompt_tokens_basis = "close (tiktoken; the tool definitions counted as their JSON)"
    if job.request.chat.images:
        est.image_tokens_basis = renderer.builder.image_rule.name
        est.prompt_tokens_exact = est.prompt_tokens_exact and renderer.builder.image_rule.exact
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
    return Planned(est, None if settled is None or len(todo) == est.rows else todo)


def estimate(job: Job, *, limit: int | None = None, on_chunk: Callable[[int], None] | None = None,
             exact: bool = False, base_url: str | None = None) -> Estimate:
    """Render every row (without sending anything) and add up what the run will cost. With ``exact``, prompt
    tokens a tokenizer cannot count exactly offline are counted by the provider (its free endpoint; the
    only thing an estimate ever sends), cached beside the output."""
    from pipeline.chain import check_ready
    from pipeline.measured import measured_output

    check_ready(job)  # the input of a chained job is its dependency's output, once that run completed
    if job.reduce is not None and not job.maps:  # [reduce] alone: the fold over the input's rows is the estimate
        from pipeline.reduce import chain_estimate

        est = Estimate(job=job.name, model=job.reduce.model)
        est.chain = chain_estimate(job, limit).to_dict()
        return est
    source = open_source(job.input.path, job.storage.endpoint_url)
    renderer = Renderer(job, source)
    price = price_for(job)
    measured = measured_output(job)
    if not exact or renderer.counter.exact:
        est = planning_pass(job, source, renderer, price,
                            PassOptions(limit=limit, on_chunk=on_chunk, measured=measured)).estimate
        if exact:
            est.warnings.append("--exact: the offline count is already exact for this provider")
    else:
        counts = _provider_counts(job, source, renderer, limit=limit, base_url=base_url)
        est = planning_pass(job, source, renderer, price,
                            PassOptions(limit=limit, on_chunk=on_chunk, exact=counts, measured=measured)).estimate
    if job.reduce is not None:
        from pipeline.reduce import chain_estimate

        est.chain = chain_estimate(job, limit, measured.output_tokens_mean if measured else None).to_dict()
    return est


def _provider_counts(job: Job, source: Source, renderer: Renderer, *, limit: int | None,
                     base_url: str | None) -> dict[str, int]:
    """Every unique request's exact prompt tokens from the provider (the cache's first)."""
    from pathlib import Path

    from pipeline.access import check_transport_security, resolve_api_key, resolve_base_url
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
