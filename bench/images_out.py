"""Benchmark: files out and files in: image generation (``endpoint = "images"``) and transcription
(``endpoint = "transcriptions"``) against the simulator in its own process.

1. peak RSS of a 10,000-image job against the same job at 1,000 rows, on the unlimited simulator (target: within
   1.2x: an answer's images go to files and are let go, the journal keeps their names and hashes only);
2. an RPM-bound image run (RPM=1,200, 200 ms latency): the achieved share of the limit's floor duration
   (target >= 98%, as chat jobs at the binding limit), and the 429s the server answered;
3. peak RSS of a 2,000-file transcription job against the same job at 1,000 files (target: within 1.2x: a file is
   streamed when its request is sent);
4. an RPM-bound transcription run (RPM=1,200, 200 ms latency): the share of the limit's floor (target >= 98%).

Each image row asks for one 1024x1024 PNG at low quality (the simulator makes a real image per row, distinct by
prompt); each transcription row uploads its own 2-second WAV (made once under bench/data/, distinct by content).
Run: .venv/bin/python bench/images_out.py [--quick]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import WORK, dataset, sim_stats, simulator, timed_run


def image_job(name: str, data: Path, *, concurrency: int = 64, rpm: int | None = None) -> Path:
    limits = f"concurrency = {concurrency}\n" + (f"requests_per_minute = {rpm}\n" if rpm else "")
    job = WORK / f"{name}.toml"
    job.write_text(f'''name = "{name}"
[input]
path = "{data}"
id = "review_id"
keep = ["product"]
[request]
endpoint = "images"
model = "gpt-image-1.5"
prompt = {json.dumps("A catalogue photo of the {{ product }} this review is about: {{ text }}")}
size = "1024x1024"
quality = "low"
[output]
path = "{WORK / 'out' / name}.parquet"
[api]
provider = "openai"
[limits]
{limits}''')
    return job


def unlimited(job: Path) -> dict:
    """``job`` on the unlimited simulator: its answers, peak RSS and pace."""
    with simulator() as url:
        r = timed_run(job, url)
    m = r["manifest"]
    return {"ok": m["totals"]["ok"], "peak_rss_mib": r["peak_rss_mib"], "run_s": m["duration_s"],
            "req_per_s": m["totals"]["requests_sent"] / m["duration_s"]}


def at_limit(job: Path, rpm: int) -> dict:
    """``job`` against a simulator holding ``rpm`` requests a minute, 200 ms latency. The floor: every request at the
    limit's rate (the client paces evenly at the limit, as for chat jobs in throughput.py); the share is the floor
    over the time the run took."""
    with simulator("--rpm", str(rpm), "--latency-ms", "200") as url:
        r = timed_run(job, url)
        stats = sim_stats(url)
    m = r["manifest"]
    sent = m["totals"]["requests_sent"]
    floor_s = sent / rpm * 60
    return {"sent": sent, "run_s": m["duration_s"], "floor_s": floor_s,
            "share": floor_s / m["duration_s"] if m["duration_s"] else 0.0, "server_429": stats["rate_limited"]}


def calls(files: int) -> Path:
    """A table of ``files`` distinct 2-second WAV calls (made once), by path."""
    import importlib.util

    import polars as pl

    spec = importlib.util.spec_from_file_location("make_calls", Path(__file__).resolve().parent.parent / "data" /
                                                  "make_calls.py")
    assert spec is not None and spec.loader is not None
    make_calls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_calls)
    folder = WORK / "calls"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"call{i:05d}.wav" for i in range(files)]
    for i, name in enumerate(names):
        if not (folder / name).exists():
            (folder / name).write_bytes(make_calls.wav(2.0, f"Call number {i} about order {10_000 + i}."))
    table = WORK / f"calls-{files}.csv"
    pl.DataFrame({"call_id": [n.removesuffix(".wav") for n in names],
                  "file": [f"calls/{n}" for n in names]}).write_csv(table)
    return table


def transcription_job(files: int, rpm: int | None = None) -> Path:
    name = f"transcribe-{files}" + (f"-rpm{rpm}" if rpm else "")
    job = WORK / f"{name}.toml"
    job.write_text(f'''name = "{name}"
[input]
path = "{calls(files)}"
id = "call_id"
[request]
endpoint = "transcriptions"
model = "whisper-1"
audio = "{{{{ file }}}}"
response_format = "verbose_json"
[output]
path = "{WORK / 'out' / name}.parquet"
[api]
provider = "openai"
[limits]
concurrency = 64
{f"requests_per_minute = {rpm}" if rpm else ""}
''')
    return job


def main() -> None:
    quick = "--quick" in sys.argv
    big = 3_000 if quick else 10_000
    small = unlimited(image_job("images-1000", dataset(1_000)))
    large = unlimited(image_job(f"images-{big}", dataset(big)))
    print(f"[1] peak RSS: {big:,} images {large['peak_rss_mib']:,.0f} MiB vs 1,000 images "
          f"{small['peak_rss_mib']:,.0f} MiB: ratio {large['peak_rss_mib'] / small['peak_rss_mib']:.2f} "
          f"[target <= 1.2]; {large['req_per_s']:,.0f} images/s unlimited ({large['ok']:,} ok)")
    rpm = 1_200
    rows = 1_500 if quick else 3_600
    b = at_limit(image_job(f"images-limited-{rows}", dataset(rows), rpm=rpm), rpm)
    print(f"[2] RPM={rpm:,}, 200 ms latency, {rows:,} rows: {b['run_s']:.1f} s against a floor of "
          f"{b['floor_s']:.1f} s: {b['share']:.1%} of the limit's rate, {b['server_429']} 429s [target >= 98%]")
    few, many = unlimited(transcription_job(1_000)), unlimited(transcription_job(2_000))
    print(f"[3] peak RSS: 2,000 transcriptions {many['peak_rss_mib']:,.0f} MiB vs 1,000 "
          f"{few['peak_rss_mib']:,.0f} MiB: ratio {many['peak_rss_mib'] / few['peak_rss_mib']:.2f} [target <= 1.2]; "
          f"{many['req_per_s']:,.0f} files/s unlimited ({many['ok']:,} ok)")
    files = 1_500 if quick else 2_400
    t = at_limit(transcription_job(files, rpm), rpm)
    print(f"[4] transcription, RPM={rpm:,}, 200 ms latency, {files:,} files: {t['run_s']:.1f} s against a floor "
          f"of {t['floor_s']:.1f} s: {t['share']:.1%} of the limit's rate, {t['server_429']} 429s [target >= 98%]")


if __name__ == "__main__":
    main()
