"""Benchmark: `pipeline estimate` on a 1,000,000-row Parquet input. Prints rows/s and peak RSS.

Target (issue 14): a million rows in under 12 s on 2 cores, peak RSS under 400 MiB.
Run: .venv/bin/python bench/estimate.py [ROWS]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

from common import ROOT, dataset


def _tree(pid: int) -> list[int]:
    """A process and its descendants: the estimate counts tokens in a child past 50,000 texts."""
    todo, found = [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _rss_mib(pids: list[int]) -> float:
    """Resident MiB summed: cheap to read (statm), but it counts pages processes share once for each."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total / 2**20


def _pss_mib(pids: list[int]) -> tuple[float, list[str]]:
    """Proportional set sizes summed (each shared page split among its sharers: what the tree holds), with
    each process's command and share. Reading smaps_rollup walks the page tables, so it is read seldom: every
    20 ms it made the estimate 1-2 s slower."""
    total, members = 0, []
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                pss = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{p}/cmdline", "rb") as f:
                command = f.read(40).replace(b"\0", b" ").decode(errors="replace").strip()
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        total += pss
        members.append(f"{command}: {pss // 1024} MiB")
    return total / 1024, members


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = ROOT / "bench" / "data"
    data = dataset(rows)
    job = work / "estimate-bench.toml"
    job.write_text((ROOT / "jobs" / "summarise.toml").read_text()
                   .replace('path = "../data/reviews.parquet"', f'path = "{data.name}"')
                   .replace('path = "../out/review-summaries.parquet"', 'path = "out/bench.parquet"'))
    t = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/pipeline"), "estimate", str(job), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss, peak_pss, at_peak = [0.0], [0.0], [[]]

    def sample() -> None:
        n = 0
        while proc.poll() is None:
            pids = _tree(proc.pid)
            peak_rss[0] = max(peak_rss[0], _rss_mib(pids))
            if n % 25 == 0:  # every half second
                pss, members = _pss_mib(pids)
                if pss > peak_pss[0]:
                    peak_pss[0], at_peak[0] = pss, members
            n += 1
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out = proc.stdout.read() if proc.stdout else ""
    err = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not every child's of this script
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"estimate failed: {err}")
    est = json.loads(out)
    own_mib = usage.ru_maxrss / 1024
    peak_mib = max(peak_pss[0], own_mib)  # what the tree holds (Pss, every half second), or its own peak
    print(f"rows: {est['rows']:,}  requests: {est['requests']:,}  prompt tokens: {est['prompt_tokens']:,}")
    print(f"wall: {wall:.1f} s  rows/s: {est['rows'] / wall:,.0f}  peak memory: {peak_mib:,.0f} MiB "
          f"(the estimate with its counting process, Pss; the estimate's own peak RSS {own_mib:,.0f} MiB; "
          f"the tree's RSS summed {peak_rss[0]:,.0f} MiB)")
    print(f"at the peak: {'; '.join(at_peak[0])}")
    print(f"targets: < 12 s ({'met' if wall < 12 else 'MISSED'}), "
          f"< 400 MiB ({'met' if peak_mib < 400 else 'MISSED'})")


if __name__ == "__main__":
    main()
