"""The Ray engine end to end: real Ray workers (a local Ray started by each run), the simulator on loopback, and a
local S3 server (moto's server mode) for object storage. Ray is installed by ``make test`` (the [ray] extra)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.engines.ray_engine import run_ray
from pipeline.job import load_job
from pipeline.report import read_output
from pipeline.run import run
from pipeline.sim import SimConfig, SimServer
from pipeline.sim.server import free_port
from tests import faults
from tests.conftest import reviews

if os.environ.get("PIPELINE_CI"):  # CI installs the [ray] extra: there, a missing Ray is a failure, not a skip
    import ray
else:
    ray = pytest.importorskip("ray", reason="the Ray engine's tests need Ray: pip install -e '.[dev,ray]'")

ANSWER = ["review_id", "product", "status", "content", "prompt_tokens", "completion_tokens", "attempts"]


def job_file(tmp: Path, base_url: str, *, input_path: str = "input.parquet", output: str = "out/ds.parquet",
             limits: str = "concurrency = 16", engine: str = "", extra: str = "") -> Path:
    text = textwrap.dedent(f'''\
        name = "ray-test"
        [input]
        path = "{input_path}"
        id = "review_id"
        keep = ["product"]
        [request]
        model = "gpt-4o-mini"
        system = "Summarise in one sentence."
        prompt = "Review of {{{{ product }}}}: {{{{ text }}}}"
        max_tokens = 50
        [output]
        path = "{output}"
        [api]
        base_url = "{base_url}"
        [limits]
        ''') + limits + "\n[engine]\nkind = \"ray\"\n" + engine + "\n" + extra
    p = tmp / f"job-{abs(hash((input_path, output))) % 10_000}.toml"
    p.write_text(text)
    return p


def test_four_workers_hold_the_global_limits_of_a_server_whose_buckets_start_empty(tmp_path: Path) -> None:
    n = 600
    reviews(n).write_parquet(tmp_path / "input.parquet", row_group_size=50)
    rpm, tpm = 1_800, 120_000  # 30 requests/s; TPM binds at about 26/s (requests charge prompt + max_tokens)
    with SimServer(SimConfig(rpm=rpm, tpm=tpm, limit_model="token-bucket", start_empty=True)) as s:
        job = load_job(job_file(tmp_path, s.base_url, limits=f"concurrency = 32\nrequests_per_minute = {rpm}\n"
                                                             f"tokens_per_minute = {tpm}",
                                engine="workers = 4\npartition_rows = 150"))
        result = run_ray(job)
        stats = s.stats.to_dict()
    assert result.exit_code == 0 and result.partitions == 4 and result.partitions_done == 4
    df = read_output(tmp_path / "out" / "ds.parquet")
    assert df.height == n and df["review_id"].n_unique() == n and (df["status"] == "ok").all()
    assert stats["rate_limited"] <= 0.005 * n, stats["rate_limited"]
    assert stats["duplicate_ok"] == 0
    # Within the limit every second: a second's rate plus at most the half-second burst the budget allows.
    per_s = stats["admitted_per_s"]
    assert max(per_s) <= rpm / 60 * 1.5 + 1, per_s
    budget = result.manifest_data["engine"]["budget"]
    assert budget["workers_seen"] >= 4 and budget["granted_requests"] >= n


def test_a_cooldown_one_worker_reports_reaches_every_other_worker_through_the_actor() -> None:
    from pipeline.engines.budget import Report
    from pipeline.engines.ray_engine import _actor_class

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        actor = _actor_class(ray).remote(6_000, None, None)
        ray.get(actor.lease.remote("w1", [1], Report()))
        ray.get(actor.cooldown.remote("w1", 3.0, Report(requests=1, rate_limited=1)))
        leases = ray.get([actor.lease.remote(w, [1], Report()) for w in ("w2", "w3", "w4")])
        assert all(lease.granted == () and 2.0 < lease.cooldown_s <= 3.0 for lease in leases)
        assert all(lease.pace == 0.5 for lease in leases)  # and the pace was cut for everyone
    finally:
        ray.shutdown()


def test_a_worker_killed_mid_partition_and_a_rerun_give_every_row_once_with_the_local_engines_answers(
        tmp_path: Path) -> None:
    n, commit_rows, concurrency, workers = 1_200, 50, 8, 2
    reviews(n).write_parquet(tmp_path / "input.parquet", row_group_size=100)
    marker = tmp_path / "killed"
    ray.cloudpickle.register_pickle_by_value(faults)  # the workers cannot import the tests
    with SimServer(SimConfig(latency_ms=5)) as s:
        path = job_file(tmp_path, s.base_url, limits=f"concurrency = {concurrency}",
                        engine=f"workers = {workers}\npartition_rows = 300\ncommit_rows = {commit_rows}")
        job = load_job(path)
        first = run_ray(job, sink_wrapper=faults.KillAfter(200, marker))  # the first task to commit 200 rows dies
        assert marker.exists()  # a worker did die
        sent_first = s.stats.requests
        rerun = run_ray(job)
        stats = s.stats.to_dict()
        local = run(load_job(job_file(tmp_path, s.base_url, output="out/local.parquet")), engine="local")
    assert first.exit_code == 0 and first.partitions_done == 4
    assert rerun.stats.requests_sent == 0 and rerun.manifest_data["engine"]["partitions_run"] == 0
    # What the dead worker had answered and not committed was sent again, and nothing more.
    bound = concurrency // workers + 2 * commit_rows
    assert sent_first - n <= bound and stats["duplicate_ok"] <= bound, (sent_first, stats["duplicate_ok"])
    df = read_output(tmp_path / "out" / "ds.parquet")
    assert df.height == n and df["review_id"].n_unique() == n
    ours = df.select(ANSWER).sort("review_id").drop("attempts")
    theirs = local.frame().select(ANSWER).sort("review_id").drop("attempts")
    assert ours.equals(theirs)
    assert set(df.columns) == set(local.frame().columns)


def test_cli_runs_the_ray_engine_and_report_reads_the_dataset(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    reviews(80).write_csv(tmp_path / "input.csv")
    with SimServer(SimConfig()) as s:
        path = job_file(tmp_path, s.base_url, input_path="input.csv", engine="workers = 2")
        r = run_cli("run", path, "--engine", "ray")
        assert r.exit_code == 0, r.output
        assert "1 of 1 partitions complete" in r.output
        again = run_cli("run", path, "--engine", "ray")
        assert again.exit_code == 0 and "0 requests" in again.output
    rep = run_cli("report", tmp_path / "out" / "ds.parquet", "--json")
    assert rep.exit_code == 0 and '"rows": 80' in rep.output


def test_the_library_run_follows_the_jobs_engine_and_refuses_what_ray_cannot_do(tmp_path: Path) -> None:
    from pipeline.errors import UsageError

    reviews(60).write_parquet(tmp_path / "input.parquet")
    with SimServer(SimConfig()) as s:
        job = load_job(job_file(tmp_path, s.base_url, engine="workers = 2"))
        result = run(job)  # [engine].kind = "ray": the partitions run on Ray, as `pipeline run` does
        assert s.stats.requests == 60
        with pytest.raises(UsageError, match="not with limit"):
            run(job, limit=10)
    assert result.exit_code == 0 and result.estimate is None
    assert result.manifest_data["engine"]["kind"] == "ray"
    assert Path(result.output).is_dir() and result.frame().height == 60


def test_both_engines_read_from_and_write_to_a_local_s3_server(tmp_path: Path, s3: Callable[[str], Any]) -> None:
    import pyarrow.parquet as pq

    fs = s3("s3://data/")
    n = 240
    pq.write_table(reviews(n).to_arrow(), "data/in/reviews.parquet", filesystem=fs, row_group_size=60)
    with SimServer(SimConfig()) as s:
        local_job = job_file(tmp_path, s.base_url, input_path="s3://data/in/*.parquet",
                             output="s3://data/out/local.parquet", engine="")
        local_text = local_job.read_text().replace('kind = "ray"', 'kind = "local"')
        local_job.write_text(local_text)
        local = run(load_job(local_job))
        ray_job = load_job(job_file(tmp_path, s.base_url, input_path="s3://data/in/*.parquet",
                                    output="s3://data/out/ray.parquet", engine="workers = 2\npartition_rows = 120"))
        result = run_ray(ray_job)
        sent = s.stats.requests
    assert local.exit_code == 0 and result.exit_code == 0 and result.partitions == 2
    assert sent == 2 * n  # each engine sent every row once
    from_local = pl.from_arrow(pq.read_table("data/out/local.parquet", filesystem=fs))
    chunks = sorted(f.path for f in fs.get_file_info(__import__("pyarrow.fs").fs.FileSelector("data/out/ray.parquet"))
                    if f.path.endswith(".parquet"))
    assert chunks and all(os.path.basename(c).startswith("part-") for c in chunks)
    from_ray = pl.concat([pl.from_arrow(pq.read_table(c, filesystem=fs)) for c in chunks])
    assert isinstance(from_local, pl.DataFrame) and isinstance(from_ray, pl.DataFrame)
    cols = [c for c in ANSWER if c != "attempts"]
    assert from_ray.select(cols).sort("review_id").equals(from_local.select(cols).sort("review_id"))
    manifest = fs.open_input_stream("data/out/ray.manifest.json").read()
    assert b'"kind": "ray"' in manifest and b"testing" not in manifest  # no credential anywhere in it
    from tests.conftest import run_cli

    for url in ("s3://data/out/local.parquet", "s3://data/out/ray.parquet"):  # the report reads either, in place
        rep = run_cli("report", url, "--json")
        assert rep.exit_code == 0 and f'"rows": {n}' in rep.output and url in rep.output


def test_the_budget_is_one_for_the_cluster_and_a_stop_keeps_what_was_committed(tmp_path: Path) -> None:
    n, cap = 600, 0.002  # about 55 requests' worth at gpt-4o-mini's price
    reviews(n).write_parquet(tmp_path / "input.parquet", row_group_size=100)
    with SimServer(SimConfig(latency_ms=20)) as s:
        path = job_file(tmp_path, s.base_url, limits="concurrency = 8",
                        engine="workers = 2\npartition_rows = 300\ncommit_rows = 10",
                        extra=f"[budget]\nmax_cost_usd = {cap}\n")
        result = run_ray(load_job(path))
        sent = s.stats.requests
    assert result.exit_code == 3 and result.stopped is not None and "max_cost_usd" in str(result.stopped)
    assert result.stats.cost_usd <= cap * 1.05, result.stats.cost_usd  # both tasks held to the one budget
    assert 20 <= sent < n
    df = read_output(tmp_path / "out" / "ds.parquet")
    assert df.height == result.stats.rows_done and (df["status"] == "ok").all()  # every answer paid for is kept


def test_a_dead_server_stops_the_ray_run_with_one_clear_message(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    reviews(40).write_parquet(tmp_path / "input.parquet", row_group_size=20)
    path = job_file(tmp_path, f"http://127.0.0.1:{free_port()}/v1", limits="max_attempts = 2\ntimeout_s = 5",
                    engine="workers = 2\npartition_rows = 20")
    r = run_cli("run", path)
    assert r.exit_code == 3
    assert "no answer" in r.output and "check [api].base_url" in r.output and "Traceback" not in r.output


def test_the_local_engine_refuses_a_ray_dataset_folder_before_sending(tmp_path: Path) -> None:
    from tests.conftest import run_cli

    reviews(10).write_parquet(tmp_path / "input.parquet")
    with SimServer(SimConfig()) as s:
        path = job_file(tmp_path, s.base_url, engine="workers = 1")
        assert run_cli("run", path).exit_code == 0
        r = run_cli("run", path, "--engine", "local", "--fresh")
        assert r.exit_code == 2 and "is a folder (the Ray engine's dataset" in r.output
        assert s.stats.requests == 10  # the refused run sent nothing
