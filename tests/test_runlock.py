"""One run per job output at a time: a second run (online, batch, library or CLI) is refused and sends nothing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import RunLocked
from pipeline.job import Job
from pipeline.run import run
from pipeline.runlock import RunLock
from tests.conftest import run_cli, wait_for

PIPELINE = str(Path(sys.executable).parent / "pipeline")
HOLD = ("import sys, time; from pathlib import Path; from pipeline.runlock import RunLock; "
        "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(600)")


def test_a_second_holder_is_refused_with_the_first_ones_pid_and_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "out" / "result.parquet"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"another run of this job is going on \\(PID {holder.pid} on "):
            RunLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    with RunLock(out) as lock:  # the kernel released it with the process: nothing to clean up
        assert lock.held
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock.held


def test_two_runs_of_one_job_at_once_pay_for_each_row_once(make_job, sim):
    rows = 60
    job = make_job(rows=rows, limits="concurrency = 4")
    with sim(latency_ms=150) as s:
        first = subprocess.Popen([PIPELINE, "run", job.name, "--base-url", s.base_url, "--plain"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: s.stats.requests >= 4 or first.poll() is not None, timeout_s=120)
        second = run_cli("run", job.name, "--base-url", s.base_url, "--plain")
        _, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
        assert s.stats.requests == rows and s.stats.duplicate_ok == 0
    assert second.exit_code == 2
    assert f"another run of this job is going on (PID {first.pid} on " in second.output
    assert pl.read_parquet("out/result.parquet").height == rows


def test_a_batch_run_is_refused_while_another_run_holds_the_job_and_uploads_nothing(make_job, sim, tmp_path):
    job = make_job(rows=20, extra="[batch]\npoll_interval_s = 0.05\n")
    with sim() as s, RunLock(tmp_path / "out" / "result.parquet"):
        result = run_cli("run", job.name, "--base-url", s.base_url, "--mode", "batch", "--yes")
        assert s.stats.files_uploaded == 0 and s.stats.batches_created == 0 and s.stats.requests == 0
    assert result.exit_code == 2 and "another run of this job is going on" in result.output


def test_the_library_takes_the_same_lock_and_lets_it_go_when_the_run_ends(make_job, sim, tmp_path):
    job = Job.load(make_job(rows=5))
    with sim() as s:
        with RunLock(tmp_path / "out" / "result.parquet"), pytest.raises(RunLocked):
            run(job, base_url=s.base_url)
        assert s.stats.requests == 0
        run(job, base_url=s.base_url)
        run(job, base_url=s.base_url)  # released by the first: a later run is not refused
        assert s.stats.requests == 5
