import math
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert job.request.endpoint == "embeddings" and job.request.embedding is not None
    assert job.request.embedding.dimensions == 256


def _repeated(rows: int, distinct: int) -> pl.DataFrame:
    """Rows whose texts repeat every ``distinct`` rows: duplicates land in later chunks than their originals."""
    texts = reviews(distinct)["text"].to_list()
    return reviews(rows).with_columns(pl.Series("text", [texts[i % distinct] for i in range(rows)]))


def _check_vectors(out: pl.DataFrame, df: pl.DataFrame, dims: int) -> None:
    assert out["review_id"].to_list() == df["review_id"].to_list()
    assert out["status"].unique().to_list() == ["ok"]
    got = out["embedding"].to_numpy()
    want = np.stack([embedding(t, dims) for t in df["text"]])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_duplicates_across_chunks_are_paid_once_and_a_rerun_resumes_every_row(make_job, sim):
    rows, distinct, dims = 5_000, 1_700, 16  # the run reads 2,000-row chunks
    df = _repeated(rows, distinct)
    job = _job(make_job, f"dimensions = {dims}\nbatch_size = 100", data=df)
    enc = get_encoding("cl100k_base")
    tokens = sum(len(enc.encode_ordinary(t)) for t in df["text"][:distinct])
    with sim() as s:
        first = run(Job.load(job), base_url=s.base_url, limit=1_000)
        second = run(Job.load(job), base_url=s.base_url)
        sent = s.stats.requests
        third = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == sent  # everything answered: nothing sent
    assert first.stats.prompt_tokens and second.stats.prompt_tokens  # both runs sent rows
    assert first.stats.prompt_tokens + second.stats.prompt_tokens == tokens  # each distinct text paid once
    out = pl.read_parquet(Job.load(job).output.path)
    _check_vectors(out, df, dims)
    assert out["deduplicated"].sum() == rows - distinct
    assert out.filter(pl.col("deduplicated"))["cost_usd"].sum() == 0
    assert out["cost_usd"].sum() == pytest.approx(tokens * 0.02 / 1e6)
    assert third.stats.resumed == distinct and third.stats.deduplicated == rows - distinct
    assert pl.read_parquet(Job.load(job).output.path).equals(out)


def test_sigkill_during_a_batched_embeddings_run_then_rerun_loses_nothing_and_pays_once(make_job, sim):
    rows, batch, concurrency, dims = 12_000, 200, 4, 16
    df = _repeated(rows, 9_000)
    job = _job(make_job, f"dimensions = {dims}\nbatch_size = {batch}", data=df,
               limits=f"concurrency = {concurrency}")
    pipeline = str(Path(sys.executable).parent / "pipeline")
    kills = 0
    with sim(latency_ms=20) as s:
        for after in (5, 20, 35):
            proc = subprocess.Popen([pipeline, "run", job.name, "--base-url", s.base_url, "--plain", "--yes"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while s.stats.ok < after and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        final = subprocess.run([pipeline, "run", job.name, "--base-url", s.base_url, "--plain", "--yes"],
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        answered = s.stats.ok
    assert kills == 3
    _check_vectors(pl.read_parquet(Job.load(job).output.path), df, dims)
    # Full batches of the 9,000 distinct texts, plus at most what was in flight (and one short batch) per kill.
    assert answered <= math.ceil(9_000 / batch) + kills * (concurrency + 1)


def test_a_model_of_unknown_size_gets_a_list_column_with_duplicates_and_refused_rows(make_job, sim):
    # A model outside the known sizes (an OpenAI-compatible server's own) and no `dimensions`: the vector size is
    # only known from the answers. Blocks, duplicate rows and a refused empty row share one output; this used to
    # end in a TypeError while the output was written, so not even a rerun could finish it.
    texts = [f"text {i % 30}" for i in range(120)] + [""]
    df = pl.DataFrame({"review_id": [f"r{i:04d}" for i in range(len(texts))], "product": ["p"] * len(texts),
                       "text": texts})
    job = make_job(data=df, request='endpoint = "embeddings"\nmodel = "nomic-embed-text"\ninput = "{{ text }}"\n'
                                    'batch_size = 16')
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
    assert result.exit_code == 1 and result.stats.ok == 120 and result.stats.failed == 1
    out = pl.read_parquet(Job.load(job).output.path)
    assert out.schema["embedding"] == pl.List(pl.Float32) and out.height == 121
    assert out["deduplicated"].sum() == 90
    failed = out.filter(pl.col("status") == "error")
    assert failed["review_id"].to_list() == ["r0120"] and failed["error_type"].to_list() == ["empty_input"]
    assert out["embedding"][120] is None
    for i in (0, 30, 119):  # duplicates carry their first row's vector
        np.testing.assert_allclose(out["embedding"][i].to_numpy(), embedding(texts[i], 1536), rtol=1e-6)
