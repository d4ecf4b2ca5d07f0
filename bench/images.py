"""Benchmark: a 10,000-image job against a 10,000-row text job on the unlimited simulator.

Target (issue 15): the image job's peak RSS within 50 MiB of the text job's (an image is read when its request
is built and let go once it is sent), and its rows/s. Each image is a distinct JPEG of random noise (noise
does not compress: about 35 KB each, so the bodies carry about 470 MB of base64 in all), made once under
bench/data/. The two jobs are the same but for the image: same rows, prompt, model and concurrency.
Run: .venv/bin/python bench/images.py [ROWS] [RUNS]
"""

from __future__ import annotations

import io
import statistics
import sys
from pathlib import Path

import numpy as np
import polars as pl
from common import WORK, dataset, simulator, timed_run


def photos(rows: int) -> Path:
    """The reviews of ``rows`` rows with a ``file`` column naming one distinct JPEG each (made once)."""
    from PIL import Image

    folder = WORK / f"photos-{rows}"
    table = WORK / f"reviews-photos-{rows}.parquet"
    if table.exists() and len(list(folder.glob("*.jpg"))) == rows:
        return table
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(15)
    for i in range(rows):
        pixels = rng.integers(0, 256, size=(192, 256, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=75)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())
    (pl.read_parquet(dataset(rows)).with_columns(
        (pl.lit(f"{folder.name}/") + pl.int_range(pl.len()).cast(pl.String).str.zfill(6) + ".jpg").alias("file"))
     .write_parquet(table))
    return table


def job(name: str, data: Path, images: bool) -> Path:
    """The same chat job over the same rows, with or without the row's image."""
    path = WORK / f"{name}.toml"
    extra = 'images = [{ source = "{{ file }}", detail = "low" }]\n' if images else ""
    path.write_text(f'''name = "{name}"
[input]
path = "{data}"
id = "review_id"
keep = ["product"]
[request]
model = "gpt-4.1-mini"
system = "You describe product photos in one sentence."
prompt = "Describe the photo of the {{{{ product }}}} this review is about: {{{{ text }}}}"
max_tokens = 60
{extra}[output]
path = "{WORK / 'out' / name}.parquet"
[limits]
concurrency = 64
''')
    return path


def measure(path: Path, url: str, runs: int) -> dict[str, float]:
    """Median rows/s and peak RSS over ``runs`` fresh runs."""
    got = []
    for _ in range(runs):
        r = timed_run(path, url)
        m = r["manifest"]
        got.append({"rows_per_s": m["totals"]["rows"] / m["duration_s"], "peak_rss_mib": r["peak_rss_mib"],
                    "wall_s": r["wall_s"], "ok": m["totals"]["ok"]})
    return {k: statistics.median(g[k] for g in got) for k in got[0]}


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    data = photos(rows)
    image_bytes = sum(f.stat().st_size for f in (WORK / f"photos-{rows}").glob("*.jpg"))
    with simulator() as url:
        text = measure(job(f"text-{rows}", data, images=False), url, runs)
        image = measure(job(f"images-{rows}", data, images=True), url, runs)
    delta = image["peak_rss_mib"] - text["peak_rss_mib"]
    print(f"[1] text job, {rows:,} rows: {text['rows_per_s']:,.0f} rows/s, peak RSS {text['peak_rss_mib']:,.0f} MiB "
          f"(wall {text['wall_s']:.1f} s, {text['ok']:,.0f} ok)")
    print(f"[2] image job, {rows:,} images ({image_bytes / 1e6:,.0f} MB of JPEG): {image['rows_per_s']:,.0f} rows/s, "
          f"peak RSS {image['peak_rss_mib']:,.0f} MiB (wall {image['wall_s']:.1f} s, {image['ok']:,.0f} ok)")
    print(f"[3] peak RSS, image job minus text job: {delta:+,.0f} MiB  [target: within 50 MiB]  "
          f"(median of {runs} runs each)")


if __name__ == "__main__":
    main()
