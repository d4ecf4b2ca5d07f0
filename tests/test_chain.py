"""Chained jobs: ``[input].from_job`` reads another job's output once that run completed; ``--with-deps`` runs the
steps not yet complete first; the estimate of the last lists what the steps before it will cost."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import JobError, UsageError
from pipeline.job import Job
from pipeline.run import run
from tests.conftest import reviews, run_cli


def chain(tmp_path: Path, base_url: str) -> tuple[Path, Path]:
    reviews(30).write_parquet(tmp_path / "reviews.parquet")
    first = tmp_path / "summaries.toml"
    first.write_text(textwrap.dedent(f'''\
        name = "summaries"
        [input]
        path = "reviews.parquet"
        id = "review_id"
        keep = ["product"]
        [request]
        model = "gpt-4o-mini"
        prompt = "One line on {{{{ text }}}}"
        max_tokens = 20
        [output]
        path = "out/summaries.parquet"
        [api]
        base_url = "{base_url}"
        '''))
    second = tmp_path / "themes.toml"
    second.write_text(textwrap.dedent(f'''\
        name = "themes"
        [input]
        from_job = "summaries.toml"
        [output]
        path = "out/themes.parquet"
        [api]
        base_url = "{base_url}"
        [reduce]
        model = "gpt-4o-mini"
        group_by = ["product"]
        items = ["content"]
        prompt = """Themes of {{{{ group.product }}}}:
        {{% for item in items %}}- {{{{ item.content }}}}
        {{% endfor %}}"""
        max_tokens = 30
        max_items_tokens = 3000
        '''))
    return first, second


def test_a_job_reads_another_jobs_output_only_once_that_run_completed(sim, tmp_path):
    with sim() as s:
        _first, second = chain(tmp_path, s.base_url)
        job = Job.load(second)
        assert job.input.path == str(tmp_path / "out/summaries.parquet")
        with pytest.raises(UsageError, match="has not completed a run yet"):
            run(job)
        est = run_cli("estimate", second)
        assert est.exit_code == 0 and "the chain's 2 steps: up to" in est.output
        planned = json.loads(run_cli("estimate", second, "--json").output)
        assert [step["input_stood_in"] for step in planned["steps"]] == [False, True]
        map_est, reduce_est = (step["estimate"] for step in planned["steps"])
        assert map_est["requests"] == 30 and reduce_est["chain"]["requests"] == 3  # one fold per product
        assert s.stats.requests == 0
        done = run_cli("run", second, "--with-deps", "--yes", "--plain")
        assert done.exit_code == 0, done.output
        assert s.stats.requests == 30 + 3  # the summaries, then one fold per product
        again = run_cli("run", second, "--with-deps", "--yes", "--plain")
        assert again.exit_code == 0 and s.stats.requests == 33  # both steps complete: nothing is sent
    out = pl.read_parquet(tmp_path / "out/themes.reduce.parquet").sort("product")
    assert out["product"].to_list() == ["kettle", "lamp", "tent"] and (out["items"] == 10).all()
    # the stand-in's answers are at max_tokens: the chain's estimate bounds what the run used
    assert out["prompt_tokens"].sum() <= reduce_est["chain"]["rounds"][0]["prompt_tokens"]
    assert out["cost_usd"].sum() <= reduce_est["chain"]["cost_usd_max"]


def test_jobs_that_read_each_other_in_a_loop_are_refused(tmp_path):
    (tmp_path / "a.toml").write_text('name = "a"\n[input]\nfrom_job = "b.toml"\n[request]\nmodel = "m"\nprompt = "x"\n'
                                     '[output]\npath = "a.parquet"\n')
    (tmp_path / "b.toml").write_text('name = "b"\n[input]\nfrom_job = "a.toml"\n[request]\nmodel = "m"\nprompt = "x"\n'
                                     '[output]\npath = "b.parquet"\n')
    with pytest.raises(JobError, match="loop back to"):
        Job.load(tmp_path / "a.toml")
