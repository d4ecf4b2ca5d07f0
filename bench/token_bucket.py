"""Benchmark: `pipeline run` against a server that enforces a continuous token bucket per minute.

The simulator's ``--limit-model token-bucket``: capacity = the per-minute limit, refilled continuously, starting
full or (``--start-empty``) drained the way a busy account's bucket is; TPM is charged at admission as
``max_tokens`` plus the prompt counted exactly or (``--tpm-count chars``) the way OpenAI documents its own
estimate, about 4 characters a token. Each scenario prints the 429s received (share of rows), the fraction of
the server's floor reached (the floor: the time the binding limit needs for what is sent beyond the bucket's
starting level, against the time from the first to the last request the server admitted; vacuous when the
starting bucket holds the whole job) and the admitted rate as a share of the binding limit's rate.

Run: .venv/bin/python bench/token_bucket.py [--quick]   (quick: 10x the limits, ~10 s per scenario)
Not part of `make bench` (it takes ~7 minutes at the issue's RPM 600 / TPM 60,000).
"""

from __future__ import annotations

import sys

from common import dataset, sim_stats, simulator, timed_run, write_job

ROWS = 1_000
MAX_TOKENS = 40


def scenario(name: str, rpm: int, tpm: int, *flags: str) -> dict[str, float]:
    data = dataset(ROWS)
    job = write_job(f"tb-{name}", data, concurrency=64, rpm=rpm, tpm=tpm, max_tokens=MAX_TOKENS)
    with simulator("--rpm", str(rpm), "--tpm", str(tpm), "--latency-ms", "100", "--latency-jitter-ms", "50",
                   "--limit-model", "token-bucket", *flags) as url:
        run = timed_run(job, url)
        stats = sim_stats(url)
    # from the first request the server saw to the last, plus one request's share: N requests at rate r from an
    # empty bucket take N / r, the first of them admitted after 1 / r
    span = stats["last_request_at"] - stats["first_request_at"]
    charged = run["manifest"]["totals"]
    empty = "--start-empty" in flags
    rpm_floor = max(0.0, ROWS - (0 if empty else rpm)) / rpm * 60
    tokens = charged["prompt_tokens"] + ROWS * MAX_TOKENS  # what the server charged, near enough
    tpm_floor = max(0.0, tokens - (0 if empty else tpm)) / tpm * 60
    floor = max(rpm_floor, tpm_floor)
    rate = max(ROWS / rpm * 60, tokens / tpm * 60)  # seconds the job takes at exactly the binding rate
    span += rate / ROWS
    return {"429s": stats["rate_limited"], "429_share": stats["rate_limited"] / ROWS,
            "fraction_of_floor": floor / span if floor else 1.0, "of_rate": rate / span, "wall_s": run["wall_s"]}


def main() -> None:
    scale = 10 if "--quick" in sys.argv else 1
    rpm, tpm = 600 * scale, 60_000 * scale
    cases = [
        ("rpm-empty", rpm, tpm * 100, "--start-empty"),
        ("rpm-full", rpm, tpm * 100),
        ("tpm-empty", rpm * 100, tpm, "--start-empty"),
        ("tpm-empty-chars", rpm * 100, tpm, "--start-empty", "--tpm-count", "chars"),
    ]
    print(f"token-bucket server, {ROWS:,} rows, max_tokens {MAX_TOKENS}, 100-150 ms latency, limits RPM {rpm:,} / "
          f"TPM {tpm:,} (the binding one as named), the job told the same limits")
    for name, r, t, *flags in cases:
        res = scenario(name, r, t, *flags)
        print(f"  {name:16s} 429s {res['429s']:4d} ({res['429_share']:.1%} of rows)   "
              f"fraction of the floor {res['fraction_of_floor']:.0%}   rate {res['of_rate']:.0%} of the limit   "
              f"wall {res['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
