"""Never pay twice, never lose a row: kills, reruns, --fresh, --retry-failed, edited prompts."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from pipeline.job import Job
from pipeline.run import run
from tests.conftest import reviews, run_cli

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def test_sigkill_at_random_moments_then_rerun_loses_nothing_and_pays_once(make_job, sim, tmp_path):
    rows, concurrency = 3000, 16
    job = make_job(rows=rows, limits=f"concurrency = {concurrency}")
    reference = tmp_path / "reference.toml"
    reference.write_text(job.read_text().replace("out/result.parquet", "ref/result.parquet"))
    rng = random.Random(11)
    with sim(latency_ms=2, latency_jitter_ms=6) as s:
        run(Job.load(reference), base_url=s.base_url)
        answered_by_reference = s.stats.ok
        # The reference answered every distinct body once, so from here on every answer is this job's.
        job_answers = lambda: s.stats.ok - answered_by_reference  # noqa: E731
        kill_points = [("startup", None), ("early", 200), ("middle", 1200), ("late", 2400),
                       ("final flush and compaction", answered_by_reference)]
        kills = 0
        for name, after_answers in kill_points:
            proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if after_answers is None:
                time.sleep(rng.uniform(0.2, 0.8))  # rendering, estimating, opening the journal
            else:
                deadline = time.monotonic() + 60
                while job_answers() < after_answers and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                if name.startswith("final"):
                    time.sleep(rng.uniform(0, 0.05))  # last commits, parts, compaction, manifest
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        assert kills >= 4
        final = subprocess.run([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        paid_twice = s.stats.duplicate_ok - answered_by_reference  # the reference run answered every body once
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    ref = pl.read_parquet(tmp_path / "ref/result.parquet")
    assert out.height == rows and out["review_id"].n_unique() == rows
    assert out["review_id"].to_list() == ref["review_id"].to_list()
    assert out["content"].to_list() == ref["content"].to_list()
    assert out["status"].unique().to_list() == ["ok"]
    assert paid_twice <= kills * concurrency  # only what was in flight at each kill


def test_fresh_moves_the_journal_aside_and_sends_everything_again(make_job, sim, tmp_path):
    job = make_job(rows=10)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        run(Job.load(job), base_url=s.base_url, fresh=True)
        assert s.stats.requests == 20
    asides = [p.name for p in (tmp_path / "out").glob("result.journal.2*.sqlite")]
    assert len(asides) == 1  # the old answers are kept, not deleted


def test_retry_failed_resends_only_failed_rows(make_job, sim):
    failing = pl.col("review_id").is_in(["r0002", "r0005"])
    df = reviews(8).with_columns(pl.when(failing).then(pl.lit("SIM_400 ") + pl.col("review_id"))
                                 .otherwise(pl.col("text")).alias("text"))
    job = make_job(data=df)
    with sim() as s:
        first = run(Job.load(job), base_url=s.base_url)
        assert first.stats.failed == 2
        plain = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 8  # a plain rerun does not resend deterministic failures
        again = run(Job.load(job), base_url=s.base_url, retry_failed=True)
        assert s.stats.requests == 8 + 2
    assert plain.stats.failed == 2 and again.stats.failed == 2 and again.stats.resumed == 6


def test_editing_the_prompt_resends_only_the_rows_it_changes(make_job, sim):
    request = 'model = "gpt-4o-mini"\nprompt = "{% if rating == 5 %}Praise: {% endif %}{{ text }}"\nmax_tokens = 30'
    job = make_job(rows=20, request=request)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 20
        edited = request.replace("Praise: ", "Glowing review: ")
        job.write_text(job.read_text().replace(request, edited))
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 20 + 4  # only the four 5-star rows render differently
    assert result.stats.resumed == 16


def test_unwritable_output_location_fails_before_sending(make_job, sim, tmp_path):
    (tmp_path / "blocked").write_text("a file where the output folder should be")
    job = make_job(output='path = "blocked/out.parquet"')
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 0
    assert result.exit_code == 2
    assert result.output.startswith(f"error: {tmp_path / 'blocked'}: cannot create the output folder")
