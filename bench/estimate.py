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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tree_memory_mib(pid: int) -> tuple[float, float, list[str]]:
    """(resident, proportional) MiB of a process and its children: the estimate counts tokens in a child past
    100k rows. Resident sizes count pages the two share twice (a child forked and not yet exec'd shares all of
    its parent's, and read 513-515 MiB); the proportional set size (Pss) splits each shared page among its
    sharers, so its sum is what the tree holds. Also each process's command and Pss, to tell what a peak was."""
    rss = pss = 0
    todo, members = [pid], []
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        own = int(line.split()[1])
            with open(f"/proc/{p}/cmdline", "rb") as f:
                command = f.read(40).replace(b"\0", b" ").decode(errors="replace").strip()
            members.append(f"{command}: {own // 1024} MiB")
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return rss / 1024, pss / 1024, members


def main() -> None:
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    work = ROOT / "bench" / "data"
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"reviews-{rows}.parquet"
    if not data.exists():
        # In a process of its own: a child's peak RSS as the kernel reports it starts at its parent's resident
        # size when it was started, and building a million rows here made the first run read 778 MiB.
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                        "from make_reviews import make; make(int(sys.argv[2]), seed=42).write_parquet(sys.argv[3])",
                        str(ROOT / "data"), str(rows), str(data)], check=True)
        print(f"built {data.name} ({rows:,} rows, seed 42) in {time.perf_counter() - t:.1f} s")
    job = work / "estimate-bench.toml"
    job.write_text((ROOT / "jobs" / "summarise.toml").read_text()
                   .replace('path = "../data/reviews.parquet"', f'path = "{data.name}"')
                   .replace('path = "../out/review-summaries.parquet"', 'path = "out/bench.parquet"'))
    t = time.perf_counter()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/pipeline"), "estimate", str(job), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss, peak_pss, at_peak = [0.0], [0.0], [[]]

    def sample() -> None:
        while proc.poll() is None:
            rss, pss, members = _tree_memory_mib(proc.pid)
            if pss > peak_pss[0]:
                peak_pss[0], at_peak[0] = pss, members
            peak_rss[0] = max(peak_rss[0], rss)
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
    peak_mib = max(peak_pss[0], own_mib)  # what the tree holds, sampled every 20 ms, or the process's own peak
    print(f"rows: {est['rows']:,}  requests: {est['requests']:,}  prompt tokens: {est['prompt_tokens']:,}")
    print(f"wall: {wall:.1f} s  rows/s: {est['rows'] / wall:,.0f}  peak memory: {peak_mib:,.0f} MiB "
          f"(the estimate with its counting process, Pss; the estimate's own peak RSS {own_mib:,.0f} MiB; "
          f"the tree's RSS summed {peak_rss[0]:,.0f} MiB)")
    print(f"at the peak: {'; '.join(at_peak[0])}")
    print(f"targets: < 12 s ({'met' if wall < 12 else 'MISSED'}), "
          f"< 400 MiB ({'met' if peak_mib < 400 else 'MISSED'})")


if __name__ == "__main__":
    main()
