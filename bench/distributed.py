"""Benchmark: the Ray engine against the simulator (in its own process on 127.0.0.1).

1. unlimited server, 20,000 rows: rows/s with 1, 2 and 4 workers (sending time, first to last request, and wall
   time including Ray's start)
2. 4 workers against RPM=6,000 on a token-bucket server that starts empty: the fraction of the limit held and the
   share of 429s
3. the driver's peak RSS with 10 and with 1,000 partitions

Each run is a child process (its own Ray, started and stopped by the run). This machine has 2 cores: the
simulator, the driver and every worker share them, so more workers cannot show more speed here; the figures say
what the engine costs, not how it scales on a cluster.

Run: .venv/bin/python bench/distributed.py [--quick]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from common import WORK, dataset, sim_stats, simulator

RUNNER = textwrap.dedent("""\
    import json, resource, sys, time
    from pipeline.engines.ray_engine import run_ray
    from pipeline.job import load_job
    t = time.perf_counter()
    r = run_ray(load_job(sys.argv[1]), fresh=True)
    wall = time.perf_counter() - t
    print(json.dumps({"wall_s": wall, "exit": r.exit_code, "partitions": r.partitions,
                      "requests": r.stats.requests_sent, "rate_limited": r.stats.rate_limited,
                      "driver_peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
""")


def write_job(name: str, data: Path, url: str, *, workers: int, partition_rows: int, concurrency: int = 128,
              rpm: int | None = None) -> Path:
    limits = f"concurrency = {concurrency}\n" + (f"requests_per_minute = {rpm}\n" if rpm else "")
    job = WORK / f"{name}.toml"
    job.write_text(f'''name = "{name}"
[input]
path = "{data}"
id = "review_id"
keep = ["product", "rating"]
[request]
model = "gpt-4o-mini"
system = "You summarise customer reviews in one sentence."
prompt = "Summarise this {{{{ rating }}}}-star review of {{{{ product }}}}:\\n\\n{{{{ text }}}}"
max_tokens = 120
[output]
path = "{WORK / 'out' / name}.parquet"
[api]
base_url = "{url}"
[limits]
{limits}
[engine]
kind = "ray"
workers = {workers}
partition_rows = {partition_rows}
''')
    return job


def regrouped(rows: int, group: int) -> Path:
    """The bench reviews with row groups of ``group`` rows (partitions are cut at row groups)."""
    import pyarrow.parquet as pq

    path = WORK / f"reviews-{rows}-rg{group}.parquet"
    if not path.exists():
        pq.write_table(pq.read_table(dataset(rows)), path, row_group_size=group)
    return path


def ray_run(job: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", RUNNER, str(job)], capture_output=True, text=True,
                         env={**os.environ, "OPENAI_API_KEY": "sk-bench"}, check=False)
    if out.returncode != 0:
        raise SystemExit(f"run failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def sending_s(stats: dict[str, Any]) -> float:
    return max(1e-9, (stats["last_request_at"] or 0) - (stats["first_request_at"] or 0))


def main() -> None:
    quick = "--quick" in sys.argv
    rows = 5_000 if quick else 20_000
    data = regrouped(rows, 1_000)
    for workers in (1, 2, 4):
        with simulator() as url:
            r = ray_run(write_job(f"ray-unlimited-{workers}", data, url, workers=workers, partition_rows=2_500))
            s = sim_stats(url)
        print(f"[1] unlimited, {rows:,} rows, {workers} worker(s): {s['requests'] / sending_s(s):,.0f} rows/s while "
              f"sending ({sending_s(s):.1f} s), {rows / r['wall_s']:,.0f} rows/s wall ({r['wall_s']:.1f} s incl. "
              f"Ray's start), {r['partitions']} partitions")
    rpm, limited_rows = 6_000, 1_500 if quick else 3_000
    with simulator("--rpm", str(rpm), "--limit-model", "token-bucket", "--start-empty", "--latency-ms", "200") as url:
        r = ray_run(write_job("ray-limited", regrouped(limited_rows, 250), url, workers=4, partition_rows=500,
                              concurrency=64, rpm=rpm))
        s = sim_stats(url)
    held = s["ok"] / sending_s(s) * 60 / rpm
    print(f"[2] 4 workers, RPM={rpm:,} token bucket starting empty, 200 ms latency, {limited_rows:,} rows: "
          f"{held:.1%} of the limit, {s['rate_limited']} 429s ({s['rate_limited'] / max(s['requests'], 1):.2%})  "
          "[target <= 0.5% 429s]")
    for parts, group in ((10, 2_000), (1_000, 20)):
        with simulator() as url:
            r = ray_run(write_job(f"ray-partitions-{parts}", regrouped(20_000, group), url, workers=4,
                                  partition_rows=group))
        print(f"[3] {r['partitions']:,} partitions (20,000 rows): driver peak RSS {r['driver_peak_rss_mib']:,.0f} MiB, "
              f"wall {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
