"""Integration: real runs against the simulator on 127.0.0.1."""

import json
import time

import polars as pl
import pytest

from pipeline.errors import AbortError, OutputError, UsageError
from pipeline.job import Job
from pipeline.pricing import Usage, lookup_price
from pipeline.providers.registry import DESCRIPTORS
from pipeline.run import run
from tests.conftest import SECRET, reviews, run_cli

OPENAI = DESCRIPTORS["openai"].price_ids  # genai-prices' ids of OpenAI's models


def _out(job_path) -> pl.DataFrame:
    return pl.read_parquet(Job.load(job_path).output.path)


def test_every_row_once_with_injected_faults(make_job, sim):
    job = make_job(rows=300, limits="concurrency = 16\nmax_attempts = 8")
    with sim(error_rate=0.1, rate_429=0.05, drop_rate=0.05, malformed_rate=0.03, seed=3) as s:
        result = run(Job.load(job), base_url=s.base_url)
        stats = s.stats
    assert result.stopped is None and result.exit_code == 0
    df = _out(job)
    assert df.height == 300
    assert df["review_id"].to_list() == [f"r{i:04d}" for i in range(300)]  # input order, each row once
    assert df["status"].unique().to_list() == ["ok"]
    assert sum(stats.injected.values()) > 30  # the faults really happened...
    assert result.stats.retries >= sum(stats.injected.values()) - 5  # ...and were retried
    assert stats.duplicate_ok == 0  # no answered request was paid for twice
    assert df["attempts"].max() > 1
    assert df["content"].str.starts_with("In short: Review of ").all()


def test_output_columns_and_types(make_job, sim):
    job = make_job(rows=5)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    df = _out(job)
    assert df.schema == pl.Schema({
        "review_id": pl.String, "product": pl.String, "status": pl.String, "content": pl.String,
        "finish_reason": pl.String, "refusal": pl.String, "prompt_tokens": pl.Int64, "cached_tokens": pl.Int64,
        "completion_tokens": pl.Int64, "reasoning_tokens": pl.Int64, "cache_write_tokens": pl.Int64,
        "usage_estimated": pl.Boolean, "cost_usd": pl.Float64,
        "latency_ms": pl.Float64, "attempts": pl.Int32, "error": pl.String, "error_type": pl.String,
        "model": pl.String, "deduplicated": pl.Boolean})
    assert df["product"].to_list() == reviews(5)["product"].to_list()
    assert df["finish_reason"].to_list() == ["stop"] * 5 and df["model"].to_list() == ["gpt-4o-mini"] * 5


def test_costs_equal_tokens_times_price(make_job, sim):
    job = make_job(rows=20)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
    df = _out(job)
    price = lookup_price("gpt-4o-mini", price_ids=OPENAI)
    assert price is not None
    for p, c, cost in df.select("prompt_tokens", "completion_tokens", "cost_usd").iter_rows():
        assert cost == pytest.approx((p * 0.15 + c * 0.6) / 1e6)
        assert cost == pytest.approx(price.cost(Usage(p, c)))
    assert result.stats.cost_usd == pytest.approx(df["cost_usd"].sum())
    manifest = json.loads(result.manifest.read_text())
    assert manifest["totals"]["cost_usd_this_run"] == pytest.approx(df["cost_usd"].sum())
    assert manifest["price"]["source"].startswith("genai-prices")
    # the estimate's exact prompt tokens are what the server billed
    assert manifest["estimate"]["prompt_tokens"] == df["prompt_tokens"].sum()


def test_bad_request_fails_only_its_row(make_job, sim):
    df = reviews(10).with_columns(pl.when(pl.col("review_id") == "r0004").then(pl.lit("SIM_400 please"))
                                  .otherwise(pl.col("text")).alias("text"))
    job = make_job(data=df)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.statuses[400] == 1  # not retried
    out = _out(job)
    assert result.exit_code == 1 and result.stats.failed == 1
    bad = out.filter(pl.col("status") == "error")
    assert bad["review_id"].to_list() == ["r0004"]
    assert bad["error_type"].to_list() == ["http_400"]
    assert bad["error"][0].startswith("HTTP 400: Invalid request")
    assert out.filter(pl.col("status") == "ok").height == 9


