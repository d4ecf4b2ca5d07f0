"""Benchmark: an embeddings job on the unlimited simulator, batched vs one row per request.

Target (issue 5): batched rows/s at least 20x the rows/s of a one-row-per-request run.
Run: .venv/bin/python bench/embed.py [ROWS]
"""

from __future__ import annotations

import sys

from common import WORK, dataset, simulator, timed_run


def embed_job(name: str, rows: int, batch_size: int) -> object:
    job = WORK / f"{name}.toml"
    job.write_text(f'''name = "{name}"
[input]
path = "{dataset(rows)}"
id = "review_id"
[request]
endpoint = "embeddings"
model = "text-embedding-3-small"
input = "{{{{ product }}}}: {{{{ text }}}}"
dimensions = 256
batch_size = {batch_size}
[output]
path = "{WORK / 'out' / name}.parquet"
[limits]
concurrency = 64
''')
    return job


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    results = {}
    with simulator() as url:
        for label, batch in (("one row per request", 1), ("batched (512 per request)", 512)):
            r = timed_run(embed_job(f"embed-{batch}", rows, batch), url)
            m = r["manifest"]
            results[label] = rows / m["duration_s"]
            print(f"{label}: {rows:,} rows in {m['duration_s']:.2f} s -> {results[label]:,.0f} rows/s, "
                  f"{m['totals']['requests_sent']:,} requests, peak RSS {r['peak_rss_mib']:,.0f} MiB")
    ratio = results["batched (512 per request)"] / results["one row per request"]
    print(f"ratio: {ratio:.1f}x  [target >= 20x]")


if __name__ == "__main__":
    main()
