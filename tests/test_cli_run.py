"""The run, report and sim commands as a user meets them: exit codes, messages, signals."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import reviews, run_cli

PIPELINE = str(Path(sys.executable).parent / "pipeline")


def test_run_then_report(make_job, sim):
    job = make_job(rows=25)
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--plain")
    assert result.exit_code == 0, result.output
    assert "estimate: 25 rows, 25 requests to send" in result.output
    assert "wrote " in result.output and "25 ok, 0 failed" in result.output
    rep = run_cli("report", "out/result.parquet", "--json")
    assert rep.exit_code == 0
    data = json.loads(rep.output)
    assert data["rows"] == 25 and data["by_status"] == {"ok": 25}
    assert data["latency_ms"]["p50"] is not None and data["cost_usd"] > 0
    table = run_cli("report", "out/result.parquet")
    assert "latency p50 / p95 / p99" in table.output and "estimate before the run" in table.output


def test_run_exit_status_1_when_rows_fail(make_job, sim):
    df = reviews(5).with_columns(pl.lit("SIM_400").alias("text"))
    with sim() as s:
        result = run_cli("run", make_job(data=df).name, "--base-url", s.base_url, "--plain")
    assert result.exit_code == 1
    assert "5 rows, 3 requests to send" in result.output  # three products: duplicates sent once
    assert "errors: http_400 5" in result.output  # ...but every row carries its error


def test_run_refuses_above_budget_without_yes(make_job, sim):
    job = make_job(rows=50, extra="[budget]\nmax_cost_usd = 0.000001")
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 0
    assert result.exit_code == 3
    assert "not started: the estimate (up to $0.00) is above [budget].max_cost_usd ($1e-06); pass --yes" \
        in result.output


def test_budget_stops_the_run_before_crossing_it(make_job, sim):
    # ~$0.000013 per request at most: a budget of $0.0002 allows ~15 of 200.
    job = make_job(rows=200, limits="concurrency = 4", extra="[budget]\nmax_cost_usd = 0.0002")
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--yes", "--plain")
    assert result.exit_code == 3
    assert "stopped before crossing [budget].max_cost_usd" in result.output
    manifest = json.loads(Path("out/result.manifest.json").read_text())
    assert manifest["status"] == "stopped" and manifest["stop_reason"]["kind"] == "budget"
    assert 0 < manifest["totals"]["cost_usd_this_run"] <= 0.0002
    out = pl.read_parquet("out/result.parquet")
    assert 0 < out.height < 200 and out["cost_usd"].sum() <= 0.0002


def test_report_of_a_missing_file():
    result = run_cli("report", "nope.parquet")
    assert result.exit_code == 2 and result.output.strip() == "error: nope.parquet: output file not found"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_flushes_and_a_rerun_finishes(make_job, sim, sig):
    job = make_job(rows=300, limits="concurrency = 8")
    with sim(latency_ms=100) as s:
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120  # mid-run, however busy the machine: the state, not a time
        while s.stats.requests < 40 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.stats.requests >= 40
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        assert proc.returncode == 3, err
        assert f"stopped: stopped by {sig.name}" in err
        assert f"run `pipeline run {job.name} --base-url {s.base_url}` again to resume" in err
        partial = pl.read_parquet("out/result.parquet")
        assert 0 < partial.height < 300
        assert json.loads(Path("out/result.manifest.json").read_text())["status"] == "stopped"
        first_requests = s.stats.requests
        again = subprocess.run([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 0, again.stderr
        assert s.stats.duplicate_ok <= 8  # at most what was in flight at the signal was paid twice
        assert s.stats.requests - first_requests <= 300 - partial.height + 8
    final = pl.read_parquet("out/result.parquet")
    assert final.height == 300 and final["review_id"].n_unique() == 300
    assert final["status"].unique().to_list() == ["ok"]


def test_sim_command_serves_and_reports_itself():
    import httpx

    from pipeline.sim import simulator_process

    with simulator_process("--rpm", "100", stderr=subprocess.PIPE) as (url, proc):
        assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "gpt-4o-mini"
    err = proc.stderr.read() if proc.stderr else ""
    assert "simulator" in err and "not by a model" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_cancels_requests_in_flight_at_once_and_exits_3(make_job, sim, sig):
    job = make_job(rows=100, limits="concurrency = 4\ntimeout_s = 60")
    with sim(latency_ms=20_000) as s:  # answers that would take 20 s each, far longer than the 5 s grace
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while s.stats.requests < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        t = time.monotonic()
        proc.send_signal(sig)
        time.sleep(0.3)  # two signals, not one: the kernel merges a signal sent while the same one is pending
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - t
    assert proc.returncode == 3, err  # never 143/130: the handlers stay installed to the end
    assert elapsed < 15  # the 20 s answers were not waited for
    assert "again to resume" in err and "Traceback" not in err


def test_not_enough_disk_space_is_refused_before_sending(make_job, sim, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    with sim() as s:
        result = run_cli("run", make_job(rows=5).name, "--base-url", s.base_url)
        assert s.stats.requests == 0
    assert result.exit_code == 2 and "MiB free" in result.output


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_estimating_stops_with_one_line_and_exit_3(make_job, sim, sig):
    job = make_job(rows=200_000)  # the estimate renders every row first: long enough to be interrupted in it
    with sim() as s:
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        journal = Path("out/result.journal.sqlite")  # opened just before the estimate pass
        for _ in range(1000):
            if journal.exists():
                break
            time.sleep(0.01)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        assert s.stats.requests == 0
    assert proc.returncode == 3, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"error: stopped by {sig.name}; everything answered is saved, run "
                           f"`pipeline run {job.name} --base-url {s.base_url}` again to resume")


def test_a_server_whose_limits_are_below_the_jobs_is_named_at_the_end(make_job, sim):
    job = make_job(rows=20, limits="requests_per_minute = 5000")
    with sim(rpm=600) as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--plain")
    assert result.exit_code == 0, result.output
    assert ("note: the server's own limit (600 requests per minute, from its rate-limit headers) is below the "
            "job's (5,000)") in result.output
    manifest = json.loads(Path("out/result.manifest.json").read_text())
    assert manifest["paced_by_server_limits"] == {"requests_per_minute": 600}


@pytest.mark.parametrize("delay_s", [0.0, 0.05, 0.15, 0.3])
def test_ctrl_c_right_at_the_end_never_prints_a_traceback_and_keeps_every_row(make_job, sim, delay_s):
    rows = 40
    job = make_job(rows=rows, limits="concurrency = 8")
    with sim(latency_ms=20) as s:
        proc = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while s.stats.ok < rows and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay_s)  # the last answers, the final write, the manifest: whichever this lands in
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "Traceback" not in out
    assert proc.returncode in (0, 3), err
    assert pl.read_parquet("out/result.parquet").height == rows  # every answered row is in the output


def test_every_suggested_command_repeats_the_flags_given():
    from pipeline.cli import rerun_command

    assert rerun_command("jobs/x.toml", base_url="http://127.0.0.1:9/v1", mode="batch") == \
        "pipeline run jobs/x.toml --base-url http://127.0.0.1:9/v1 --mode batch"
    assert rerun_command("my jobs/x.toml", engine="ray", address="ray://head:10001", workers=4) == \
        "pipeline run 'my jobs/x.toml' --engine ray --address ray://head:10001 --workers 4"


def test_the_sample_suggests_the_rest_with_the_same_address(make_job, sim):
    job = make_job(rows=30)
    with sim() as s:
        result = run_cli("run", job.name, "--sample", "3", "--base-url", s.base_url)
    assert result.exit_code == 0, result.output
    assert f"run `pipeline run {job.name} --base-url {s.base_url}` for the rest" in result.output.replace("\n", "")
