"""Benchmark: `pipeline.map` over a polars frame against `pipeline run` of the same rows from Parquet.

Both against the unlimited simulator in its own process, 100,000 rows, in the same hour, each in a child process
of its own (so their peak RSS are comparable): requests per second over the run (the manifest's duration) and
the whole process's peak RSS. Targets (issue "DataFrame API"): requests/s within 5%, peak RSS within 1.2x.

With ``--doors N``: the SQL doors (DuckDB: the ``llm()`` Arrow UDF, and ``map_query``) against ``map`` on N rows'
text, requests per second of the whole call, each in a child process.

Run: .venv/bin/python bench/frames.py [--rows N] [--doors N]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from common import WORK, dataset, sim_stats, simulator, timed_run, write_job

MAP = """
import json, sys, polars as pl, pipeline
df = pl.read_parquet(sys.argv[1]).select("review_id", "product", "rating", "text")
out = pipeline.map(df, model="gpt-4o-mini", system="You summarise customer reviews in one sentence.",
                   prompt=sys.argv[4], max_tokens=120, concurrency=128, base_url=sys.argv[2], workdir=sys.argv[3])
print(json.dumps({"rows": out.height, "ok": int((out["status"] == "ok").sum())}))
"""


def timed_map(data: str, url: str, prompt: str) -> dict:
    with tempfile.TemporaryDirectory(dir=WORK) as workdir:
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", MAP, data, url, workdir, prompt], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "OPENAI_API_KEY": "sk-bench"})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        out = proc.stdout.read() if proc.stdout else ""
        if os.waitstatus_to_exitcode(status) != 0:
            raise SystemExit(f"map failed: {(proc.stderr.read() if proc.stderr else '')[-2000:]}")
        manifest = next(p for p in __import__("pathlib").Path(workdir).rglob("output.manifest.json"))
        m = json.loads(manifest.read_text())
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "manifest": m, "result": json.loads(out)}


DOORS = """
import json, sys, time, duckdb, polars as pl, pipeline, pipeline.sql
data, url, workdir, door = sys.argv[1:5]
keys = dict(model="gpt-4o-mini", prompt="Summarise this review: {{ text }}", max_tokens=120, concurrency=128,
            base_url=url, workdir=workdir, progress=False)
t = time.perf_counter()
if door == "sql":
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    pipeline.sql.register(con, **keys)
    rows = con.execute(f"SELECT llm(text) FROM read_parquet('{data}')").fetchall()
    n = len(rows)
elif door == "query":
    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    n = len(pipeline.sql.map_query(con, f"SELECT text FROM read_parquet('{data}')", **keys).fetchall())
else:
    n = pipeline.map(pl.read_parquet(data).select("text"), **keys).height
print(json.dumps({"rows": n, "s": time.perf_counter() - t}))
"""


def door(data: str, url: str, which: str) -> float:
    """Seconds for the whole query or map call (the same measure for both doors), in a child process."""
    with tempfile.TemporaryDirectory(dir=WORK) as workdir:
        out = subprocess.run([sys.executable, "-c", DOORS, data, url, workdir, which], capture_output=True,
                             text=True, env={**os.environ, "OPENAI_API_KEY": "sk-bench"}, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["s"])  # the last line: the figures


def doors(rows: int) -> None:
    """The SQL doors (the ``llm()`` UDF, and ``map_query``) against map, on the text column of ``rows`` rows:
    requests per second of the whole call."""
    data = dataset(rows)
    best: dict[str, float] = {}
    for which in ("map", "sql", "query", "map", "sql", "query"):
        with simulator() as url:
            seconds = door(str(data), url, which)
            sent = sim_stats(url)["requests"]
        best[which] = max(best.get(which, 0.0), sent / seconds)
        print(f"{which}: {sent:,} requests in {seconds:.1f} s: {sent / seconds:,.0f} req/s", flush=True)
    print(f"best of 2 each, {rows:,} rows: requests per second against map's: llm() UDF "
          f"{best['sql'] / best['map']:.3f}, map_query {best['query'] / best['map']:.3f}")


def main() -> None:
    if "--doors" in sys.argv:
        doors(int(sys.argv[sys.argv.index("--doors") + 1]))
        return
    rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else 100_000
    data = dataset(rows)
    from common import PROMPT

    job = write_job(f"frames-{rows}", data, concurrency=128)
    figures = {}
    for name in ("run", "map", "run", "map"):  # alternated: the machine's pace drifts within the hour
        with simulator() as url:
            r = timed_run(job, url) if name == "run" else timed_map(str(data), url, PROMPT)
        m = r["manifest"]
        sent = m["totals"]["requests_sent"]
        rate = sent / m["duration_s"]
        best = figures.get(name)
        if best is None or rate > best["req_per_s"]:
            figures[name] = {"req_per_s": rate, "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"],
                             "sent": sent}
        print(f"{name}: {sent:,} requests, {rate:,.0f} req/s over {m['duration_s']:.1f} s (wall {r['wall_s']:.1f} s), "
              f"peak RSS {r['peak_rss_mib']:,.0f} MiB", flush=True)
    a, b = figures["run"], figures["map"]
    print(f"best of 2 each, {rows:,} rows: map/run requests per second {b['req_per_s'] / a['req_per_s']:.3f} "
          f"[target >= 0.95]; peak RSS map/run {b['peak_rss_mib'] / a['peak_rss_mib']:.2f} [target <= 1.2]")


if __name__ == "__main__":
    main()
