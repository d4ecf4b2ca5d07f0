"""``pipeline show``: output rows beside the input columns the prompt read."""

import polars as pl

from pipeline.job import Job
from pipeline.run import run
from tests.conftest import reviews, run_cli


def test_show_prints_the_inputs_the_prompt_read_beside_the_answers(make_job, sim):
    failing = pl.col("review_id") == "r0003"
    df = reviews(6).with_columns(pl.when(failing).then(pl.lit("SIM_400 bad")).otherwise(pl.col("text")).alias("text"))
    job = make_job(data=df)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    result = run_cli("show", "out/result.parquet", "--rows", "2")
    assert result.exit_code == 0, result.output
    assert "2 of 6 row(s)" in result.output
    for column in ("review_id", "product", "text", "content", "status"):
        assert column in result.output
    assert "Review number 0" in result.output  # an input cell, joined back from the input by id
    failed = run_cli("show", "out/result.parquet", "--where", "status != 'ok'")
    assert "1 of 1 row(s)" in failed.output and "r0003" in failed.output and "error" in failed.output
    bad = run_cli("show", "out/result.parquet", "--where", "no_such_column = 1")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
