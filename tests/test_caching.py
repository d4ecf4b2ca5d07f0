"""Prompt caching: the shared static prefix is found, counted in the estimate's expected cost, marked for Claude,
billed at the cached rate (the simulator caches like each provider), and what it saved is reported."""

import orjson
import polars as pl
import pytest

from pipeline.endpoints import price_for
from pipeline.job import Job
from pipeline.plan import check
from pipeline.planning import estimate
from pipeline.pricing import Usage
from pipeline.report import build_report
from pipeline.run import run
from pipeline.source import read_head

LONG = " ".join(f"Rule {i}: label the review by its overall tone, not by one sentence." for i in range(90))


def _request(system: str, model: str = "gpt-4o-mini") -> str:
    return f'model = "{model}"\nsystem = "{system}"\nprompt = "{{{{ text }}}}"\nmax_tokens = 40'


def test_openai_prefix_is_cached_and_priced_at_the_cached_rate(make_job, sim):
    job = Job.load(make_job(rows=10, request=_request(LONG), extra="[estimate]\noutput_tokens = 12"))
    est = estimate(job)
    prefix = est.cache_prefix_tokens
    assert prefix >= 1024
    step = prefix // 128 * 128
    assert est.expected_cached_tokens == 9 * step
    price = price_for(job)
    assert price is not None
    saved = 9 * (price.cost(Usage(prefix, 0)) - price.cost(Usage(prefix, 0, cached_tokens=step)))
    assert est.cache_saved_usd_expected == pytest.approx(saved)
    assert est.cost_usd_max == pytest.approx(price.cost(Usage(est.prompt_tokens, 40 * 10)))  # a bound: no cache
    assert est.cost_usd_expected == pytest.approx(
        price.cost(Usage(est.prompt_tokens, 12 * 10)) - saved)
    with sim() as s:
        run(job, base_url=s.base_url)
    out = pl.read_parquet(job.output.path)
    assert sorted(out["cached_tokens"].to_list()) == [0] + [step] * 9  # the first request fills the cache
    for r in out.iter_rows(named=True):  # each row at its own rates: cached tokens at the cached rate
        expected = (r["prompt_tokens"] - r["cached_tokens"]) * 0.15 + r["cached_tokens"] * 0.075 + \
            r["completion_tokens"] * 0.60
        assert r["cost_usd"] == pytest.approx(expected / 1e6)
    report = build_report(job.output.path)
    assert report["cached_tokens"] == 9 * step
    assert report["cache_saved_usd"] == pytest.approx(9 * step * (0.15 - 0.075) / 1e6)


def test_a_short_prefix_is_not_counted_as_cached(make_job, sim):
    job = Job.load(make_job(rows=5, request=_request("Label the review."), extra="[estimate]\noutput_tokens = 12"))
    est = estimate(job)
    assert est.cache_prefix_tokens < 1024 and est.expected_cached_tokens == 0 and est.cache_saved_usd_expected is None
    with sim() as s:
        run(job, base_url=s.base_url)
    assert pl.read_parquet(job.output.path)["cached_tokens"].sum() == 0
    assert build_report(job.output.path)["cache_saved_usd"] is None


def _anthropic_body(make_job, system: str) -> dict:
    job = Job.load(make_job(request=_request(system, "claude-sonnet-4-5"),
                            extra='[api]\nprovider = "anthropic"'))
    checked = check(job)
    chunk = read_head(checked.source, checked.renderer.columns, 1)
    return orjson.loads(checked.renderer.render_chunk(chunk).requests[0].body)


def test_anthropic_gets_a_breakpoint_only_for_a_long_static_system(make_job):
    long_body = _anthropic_body(make_job, LONG)
    assert long_body["system"] == [{"type": "text", "text": LONG, "cache_control": {"type": "ephemeral"}}]
    assert _anthropic_body(make_job, "Label the review.")["system"] == "Label the review."
    templated = _anthropic_body(make_job, LONG + " About {{ product }}.")
    assert isinstance(templated["system"], str)  # a system prompt that varies by row is no shared prefix


def test_anthropic_cache_writes_then_reads_each_at_its_rate(make_job, sim):
    with sim() as s:
        job = Job.load(make_job(rows=6, request=_request(LONG, "claude-sonnet-4-5"),
                                extra=f'[api]\nprovider = "anthropic"\nbase_url = "{s.base_url}"\n'
                                      "[estimate]\noutput_tokens = 12"))
        est = estimate(job)
        assert est.expected_cached_tokens > 0 and est.expected_cache_write_tokens > 0
        run(job)
    out = pl.read_parquet(job.output.path).sort("cache_write_tokens", descending=True)
    writes, reads = out["cache_write_tokens"].to_list(), out["cached_tokens"].to_list()
    assert writes[0] > 0 and writes[1:] == [0] * 5 and reads[0] == 0 and reads[1:] == [writes[0]] * 5
    price = price_for(job)
    assert price is not None and price.cache_write is not None
    for r in out.iter_rows(named=True):
        usage = Usage(r["prompt_tokens"], r["completion_tokens"], cached_tokens=r["cached_tokens"],
                      cache_write_tokens=r["cache_write_tokens"])
        assert r["cost_usd"] == pytest.approx(price.cost(usage))
    assert build_report(job.output.path)["cache_saved_usd"] > 0


def test_rows_sharing_a_templated_prefix_are_sent_together(make_job):
    job = Job.load(make_job(rows=12, request=_request("You review {{ product }} products. " + LONG)))
    checked = check(job)
    chunk = read_head(checked.source, checked.renderer.columns, 12)
    requests = checked.renderer.render_chunk(chunk).requests
    products = [orjson.loads(r.body)["messages"][0]["content"].split()[2] for r in requests]
    assert products == sorted(products)  # grouped (the input interleaves lamp, kettle, tent)
    assert sorted(r.row for r in requests) == list(range(12))  # every row, each once
