"""Benchmark: `pipeline run` against the simulator (in its own process on 127.0.0.1).

1. unlimited server, ~0 latency, 20,000 rows: requests/s (target >= 1,500 on 2 cores, client and simulator together)
2. RPM=3,000 / TPM=1,000,000 with 200 ms latency: achieved fraction of the binding limit (target >= 97%) and
   the share of requests answered 429 (target <= 1%)
3. peak RSS of the run at 20,000 vs 200,000 rows (target: flat)

Run: .venv/bin/python bench/throughput.py [--quick]
"""

from __future__ import annotations

import sys

from common import dataset, sim_stats, simulator, timed_run, write_job


def unlimited(rows: int) -> dict:
    data = dataset(rows)
    job = write_job(f"unlimited-{rows}", data, concurrency=128)
    with simulator() as url:
        r = timed_run(job, url)
        stats = sim_stats(url)
    m = r["manifest"]
    sent = m["totals"]["requests_sent"]
    return {"rows": rows, "requests": sent, "run_s": m["duration_s"], "wall_s": r["wall_s"],
            "req_per_s": sent / m["duration_s"], "peak_rss_mib": r["peak_rss_mib"],
            "cpu_ms_per_request": r["cpu_s"] * 1000 / max(sent, 1), "sim_requests": stats["requests"]}


def limited(rows: int) -> dict:
    data = dataset(rows)
    rpm, tpm = 3000, 1_000_000
    job = write_job(f"limited-{rows}", data, concurrency=64, rpm=rpm, tpm=tpm)
    with simulator("--rpm", str(rpm), "--tpm", str(tpm), "--latency-ms", "200") as url:
        r = timed_run(job, url)
        stats = sim_stats(url)
    m = r["manifest"]
    sent = m["totals"]["requests_sent"]
    admitted_tokens = m["totals"]["prompt_tokens"] + sent * 120  # what the server charged at admission
    rpm_fraction = sent / m["duration_s"] * 60 / rpm
    tpm_fraction = admitted_tokens / m["duration_s"] * 60 / tpm
    binding = "requests" if rpm_fraction >= tpm_fraction else "tokens"
    return {"rows": rows, "requests": sent, "run_s": m["duration_s"], "binding": binding,
            "fraction_of_limit": max(rpm_fraction, tpm_fraction), "rpm_fraction": rpm_fraction,
            "tpm_fraction": tpm_fraction, "server_429": stats["rate_limited"],
            "share_429": stats["rate_limited"] / max(stats["requests"], 1)}


def main() -> None:
    quick = "--quick" in sys.argv
    a = unlimited(20_000)
    print(f"[1] unlimited, 20,000 rows: {a['req_per_s']:,.0f} req/s over {a['run_s']:.1f} s "
          f"(wall {a['wall_s']:.1f} s incl. estimate), {a['cpu_ms_per_request']:.2f} ms client CPU/request, "
          f"peak RSS {a['peak_rss_mib']:,.0f} MiB  [target >= 1,500 req/s]")
    b = limited(1_500 if quick else 4_500)
    print(f"[2] RPM=3,000 TPM=1,000,000, 200 ms latency, {b['rows']:,} rows: {b['fraction_of_limit']:.1%} of the "
          f"binding {b['binding']} limit (rpm {b['rpm_fraction']:.1%}, tpm {b['tpm_fraction']:.1%}), "
          f"{b['server_429']} 429s ({b['share_429']:.2%})  [target >= 97%, <= 1%]")
    if not quick:
        c = unlimited(200_000)
        print(f"[3] peak RSS: 20,000 rows {a['peak_rss_mib']:,.0f} MiB, 200,000 rows {c['peak_rss_mib']:,.0f} MiB "
              f"(ratio {c['peak_rss_mib'] / a['peak_rss_mib']:.2f}); 200k rows at {c['req_per_s']:,.0f} req/s")


if __name__ == "__main__":
    main()
