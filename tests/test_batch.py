"""Batch API mode over the simulator's /v1/files and /v1/batches: split, submit once, poll, collect, resume."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import BudgetExceeded, JobError
from pipeline.job import Job
from pipeline.journal import Journal
from pipeline.ledger import BatchLedger
from pipeline.run import run
from tests.conftest import SECRET, reviews, run_cli, wait_for

PIPELINE = str(Path(sys.executable).parent / "pipeline")
REQUEST = textwrap.dedent('''\
    model = "gpt-4o-mini"
    system = "Summarise in one sentence."
    prompt = "Review of {{ product }}: {{ text }}"
    max_tokens = 50
    mode = "batch"''')


def batch_job(make_job, *, rows=20, data=None, per_file=50_000, request=REQUEST, extra="", output=None):
    return make_job(rows=rows, data=data, request=request, output=output,
                    extra=f"[batch]\nmax_requests_per_file = {per_file}\npoll_interval_s = 0.05\n"
                          f"poll_max_interval_s = 0.2\n{extra}")


def no_duplicate_batches(stats):
    return all(n == 1 for n in stats.batches_by_input_file.values())


def test_120k_rows_go_through_three_batch_files_and_every_row_comes_back_once(make_job, sim_process):
    rows = 120_000
    job = batch_job(make_job, rows=rows)
    with sim_process("--batch-delay-s", "1") as (url, stats):
        result = run(Job.load(job), base_url=url)
        s = stats()
    assert result.exit_code == 0, (result.stopped, result.stats.errors)
    assert s["files_uploaded"] == 3 and s["batches_created"] == 3  # 50,000 + 50,000 + 20,000
    assert sorted(s["batches_by_input_file"].values()) == [1, 1, 1]
    assert s["batch_lines"] == rows  # every request submitted once
    out = pl.read_parquet("out/result.parquet")
    assert out.height == rows and out["review_id"].n_unique() == rows
    assert out["review_id"].to_list() == [f"r{i:04d}" for i in range(rows)]  # input order, not the results' order
    assert out["status"].unique().to_list() == ["ok"]
    assert out["content"][5] == "In short: Review of tent: Review number 5: the product was great and arrived on day 5."
    manifest = json.loads(Path("out/result.manifest.json").read_text())
    assert manifest["mode"] == "batch" and manifest["status"] == "complete"
    assert [b["request_counts"]["total"] for b in manifest["batches"]] == [50_000, 50_000, 20_000]
    assert not Path("out/result.batches").exists()  # local batch files are removed once the provider has them


def test_a_batch_job_without_an_id_or_kept_columns_writes_every_row(make_job, sim):
    job = make_job(rows=12, request=REQUEST, input='path = "input.parquet"',
                   extra="[batch]\npoll_interval_s = 0.05\npoll_max_interval_s = 0.2\n")
    with sim(batch_delay_s=0.2) as s:
        assert run(Job.load(job), base_url=s.base_url).exit_code == 0
    out = pl.read_parquet("out/result.parquet")
    assert out["row"].to_list() == list(range(12)) and (out["status"] == "ok").all()


def test_batch_costs_are_half_the_online_ones_for_the_same_usage(make_job, sim):
    job = batch_job(make_job, rows=30)
    online = Path("online.toml")
    online.write_text(job.read_text().replace('mode = "batch"', 'mode = "online"')
                      .replace("out/result.parquet", "online/result.parquet").replace('name = "t"', 'name = "t2"'))
    with sim() as s:
        assert run(Job.load(job), base_url=s.base_url).exit_code == 0
        assert run(Job.load(online), base_url=s.base_url).exit_code == 0
    b, o = pl.read_parquet("out/result.parquet"), pl.read_parquet("online/result.parquet")
    assert b["prompt_tokens"].to_list() == o["prompt_tokens"].to_list()
    assert b["completion_tokens"].to_list() == o["completion_tokens"].to_list()
    assert b["cost_usd"].to_list() == pytest.approx((o["cost_usd"] * 0.5).to_list(), rel=1e-9)
    assert b["cost_usd"].sum() > 0
    assert b["latency_ms"].is_null().all() and (b["attempts"] == 1).all()


def test_per_line_errors_land_in_the_error_column_and_a_rerun_resubmits_only_what_can_be_retried(make_job, sim):
    df = reviews(400).with_columns(
        pl.when(pl.col("review_id") == "r0007").then(pl.lit("SIM_400 please")).otherwise(pl.col("text")).alias("text"))
    job = batch_job(make_job, data=df)
    with sim(batch_delay_s=0.2, batch_line_error_rate=0.05, seed=3) as s:
        first = run(Job.load(job), base_url=s.base_url)
        out = pl.read_parquet("out/result.parquet")
        assert first.exit_code == 1
        bad = out.filter(pl.col("review_id") == "r0007")
        assert bad["error_type"][0] == "http_400" and "SIM_400" in bad["error"][0]
        transient = out.filter(pl.col("error_type") == "server_error").height
        assert transient == s.stats.injected["batch_line_error"] > 5
        assert out.filter(pl.col("status") == "ok").height == 400 - 1 - transient

        s.sim.config.batch_line_error_rate = 0.0
        lines_before = s.stats.batch_lines
        second = run(Job.load(job), base_url=s.base_url)  # a plain rerun: the 500s go in a new batch
        assert s.stats.batch_lines - lines_before == transient and s.stats.batches_created == 2
        assert second.exit_code == 1  # the 400 stays failed without --retry-failed
        third = run(Job.load(job), base_url=s.base_url, retry_failed=True)
        assert s.stats.batches_created == 3 and s.stats.batch_lines - lines_before == transient + 1
        assert third.stats.failed == 1  # SIM_400 fails again, deterministically
    final = pl.read_parquet("out/result.parquet")
    assert final.height == 400 and final.filter(pl.col("status") == "ok").height == 399


def test_kill_after_upload_before_the_batch_is_created_then_rerun_submits_each_file_once(make_job, sim):
    job = batch_job(make_job, rows=3000, per_file=1500)
    with sim(batch_delay_s=0.3, batch_create_hold_s=1.5) as s:
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--yes"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: s.stats.files_uploaded >= 1)
        time.sleep(0.2)  # the create request is held at the server now
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        time.sleep(1.6)  # the held create finds its client gone and makes nothing
        assert s.stats.batches_created == 0
        with Journal("out/result.journal.sqlite") as j:
            parts = BatchLedger(j).parts()
        assert len(parts) == 1 and parts[0].file_id is not None and parts[0].batch_id is None
        final = subprocess.run([PIPELINE, "run", job.name, "--base-url", s.base_url, "--yes"],
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        assert s.stats.batches_created == 2 and no_duplicate_batches(s.stats)
        assert s.stats.files_uploaded == 2  # the recorded file was not uploaded again
        assert s.stats.batch_lines == 3000
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 3000 and out["review_id"].n_unique() == 3000 and (out["status"] == "ok").all()


def test_a_create_whose_reply_was_lost_is_found_instead_of_made_twice(make_job, sim):
    job = batch_job(make_job, rows=300, per_file=100)
    with sim(batch_delay_s=0.2, batch_create_drop_replies=2) as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.injected["batch_reply_dropped"] == 2
        assert s.stats.batches_created == 3 and no_duplicate_batches(s.stats)
    assert result.exit_code == 0 and result.stats.ok == 300


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_stopped_while_polling_then_rerun_collects_without_new_batches(make_job, sim, sig):
    job = batch_job(make_job, rows=2000, per_file=1000)
    with sim(batch_delay_s=3.0) as s:
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--yes"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: s.stats.batches_created == 2 and s.stats.batch_polls >= 2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        if sig == signal.SIGINT:
            assert proc.returncode == 3 and "keep running at the provider" in err and "Traceback" not in err
            manifest = json.loads(Path("out/result.manifest.json").read_text())
            assert manifest["status"] == "stopped" and manifest["totals"]["rows_pending_in_batches"] == 2000
        final = subprocess.run([PIPELINE, "run", job.name, "--base-url", s.base_url, "--yes"],
                               capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr
        assert s.stats.batches_created == 2 and s.stats.files_uploaded == 2 and s.stats.batch_lines == 2000
    out = pl.read_parquet("out/result.parquet")
    assert out.height == 2000 and out["review_id"].n_unique() == 2000 and (out["status"] == "ok").all()


def test_an_expired_batch_keeps_its_finished_rows_and_a_rerun_sends_the_rest(make_job, sim):
    job = batch_job(make_job, rows=200)
    with sim(batch_delay_s=0.2, batch_expire_fraction=0.5) as s:
        first = run(Job.load(job), base_url=s.base_url)
        out = pl.read_parquet("out/result.parquet")
        assert first.exit_code == 1
        assert out.filter(pl.col("status") == "ok").height == 100
        assert out.filter(pl.col("error_type") == "batch_expired").height == 100
        s.sim.config.batch_expire_fraction = None
        second = run(Job.load(job), base_url=s.base_url)
        assert second.exit_code == 0 and s.stats.batches_created == 2
        assert s.stats.batch_lines == 200  # 100 answered before the expiry, then only the 100 it left
    assert (pl.read_parquet("out/result.parquet")["status"] == "ok").all()


def test_a_failed_batch_fails_its_rows_with_the_providers_reason(make_job, sim):
    job = batch_job(make_job, rows=10)
    with sim(batch_delay_s=0.1, batch_fail=True) as s:
        result = run(Job.load(job), base_url=s.base_url)
    out = pl.read_parquet("out/result.parquet")
    assert result.exit_code == 1
    assert out["error_type"].unique().to_list() == ["batch_failed"]
    assert "simulated_failure" in out["error"][0]


def test_no_wait_then_list_cancel_and_collect_the_partial_results(make_job, sim):
    job = batch_job(make_job, rows=1000)
    with sim(batch_delay_s=3.0) as s:
        submitted = run_cli("run", job, "--base-url", s.base_url, "--no-wait", "--yes")
        assert submitted.exit_code == 0, submitted.output
        assert "rows are still in batches" in submitted.output
        assert json.loads(Path("out/result.manifest.json").read_text())["status"] == "submitted"
        assert pl.read_parquet("out/result.parquet").height == 0

        online = run_cli("run", job, "--base-url", s.base_url, "--mode", "online", "--yes")
        assert online.exit_code == 2 and "still open" in online.output  # never pay twice for the same rows

        wait_for(lambda: any(b["request_counts"]["completed"] for b in list(s.sim.batch_api.batches.values())))
        listed = run_cli("batches", job, "--base-url", s.base_url)
        assert listed.exit_code == 0 and "batch_sim" in listed.output and "in_progress" in listed.output
        cancelled = run_cli("batches", "cancel", job, "--base-url", s.base_url)
        assert cancelled.exit_code == 0 and "cancelling" in cancelled.output
        collected = run(Job.load(job), base_url=s.base_url)
        assert s.stats.batches_created == 1
    out = pl.read_parquet("out/result.parquet")
    done, cancelled_rows = out.filter(pl.col("status") == "ok").height, out.filter(
        pl.col("error_type") == "batch_cancelled").height
    assert 0 < done < 1000 and done + cancelled_rows == 1000
    assert collected.exit_code == 1
    assert "cancelled" in run_cli("batches", job, "--offline").output


def test_embeddings_in_batch_mode_return_vectors_in_order_at_the_batch_price(make_job, sim):
    from pipeline.sim.answers import embedding

    request = 'endpoint = "embeddings"\nmodel = "text-embedding-3-small"\ninput = "{{ text }}"\ndimensions = 64\n' \
              'mode = "batch"'
    job = batch_job(make_job, rows=50, request=request)
    with sim(batch_delay_s=0.1) as s:
        result = run(Job.load(job), base_url=s.base_url)
    out = pl.read_parquet("out/result.parquet")
    assert result.exit_code == 0 and out.height == 50
    assert out.schema["embedding"] == pl.Array(pl.Float32, 64)
    assert out["embedding"][3].to_list() == pytest.approx(embedding(reviews(50)["text"][3], 64).tolist(), abs=1e-6)
    per_token = (out["cost_usd"] / out["prompt_tokens"]).to_list()
    assert per_token == pytest.approx([0.02 / 2 / 1e6] * 50)  # text-embedding-3-small: $0.02/M, halved


def test_batch_budget_is_checked_before_anything_is_submitted(make_job, sim):
    job = batch_job(make_job, rows=100, extra="[budget]\nmax_cost_usd = 0.000001\n")
    with sim() as s, pytest.raises(BudgetExceeded, match="Batch API price"):
        run(Job.load(job), base_url=s.base_url)
    assert s.stats.files_uploaded == 0


def test_the_key_never_reaches_the_journal_or_the_manifest(make_job, sim, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    job = batch_job(make_job, rows=10)
    with sim(batch_delay_s=0.1, api_key=SECRET) as s:
        assert run(Job.load(job), base_url=s.base_url).exit_code == 0
    for f in (f for f in Path("out").rglob("*") if f.is_file()):
        assert SECRET.encode() not in f.read_bytes(), f


def test_a_wrong_key_stops_with_one_clear_message(make_job, sim, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-0000000000")
    job = batch_job(make_job, rows=10)
    with sim(api_key=SECRET) as s:
        r = run_cli("run", job, "--base-url", s.base_url, "--yes")
    assert r.exit_code == 3 and "uploading" in r.output and "HTTP 401" in r.output and "Traceback" not in r.output
    assert "sk-wrong-key-0000000000" not in r.output


def test_mode_and_batch_settings_are_validated(make_job):
    job = batch_job(make_job, request=REQUEST.replace('"batch"', '"later"'))
    with pytest.raises(JobError, match=r"\[request\]\.mode must be one of online, batch"):
        Job.load(job)
    job = make_job(extra="[batch]\nmax_requests_per_file = 60001\n")
    with pytest.raises(JobError, match=r"\[batch\]\.max_requests_per_file can be at most 50000"):
        Job.load(job)


def test_no_wait_is_for_batch_mode_only(make_job):
    r = run_cli("run", make_job(), "--no-wait")
    assert r.exit_code == 2 and "--no-wait" in r.output


def test_finding_a_batch_by_its_input_file_pages_through_the_providers_list(sim):
    import httpx

    from pipeline.providers.openai_batch import BatchClient

    with sim(batch_delay_s=0.05) as s:
        ids = []
        for i in range(130):
            line = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": str(i)}]}})
            f = httpx.post(f"{s.base_url}/files", files={"file": ("x.jsonl", line.encode())},
                           data={"purpose": "batch"}).json()["id"]
            ids.append(f)
            httpx.post(f"{s.base_url}/batches", json={"input_file_id": f, "endpoint": "/v1/chat/completions",
                                                      "completion_window": "24h"}).raise_for_status()
        with BatchClient(s.base_url, {}, None, timeout_s=10, max_attempts=2) as api:
            oldest = api.find(ids[0], since=0)  # on the second page of 100
            assert oldest is not None and oldest.input_file_id == ids[0]
            assert api.find("file-unknown", since=0) is None
            assert api.find(ids[0], since=time.time() + 3600) is None  # stops at batches older than asked


def test_cancel_drops_files_never_submitted_so_the_job_can_run_online(make_job, sim):
    job = batch_job(make_job, rows=40)
    with Journal("out/result.journal.sqlite") as j:  # as a run killed between writing a file and its batch leaves it
        Path("out/result.batches").mkdir(parents=True)
        left = Path("out/result.batches/part-x.jsonl")
        left.write_text("{}\n")
        BatchLedger(j).add_part(str(left), ["k1", "k2"], 3)
    with sim() as s:
        assert "still open" in run_cli("run", job, "--base-url", s.base_url, "--mode", "online", "--yes").output
        cancelled = run_cli("batches", "cancel", job, "--base-url", s.base_url)
        assert cancelled.exit_code == 0 and "not submitted yet; dropped" in cancelled.output
        assert not left.exists()
        online = run_cli("run", job, "--base-url", s.base_url, "--mode", "online", "--yes")
        assert online.exit_code == 0, online.output


def test_a_batch_run_reads_its_input_twice_and_renders_it_once(make_job, sim, monkeypatch):
    from pipeline.render import Renderer

    reads, renders = [], []
    collect_batches, prepare_chunk = pl.LazyFrame.collect_batches, Renderer.prepare_chunk
    monkeypatch.setattr(pl.LazyFrame, "collect_batches", lambda self, *a, **k: reads.append(1)
                        or collect_batches(self, *a, **k))
    monkeypatch.setattr(Renderer, "prepare_chunk", lambda self, chunk, *a, **k: renders.append(chunk.height)
                        or prepare_chunk(self, chunk, *a, **k))
    data = pl.concat([reviews(300), reviews(300).with_columns(pl.col("review_id") + "b")])  # half are duplicates
    job = batch_job(make_job, data=data, per_file=100)
    with sim(batch_delay_s=0.05) as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.batch_lines == 300  # each distinct request once
    assert result.exit_code == 0, result.stopped
    assert len(reads) == 2  # the estimate (which also wrote the batch files) and the output's ids and columns
    assert sum(renders) == 600  # every row rendered once
    out = pl.read_parquet("out/result.parquet")
    assert out["review_id"].to_list() == data["review_id"].to_list()
    assert out["deduplicated"].sum() == 300 and out["status"].unique().to_list() == ["ok"]
    assert out["product"].to_list() == data["product"].to_list()


def test_collecting_in_a_later_run_reads_the_input_twice_too(make_job, sim, monkeypatch):
    job = batch_job(make_job, rows=50, per_file=20)
    with sim(batch_delay_s=0.3) as s:
        first = run(Job.load(job), base_url=s.base_url, wait=False)
        assert first.stats.pending == 50
        reads = []
        collect_batches = pl.LazyFrame.collect_batches
        monkeypatch.setattr(pl.LazyFrame, "collect_batches", lambda self, *a, **k: reads.append(1)
                            or collect_batches(self, *a, **k))
        time.sleep(0.4)
        second = run(Job.load(job), base_url=s.base_url)
        assert s.stats.batch_lines == 50
    assert second.exit_code == 0 and second.stats.ok == 50 and len(reads) == 2


def test_batch_mode_does_not_load_the_online_scheduler():
    code = ("import sys, pipeline.batch, pipeline.cli; "
            "print(sorted(m for m in ('pipeline.execute', 'pipeline.senders', 'pipeline.online') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
