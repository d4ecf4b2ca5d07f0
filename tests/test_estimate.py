import json
import sys

import polars as pl
import pytest

from pipeline.job import Job
from pipeline.planning import estimate
from pipeline.tokens import ChatTokenCounter
from tests.conftest import reviews, run_cli


def _expected_prompt_tokens(df, system="Summarise in one sentence."):
    c = ChatTokenCounter("gpt-4o-mini")
    return [c.count_messages([{"role": "system", "content": system},
                              {"role": "user", "content": f"Review of {p}: {t}"}])
            for p, t in zip(df["product"], df["text"], strict=True)]


def test_estimate_counts_tokens_cost_and_duration(make_job):
    df = reviews(40)
    job = Job.load(make_job(data=df, limits="requests_per_minute = 20\ntokens_per_minute = 1000000",
                            extra="[estimate]\noutput_tokens = 10"))
    est = estimate(job)
    prompts = _expected_prompt_tokens(df)
    assert est.rows == 40 and est.requests == 40 and est.duplicate_rows == 0
    assert est.prompt_tokens == sum(prompts)
    assert est.max_output_tokens == 40 * 50
    assert est.expected_output_tokens == 400
    assert est.cost_usd_max == pytest.approx((sum(prompts) * 0.15 + 2000 * 0.6) / 1e6)
    assert est.cost_usd_expected == pytest.approx((sum(prompts) * 0.15 + 400 * 0.6) / 1e6)
    assert est.batch_cost_usd_max == pytest.approx(est.cost_usd_max / 2)
    assert est.binding_limit == "requests_per_minute"
    assert est.duration_s == pytest.approx(40 / 20 * 60)


def test_tokens_per_minute_can_bind(make_job):
    est = estimate(Job.load(make_job(limits="requests_per_minute = 10000\ntokens_per_minute = 1000")))
    assert est.binding_limit == "tokens_per_minute"
    assert est.duration_s == pytest.approx((est.prompt_tokens + est.max_output_tokens) / 1000 * 60)


def test_identical_rows_are_counted_once(make_job):
    df = pl.concat([reviews(5)] * 3).with_columns(pl.Series("review_id", [f"x{i}" for i in range(15)]))
    est = estimate(Job.load(make_job(data=df)))
    assert est.rows == 15 and est.requests == 5 and est.duplicate_rows == 10


def test_rows_over_context_window_are_listed(make_job):
    df = reviews(5).with_columns(pl.when(pl.col("rating") == 3).then(pl.lit("word " * 400))
                                 .otherwise(pl.col("text")).alias("text"))
    est = estimate(Job.load(make_job(data=df, extra="[pricing]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n"
                                                     "context_window = 300")))
    assert est.over_context_rows == 1 and est.over_context_ids == ["r0002"]


def test_unknown_model_warns_and_has_no_cost(make_job):
    est = estimate(Job.load(make_job(request='model = "local-llama"\nprompt = "{{ text }}"')))
    assert est.cost_usd_max is None and est.price is None
    assert "no price known for model 'local-llama'" in est.warnings[0]


def test_cli_json_and_table(make_job):
    job = make_job()
    result = run_cli("estimate", job.name, "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["rows"] == 20 and data["price"]["source"].startswith("genai-prices")
    table = run_cli("estimate", job.name)
    assert table.exit_code == 0
    assert "cost at Batch API price" in table.output and "prompt tokens (exact)" in table.output


@pytest.mark.parametrize("provider", ["", '[api]\nprovider = "anthropic"'])
def test_counting_in_a_process_of_its_own_gives_the_same_estimate(make_job, monkeypatch, provider):
    """Past COUNT_ELSEWHERE_TEXTS the counting moves to a child process, one chunk behind the rendering; the
    estimate must not change by a token, duplicates across the overlapped chunks included."""
    estimate_module = sys.modules["pipeline.planning"]  # where the counting process is started
    from pipeline.source import DEFAULT_CHUNK_ROWS

    rows = 2 * DEFAULT_CHUNK_ROWS + 700
    df = reviews(rows).with_columns(  # every third row repeats a row of the chunk before it
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.col("text").shift(DEFAULT_CHUNK_ROWS // 2))
        .otherwise(pl.col("text")).fill_null("x").alias("text"),
        pl.lit("lamp").alias("product"))
    model = 'model = "claude-haiku-4-5"\n' if provider else 'model = "gpt-4o-mini"\n'
    job = Job.load(make_job(data=df, extra=provider, request=model + 'system = "S."\nprompt = "{{ product }}: '
                            '{{ text }}"\nmax_tokens = 50'))
    here = estimate(job)
    started = []
    real = estimate_module.CountingProcess

    def process(name):
        started.append(name)
        return real(name)

    monkeypatch.setattr(estimate_module, "CountingProcess", process)
    monkeypatch.setattr(estimate_module, "COUNT_ELSEWHERE_TEXTS", 1)
    elsewhere = estimate(job)
    assert started == ["cl100k_base" if provider else "o200k_base"]
    assert elsewhere.to_dict() == here.to_dict()
    assert here.duplicate_rows > 0 and here.rows == rows


def test_a_counting_process_that_dies_is_replaced_by_counting_here(make_job, monkeypatch):
    estimate_module = sys.modules["pipeline.planning"]  # where the counting process is started
    from pipeline.source import DEFAULT_CHUNK_ROWS

    job = Job.load(make_job(rows=3 * DEFAULT_CHUNK_ROWS))
    here = estimate(job)
    real = estimate_module.CountingProcess

    def dying(name):
        proc = real(name)
        proc._proc.kill()
        return proc

    monkeypatch.setattr(estimate_module, "CountingProcess", dying)
    monkeypatch.setattr(estimate_module, "COUNT_ELSEWHERE_TEXTS", 1)
    assert estimate(job).to_dict() == here.to_dict()


def test_rows_with_nothing_to_count_do_not_start_the_counting_process(make_job, monkeypatch):
    """What starts the process is texts to count, not rows read: a resume's answered rows, like these repeats
    of one row, count nothing and must not pay for a process."""
    estimate_module = sys.modules["pipeline.planning"]
    from pipeline.source import DEFAULT_CHUNK_ROWS

    df = pl.concat([reviews(1)] * (3 * DEFAULT_CHUNK_ROWS))
    job = Job.load(make_job(data=df))
    started = []
    monkeypatch.setattr(estimate_module, "CountingProcess", lambda name: started.append(name))
    monkeypatch.setattr(estimate_module, "COUNT_ELSEWHERE_TEXTS", 2)
    est = estimate(job)
    assert est.rows == 3 * DEFAULT_CHUNK_ROWS and est.requests == 1
    assert started == []


def test_validate_and_estimate_name_the_largest_requests_and_their_share(make_job):
    import polars as pl

    from tests.conftest import run_cli

    df = pl.DataFrame({"review_id": ["a", "b", "c", "d"], "product": ["x"] * 4,
                       "text": ["short", "word " * 3000, "a bit longer text", "tiny"]})
    job = make_job(data=df)
    result = run_cli("validate", job.name)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("largest requests"))
    assert "row b: 3,0" in line and "(98%)" in line and line.index("row b") < line.index("row c")
    assert "largest requests" in run_cli("estimate", job.name).output
