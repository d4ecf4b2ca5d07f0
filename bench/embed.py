"""Benchmark: an embeddings job on the unlimited simulator, batched vs one row per request.

Target (issue 5): batched rows/s at least 20x the rows/s of a one-row-per-request run.
Each setting runs several times (a fresh output each time) and the median counts: on a 2-core machine one run
of the batched job (about half a second) varies by +-20%.
Run: .venv/bin/python bench/embed.py [ROWS] [RUNS]
"""

from __future__ import annotations

import statistics
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
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    results = {}
    with simulator() as url:
        # The one-row run takes ~10 s and varies less: fewer repeats.
        for label, batch, repeats in (("one row per request", 1, max(1, runs // 2)),
                                      ("batched (512 per request)", 512, runs)):
            measured = [timed_run(embed_job(f"embed-{batch}", rows, batch), url) for _ in range(repeats)]
            times = [r["manifest"]["duration_s"] for r in measured]
            results[label] = rows / statistics.median(times)
            m = measured[-1]["manifest"]
            print(f"{label}: {rows:,} rows, median {statistics.median(times):.2f} s of {len(times)} runs "
                  f"({', '.join(f'{t:.2f}' for t in times)}) -> {results[label]:,.0f} rows/s, "
                  f"{m['totals']['requests_sent']:,} requests, peak RSS "
                  f"{max(r['peak_rss_mib'] for r in measured):,.0f} MiB")
    ratio = results["batched (512 per request)"] / results["one row per request"]
    print(f"ratio: {ratio:.1f}x  [target >= 20x]")


if __name__ == "__main__":
    main()
