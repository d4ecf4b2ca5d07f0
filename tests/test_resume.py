"""Never pay twice, never lose a row: kills, reruns, --fresh, --retry-failed, edited prompts."""

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

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
    assert result.output.splitlines()[-1].startswith(f"error: {tmp_path / 'blocked'}: cannot create the output folder")


def _garble_the_middle(path: Path, size: int = 8192) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2 // 4096 * 4096  # a whole page in the middle of the file
    data[mid:mid + size] = random.Random(3).randbytes(size)
    path.write_bytes(bytes(data))


def test_a_damaged_journal_stops_the_run_before_any_request_and_leaves_the_output_as_it_was(make_job, sim, tmp_path):
    job = make_job(rows=1500)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url, limit=1000)
        output = tmp_path / "out/result.parquet"
        before = output.read_bytes()
        _garble_the_middle(tmp_path / "out/result.journal.sqlite")
        sent = s.stats.requests
        result = run_cli("run", job.name, "--base-url", s.base_url, "--yes")
        assert s.stats.requests == sent  # nothing was sent
    assert result.exit_code == 2, result.output
    assert "the journal is damaged" in result.output and "nothing was sent" in result.output
    assert "--fresh would send 1,500 requests: up to $" in result.output and "Traceback" not in result.output
    assert output.read_bytes() == before


def test_a_deleted_journal_beside_answers_is_refused_then_fresh_moves_the_output_aside(make_job, sim, tmp_path):
    job = make_job(rows=30)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        (tmp_path / "out/result.journal.sqlite").unlink()
        refused = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 30  # nothing paid again
        assert refused.exit_code == 2
        assert "missing or empty, but" in refused.output and "holds 30 answered row(s)" in refused.output
        fresh = run_cli("run", job.name, "--base-url", s.base_url, "--fresh")
        assert fresh.exit_code == 0 and s.stats.requests == 60
    assert "--fresh: set aside (kept, not deleted): " in fresh.output and "out/result.2" in fresh.output, fresh.output
    aside = list((tmp_path / "out").glob("result.2*.parquet"))
    assert len(aside) == 1 and pl.read_parquet(aside[0]).height == 30


def test_a_stopped_resume_keeps_every_row_answered_by_earlier_runs(make_job, sim, tmp_path):
    job = make_job(rows=400, limits="concurrency = 4", extra="[budget]\nmax_cost_usd = 0.004\n")
    with sim() as s:
        first = run(Job.load(job), base_url=s.base_url, limit=150)
        assert first.exit_code == 0 and first.stats.ok == 150
        second = run(Job.load(job), base_url=s.base_url)  # the budget stops it part of the way through the rest
        assert second.stopped is not None and "max_cost_usd" in str(second.stopped)
        answered = s.stats.ok
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert 150 < answered < 400
    assert out.height == answered and out["review_id"].n_unique() == answered
    assert set(reviews(150)["review_id"]) <= set(out["review_id"])  # the first run's rows are all still there
    assert out["review_id"].to_list() == sorted(out["review_id"].to_list())
    assert (out["status"] == "ok").all()
    assert second.manifest_data["rows_in_output"] == answered


def test_a_fresh_run_that_fails_at_once_keeps_the_earlier_output_aside(make_job, sim, tmp_path, monkeypatch):
    job = make_job(rows=10)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    with sim(api_key="sk-right") as s:
        result = run(Job.load(job), base_url=s.base_url, fresh=True)
        assert result.exit_code == 3
    aside = list((tmp_path / "out").glob("result.2*.parquet"))
    assert len(aside) == 1 and pl.read_parquet(aside[0]).height == 10


def test_an_output_without_its_manifest_is_resumed_from_its_journal(make_job, sim, tmp_path):
    job = make_job(rows=25)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        (tmp_path / "out/result.manifest.json").unlink()
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 25 and again.exit_code == 0 and again.stats.resumed == 25
        (tmp_path / "out/result.manifest.json").unlink()
        (tmp_path / "out/result.journal.sqlite").unlink()
        refused = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 25
    assert refused.exit_code == 2
    assert "exists without its manifest" in refused.output and "restoring the journal keeps its answers" in \
        refused.output


def test_a_full_disk_stops_the_run_and_the_answers_that_arrived_are_journaled_not_paid_again(make_job, sim,
                                                                                              monkeypatch):
    from pipeline.errors import OutputError
    from pipeline.journal import Journal
    from pipeline.sink import PartWriter

    job = make_job(rows=400, limits="concurrency = 16")
    disk = {"full": False, "commits": 0}
    real_flush, real_discard, real_write = Journal.flush, PartWriter.discard, PartWriter.flush

    def flush(self):  # the journal's commits: the disk fills up at the 5th
        if self._pending or self._pending_blocks:
            disk["commits"] += 1
            if disk["commits"] >= 5 and disk["full"] is not None:
                disk["full"] = True
            if disk["full"]:
                raise OutputError(f"{self.path}: cannot write the journal: database or disk is full")
        return real_flush(self)

    def write_part(self):  # nor can the output's parts be written while the disk is full
        if disk["full"]:
            raise OutputError(f"{self.paths.parts}: cannot write output: No space left on device")
        return real_write(self)

    def discard(self):  # giving up the output's temporary files frees their space
        real_discard(self)
        disk["full"] = None

    monkeypatch.setattr(Journal, "flush", flush)
    monkeypatch.setattr(PartWriter, "flush", write_part)
    monkeypatch.setattr(PartWriter, "discard", discard)
    with sim(latency_ms=5) as s:
        with pytest.raises(OutputError, match="disk is full"):
            run(Job.load(job), base_url=s.base_url)
        answered = s.stats.ok
        assert 0 < answered < 400
        disk["full"] = None  # space again (monkeypatch.undo would also undo the test's own working folder)
        again = run(Job.load(job), base_url=s.base_url)
        assert again.exit_code == 0 and s.stats.duplicate_ok == 0  # every answer that arrived was journaled
    assert pl.read_parquet("out/result.parquet").height == 400
