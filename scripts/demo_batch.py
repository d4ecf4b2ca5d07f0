"""`make demo-batch`: the Batch API flow end to end against the bundled simulator, in under a minute.

Estimate (online vs Batch API price), submit without waiting (what a cron job does), list the batches, then
run again to poll and collect them into the same output table the online mode writes. The simulator
processes batches in seconds instead of hours and fails a few lines on purpose.
"""

from __future__ import annotations

import os
import sys

from demo import ROOT, say, sh

from pipeline.job import Job
from pipeline.sim import simulator_process

JOB = "jobs/classify_nightly.toml"
SIM_ARGS = ["--batch-delay-s", "6", "--batch-line-error-rate", "0.002", "--seed", "7"]


def main() -> int:
    say("Starting the local OpenAI-compatible simulator, with its Batch API (answers come from rules)")
    print("$ pipeline sim --port 0 " + " ".join(SIM_ARGS), flush=True)
    try:
        with simulator_process(*SIM_ARGS, stderr=None) as (url, _):
            return show(url)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1


def show(url: str) -> int:
    say(f"{JOB}: what will it cost online, and through the Batch API?")
    sh("estimate", JOB)
    say("Submit the batches and return at once (a cron job would stop here)")
    if sh("run", JOB, "--base-url", url, "--fresh", "--yes", "--no-wait") != 0:
        return 1
    say("The job's batches, as the provider reports them")
    sh("batches", JOB, "--base-url", url)
    say("Run again: poll until the batches end, then collect their results (nothing is submitted twice)")
    status = sh("run", JOB, "--base-url", url, "--yes")
    say("Report: costs at the Batch API price; the few failed lines can be resent with --retry-failed")
    sh("report", os.path.relpath(Job.load(ROOT / JOB).output.path, ROOT))
    say("Done. The answers above came from the simulator, not from a model.")
    return 0 if status in (0, 1) else status


if __name__ == "__main__":
    sys.exit(main())