def test_wrong_key_aborts_quickly(make_job, sim, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-123456789")
    job = make_job(rows=500)
    with sim(api_key=SECRET) as s:
        t = time.monotonic()
        result = run(Job.load(job), base_url=s.base_url)
        elapsed = time.monotonic() - t
        sent = s.stats.requests
    assert isinstance(result.stopped, AbortError) and result.exit_code == 3
    assert result.stopped.kind == "auth"
    assert sent <= 64 + 1  # at most the requests already in flight, not 500
    assert elapsed < 30
    assert "sk-wrong-key" not in str(result.stopped)


def test_unknown_model_aborts(make_job, sim):
    job = make_job(rows=50)
    with sim(models=("gpt-4o",)) as s:
        result = run(Job.load(job), base_url=s.base_url)
    assert isinstance(result.stopped, AbortError) and result.stopped.kind == "model_not_found"


def test_insufficient_quota_aborts(make_job, sim):
    with sim(insufficient_quota=True) as s:
        result = run(Job.load(make_job(rows=50)), base_url=s.base_url)
        assert s.stats.requests <= 65
    assert isinstance(result.stopped, AbortError) and result.stopped.kind == "insufficient_quota"


def test_limits_are_respected_when_they_match_the_server(make_job, sim):
    # 1,200 RPM = 20 requests/s; 100 rows take ~4 s after the first second's burst.
    job = make_job(rows=100, limits="concurrency = 50\nrequests_per_minute = 1200\ntokens_per_minute = 200000")
    with sim(rpm=1200, tpm=200_000) as s:
        t = time.monotonic()
        result = run(Job.load(job), base_url=s.base_url)
        elapsed = time.monotonic() - t
        assert s.stats.rate_limited == 0
    assert result.stats.ok == 100
    assert elapsed >= (100 - 20) / 20 * 0.9  # the client really paced itself


def test_server_limits_are_honoured_when_the_job_does_not_know_them(make_job, sim):
    # No limits in the job: the server's 429s and headers must still bring every row home.
    # The server's bucket holds 120 requests and refills 2/s: 130 rows cannot all go at once.
    job = make_job(rows=130, limits="concurrency = 30")
    with sim(rpm=120) as s:
        result = run(Job.load(job), base_url=s.base_url)
        limited = s.stats.rate_limited
    assert result.stats.ok == 130 and result.exit_code == 0
    assert result.stats.rate_limited == limited
    assert limited < 60  # a 429 pauses every worker, instead of each hammering on


def test_timeouts_are_retried(make_job, sim):
    job = make_job(rows=20, limits="timeout_s = 0.25\nmax_attempts = 10")
    with sim(slow_body_rate=0.15, slow_body_ms=600, seed=1) as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.injected["slow_body"] > 0
    assert result.stats.ok == 20
    assert result.stats.retries >= 1


def test_transient_failures_that_outlast_retries_fail_the_row_and_a_rerun_retries_them(make_job, sim):
    job = make_job(rows=10, limits="max_attempts = 1")
    with sim(error_rate=0.5, seed=5) as s:
        first = run(Job.load(job), base_url=s.base_url)
    assert first.stats.failed > 0 and first.exit_code == 1
    assert set(_out(job).filter(pl.col("status") == "error")["error_type"]) == {"server_error"}
    with sim() as s:
        second = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == first.stats.failed  # only the failed rows were sent again
    assert second.stats.ok == 10 and second.stats.resumed == 10 - first.stats.failed


def test_rerun_sends_nothing_and_rebuilds_the_same_output(make_job, sim):
    job = make_job(rows=30)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    before = _out(job)
    with sim() as s:
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 0
    assert again.stats.resumed == 30
    assert _out(job).equals(before)


def test_identical_rows_are_sent_once(make_job, sim):
    df = pl.concat([reviews(4)] * 5).with_columns(pl.Series("review_id", [f"x{i}" for i in range(20)]))
    job = make_job(data=df)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 4
    out = _out(job)
    assert out.height == 20 and result.stats.deduplicated == 16
    assert out["deduplicated"].sum() == 16
    assert out.filter(pl.col("deduplicated"))["cost_usd"].sum() == 0
    first = out.filter(~pl.col("deduplicated"))
    assert first["review_id"].to_list() == ["x0", "x1", "x2", "x3"]  # the first of each carries the cost
    assert out["content"].n_unique() == 4


def test_another_jobs_output_is_not_overwritten(make_job, sim, tmp_path):
    job = make_job(rows=3)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    other = make_job(rows=3, name="other")
    with pytest.raises(OutputError, match="belongs to job 't', not 'other'"):
        run(Job.load(other), base_url="http://127.0.0.1:9/v1")


def test_missing_key_for_a_remote_server_is_a_usage_error(make_job):
    with pytest.raises(UsageError, match=r"the environment variable OPENAI_API_KEY \(named by \[api\]\.api_key_env\) "
                                         r"is not set"):
        run(Job.load(make_job()), base_url="https://api.example.invalid/v1")


def test_key_over_plain_http_to_remote_host_is_refused(make_job, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with pytest.raises(UsageError, match="refusing to send the API key over plain http://"):
        run(Job.load(make_job()), base_url="http://10.1.2.3:8000/v1")


def test_dead_server_stops_the_run_early_with_one_message_naming_the_address(make_job):
    from pipeline.sim.server import free_port

    job = make_job(rows=30, limits="max_attempts = 2")
    port = free_port()
    result = run(Job.load(job), base_url=f"http://127.0.0.1:{port}/v1")
    assert result.exit_code == 3 and result.stopped.kind == "unreachable"
    assert f"127.0.0.1:{port}" in str(result.stopped) and "check [api].base_url" in str(result.stopped)
    assert result.stats.requests_sent <= 6  # a few first requests, not 30 rows x 2 attempts


def test_key_never_leaks_into_output_manifest_journal_or_logs(make_job, sim, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    df = reviews(6).with_columns(pl.when(pl.col("review_id") == "r0001").then(pl.lit("SIM_400"))
                                 .otherwise(pl.col("text")).alias("text"))
    job = make_job(data=df)
    with sim(api_key=SECRET, error_rate=0.2) as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--plain", "--yes")
    assert result.exit_code == 1, result.output
    for f in (tmp_path / "out").iterdir():
        assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in result.output
    # and a wrong key is not echoed back either
    monkeypatch.setenv("OPENAI_API_KEY", "sk-other-key-that-is-wrong")
    with sim(api_key=SECRET) as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--plain", "--yes", "--fresh")
    assert result.exit_code == 3
    assert "sk-other" not in result.output and SECRET not in result.output


def test_python_api_runs_a_dataframe_and_returns_one(make_job, sim):
    job = Job.load(make_job(rows=2))
    df = reviews(7).with_columns(pl.col("text").str.to_uppercase())
    with sim() as s:
        result = run(job, base_url=s.base_url, data=df)
    out = result.frame()
    assert out.height == 7 and out["review_id"].to_list() == df["review_id"].to_list()
    assert out["content"].str.contains("REVIEW NUMBER").all()


def _count_renders(monkeypatch):
    from pipeline.render import Renderer

    rendered: list[int] = []
    real = Renderer.prepare_chunk  # render_chunk's first half, and what the estimate calls

    def counting(self, chunk, *args, **kwargs):
        rendered.append(chunk.height)
        return real(self, chunk, *args, **kwargs)

    monkeypatch.setattr(Renderer, "prepare_chunk", counting)
    return rendered


def test_a_fresh_run_sends_what_the_estimate_rendered_without_rendering_again(make_job, sim, monkeypatch):
    rendered = _count_renders(monkeypatch)
    job = make_job(rows=300)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 300
    assert sum(rendered) == 1 + 300  # the row prints' probe row, then every row once, by the estimate
    out = pl.read_parquet(Job.load(job).output.path)
    assert out["review_id"].to_list() == reviews(300)["review_id"].to_list() and result.stats.ok == 300


def test_past_the_keep_budget_or_on_a_resume_the_run_renders_again(make_job, sim, monkeypatch):
    import pipeline.render

    rendered = _count_renders(monkeypatch)
    job = make_job(rows=300)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url, limit=100)
        assert sum(rendered) == 1 + 100  # the probe row of the row prints, then the estimate
        rendered.clear()
        run(Job.load(job), base_url=s.base_url)  # 100 rows answered before (known by their print)
        assert sum(rendered) == 1 + 200 + 300
        rendered.clear()
        monkeypatch.setattr(pipeline.render, "KEEP_BYTES", 10_000)  # a few dozen requests
        run(Job.load(job), base_url=s.base_url, fresh=True)
        assert sum(rendered) == 1 + 300 + 300
        assert s.stats.requests == 300 + 300
    assert pl.read_parquet(Job.load(job).output.path)["status"].to_list() == ["ok"] * 300


@pytest.mark.parametrize("binding", ["rpm", "tpm"])
def test_a_token_bucket_server_starting_empty_draws_only_the_first_waves_429s(make_job, sim, binding):
    # RPM 1,200 (20/s) or TPM 120,000 (~20 requests/s here), a bucket of a minute, drained at the start.
    rpm, tpm = (1200, 100_000_000) if binding == "rpm" else (100_000, 120_000)
    job = make_job(rows=200, limits=f"concurrency = 32\nrequests_per_minute = {rpm}\ntokens_per_minute = {tpm}")
    with sim(rpm=rpm, tpm=tpm, limit_model="token-bucket", start_empty=True, latency_ms=50, tpm_count="chars") as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert result.exit_code == 0 and result.stats.ok == 200
        # before the first answer only the breaker's first wave (4) is under way: those may find it empty;
        # after that the server's own remaining paces every request
        assert s.stats.rate_limited <= 4, s.stats.rate_limited
