"""A 20,000-row job through 10% 5xx, 5% 429, 2% dropped connections and random latency, under rate limits."""

import polars as pl

from pipeline.job import Job
from pipeline.run import run
from tests.conftest import reviews


def test_chaos_every_row_answered_once_and_limits_respected(make_job, sim_process):
    rows, rpm, tpm = 20_000, 60_000, 20_000_000
    df = reviews(rows)
    job = make_job(data=df, limits=f"concurrency = 64\nrequests_per_minute = {rpm}\ntokens_per_minute = {tpm}\n"
                                   "max_attempts = 10")
    with sim_process("--rpm", str(rpm), "--tpm", str(tpm), "--error-rate", "0.10", "--rate-429", "0.05",
                     "--drop-rate", "0.02", "--latency-ms", "2", "--latency-jitter-ms", "30", "--seed", "9") as (url,
                                                                                                          stats):
        result = run(Job.load(job), base_url=url)
        s = stats()
    out = pl.read_parquet(Job.load(job).output.path)
    assert result.exit_code == 0, result.stats.errors
    assert out.height == rows and out["review_id"].n_unique() == rows
    assert out["status"].unique().to_list() == ["ok"]
    injected = s["injected"]
    assert injected["429"] > 500 and injected["drop"] > 200
    assert sum(v for k, v in injected.items() if k in ("500", "502", "503")) > 1000
    assert s["duplicate_ok"] == 0  # no answer paid for twice
    assert s["rate_limited"] <= 0.01 * s["requests"]  # the real limits: respected
    assert result.stats.rate_limited == injected["429"] + s["rate_limited"]
