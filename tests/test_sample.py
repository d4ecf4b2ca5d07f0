import math

import polars as pl

from pipeline.job import Job
from pipeline.measured import measured_output, sample_paths
from pipeline.planning import estimate
from pipeline.run import run
from pipeline.sample import run_sample
from tests.conftest import run_cli

REQUEST = 'model = "gpt-4o-mini"\nsystem = "Summarise."\nprompt = "{{ text }}"\nmax_tokens = 80'


def test_sample_sends_n_requests_and_the_full_run_only_the_rest(make_job, sim):
    job = Job.load(make_job(rows=100, request=REQUEST))
    with sim() as s:
        result = run_sample(job, 20, seed=7, base_url=s.base_url)
        assert s.stats.requests == 20 and result.sent == 20
        full = run(job, base_url=s.base_url)
        assert s.stats.requests == 100  # the 80 others, none of the sample again
    assert full.stats.resumed == 20 and full.stats.requests_sent == 80
    picked = result.rows["review_id"].to_list()
    assert len(set(picked)) == 20 and picked == sorted(picked)
    assert pl.read_parquet(sample_paths(job).output).height == 20


def test_the_seed_picks_the_rows(make_job, sim):
    with sim() as s:
        a = run_sample(Job.load(make_job(rows=50, request=REQUEST, output='path = "out/a.parquet"')), 5, seed=1,
                       base_url=s.base_url)
        b = run_sample(Job.load(make_job(rows=50, request=REQUEST, output='path = "out/b.parquet"')), 5, seed=1,
                       base_url=s.base_url)
        c = run_sample(Job.load(make_job(rows=50, request=REQUEST, output='path = "out/c.parquet"')), 5, seed=2,
                       base_url=s.base_url)
    assert a.rows["review_id"].to_list() == b.rows["review_id"].to_list() != c.rows["review_id"].to_list()


def test_a_second_sample_picks_among_the_rows_still_to_do(make_job, sim):
    job = Job.load(make_job(rows=30, request=REQUEST))
    with sim() as s:
        first = run_sample(job, 10, seed=0, base_url=s.base_url)
        second = run_sample(job, 10, seed=0, base_url=s.base_url)
        assert s.stats.requests == 20
    assert not set(first.rows["review_id"]) & set(second.rows["review_id"])


def test_projection_and_estimate_use_the_measured_output_tokens(make_job, sim):
    job = Job.load(make_job(rows=60, request=REQUEST))
    before = estimate(job)
    assert before.expected_output_tokens is None  # nothing to go on: only the max_tokens bound
    with sim() as s:
        result = run_sample(job, 12, seed=3, base_url=s.base_url)
    out = pl.read_parquet(sample_paths(job).output)
    mean = out["completion_tokens"].mean()
    m = result.measured
    assert m is not None and m.requests == 12 and math.isclose(m.output_tokens_mean, mean)
    p = result.projection
    assert p is not None and p.requests_left == 60 - 12
    assert math.isclose(p.output_tokens[1], 48 * mean)
    assert p.output_tokens[0] <= p.output_tokens[1] <= p.output_tokens[2] <= 48 * 80
    assert p.cost_usd is not None and p.cost_usd[0] <= p.cost_usd[1] <= p.cost_usd[2]
    assert measured_output(job) == m
    after = estimate(job)  # the rows of the sample are still counted (an estimate looks at the whole job)
    assert after.expected_output_tokens == math.ceil(mean) * after.requests
    assert "measured by `--sample` on 12 request(s)" in str(after.expected_output_basis)
    assert after.cost_usd_expected is not None and after.cost_usd_expected < after.cost_usd_max


def test_the_jobs_own_output_figure_wins_over_a_sample(make_job, sim):
    job = Job.load(make_job(rows=20, request=REQUEST, extra="[estimate]\noutput_tokens = 33"))
    with sim() as s:
        run_sample(job, 5, base_url=s.base_url)
    est = estimate(job)
    assert est.expected_output_tokens == 33 * est.requests and est.expected_output_basis == "[estimate].output_tokens"


def test_cli_sample_prints_rows_and_the_projection(make_job, sim):
    job = make_job(rows=40, request=REQUEST)
    with sim() as s:
        result = run_cli("run", job, "--sample", "4", "--seed", "9", "--base-url", s.base_url)
        assert s.stats.requests == 4
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "sample of 4 row(s), seed 9" in text and "[ok, " in text and "-> In short:" in text
    assert "projection of the full run (36 request(s) left)" in text and "95%" in text
    assert run_cli("run", job, "--sample", "4", "--fresh").exit_code == 2
