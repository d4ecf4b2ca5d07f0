import numpy as np
import polars as pl
import pytest

from pipeline.job import Job
from pipeline.run import run
from pipeline.sim.answers import embedding
from pipeline.tokens import get_encoding
from tests.conftest import reviews, run_cli


def _job(make_job, extra_request="", **kw):
    request = ('endpoint = "embeddings"\nmodel = "text-embedding-3-small"\ninput = "{{ text }}"\n'
               + extra_request)
    return make_job(request=request, **kw)


def test_ten_thousand_rows_in_order_with_the_right_dimension_and_batched(make_job, sim):
    job = _job(make_job, 'dimensions = 64\nbatch_size = 1000', rows=10_000)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        requests = s.stats.requests
    assert result.exit_code == 0
    assert requests == 10  # 10,000 rows in batches of 1,000
    out = pl.read_parquet(Job.load(job).output.path)
    assert out.schema["embedding"] == pl.Array(pl.Float32, 64)
    assert out["review_id"].to_list() == [f"r{i:04d}" for i in range(10_000)]
    texts = reviews(10_000)["text"].to_list()
    for i in (0, 4321, 9999):  # each row got the vector of its own text
        np.testing.assert_allclose(out["embedding"][i].to_numpy(), embedding(texts[i], 64), rtol=1e-6)


def test_usage_and_cost_are_split_by_token_counts(make_job, sim):
    job = _job(make_job, 'batch_size = 7', rows=20)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    out = pl.read_parquet(Job.load(job).output.path)
    enc = get_encoding("cl100k_base")
    expected = [len(enc.encode_ordinary(t)) for t in reviews(20)["text"]]
    assert out["prompt_tokens"].to_list() == expected  # the simulator bills exactly our counts
    assert out["cost_usd"].sum() == pytest.approx(sum(expected) * 0.02 / 1e6)
    assert out.schema["embedding"] == pl.Array(pl.Float32, 1536)


def test_a_row_too_long_fails_alone(make_job, sim):
    df = reviews(10).with_columns(pl.when(pl.col("review_id") == "r0004").then(pl.lit("word " * 9000))
                                  .otherwise(pl.col("text")).alias("text"))
    job = _job(make_job, data=df)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 1 and s.stats.statuses[400] == 0
    out = pl.read_parquet(Job.load(job).output.path)
    bad = out.filter(pl.col("status") == "error")
    assert bad["review_id"].to_list() == ["r0004"] and bad["error_type"].to_list() == ["input_too_long"]
    assert bad["embedding"].to_list() == [None]
    assert result.stats.ok == 9


def test_a_batch_refused_by_the_server_is_split_to_find_the_bad_row(make_job, sim):
    # Our limit is larger than the server's: the server refuses the whole batch, we bisect to the culprit.
    df = reviews(8).with_columns(pl.when(pl.col("review_id") == "r0005").then(pl.lit("word " * 9000))
                                 .otherwise(pl.col("text")).alias("text"))
    job = _job(make_job, "max_input_tokens = 20000", data=df)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
    out = pl.read_parquet(Job.load(job).output.path)
    assert out.filter(pl.col("status") == "error")["review_id"].to_list() == ["r0005"]
    assert result.stats.ok == 7


def test_float_encoding_and_resume(make_job, sim):
    job = _job(make_job, 'encoding_format = "float"\ndimensions = 8', rows=30)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        first = pl.read_parquet(Job.load(job).output.path)
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 1 and again.stats.resumed == 30
    assert pl.read_parquet(Job.load(job).output.path)["embedding"].to_list() == first["embedding"].to_list()


def test_chat_only_keys_are_refused_for_embeddings(make_job):
    result = run_cli("validate", _job(make_job, "max_tokens = 5").name)
    assert result.exit_code == 2
    assert result.output.strip() == ('error: job.toml: [request].max_tokens does not apply to endpoint = '
                                     '"embeddings" (its template is [request].input)')


def test_the_example_embedding_job_validates():
    from pathlib import Path

    job = Job.load(Path(__file__).parent.parent / "jobs" / "embed.toml")
    assert job.request.is_embeddings and job.request.dimensions == 256
