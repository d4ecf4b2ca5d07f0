"""`make demo-ray`: the summarise job on the Ray engine against the bundled simulator.

A local Ray is started and stopped by the run; the job's partitions run as Ray tasks under one global rate
budget and commit their answers in chunks, into a folder readable as one Parquet dataset.
"""

from __future__ import annotations

import os
import subprocess
import sys

from demo import ROOT, say, sh

from pipeline.sim import simulator_process

JOB = "jobs/summarise_ray.toml"


def main() -> int:
    say("Starting the local OpenAI-compatible simulator (answers come from rules, not from a model)")
    try:
        with simulator_process("--rpm", "6000", "--latency-ms", "60", "--seed", "7",
                               stderr=subprocess.DEVNULL) as (url, _):
            os.environ["PIPELINE_BASE_URL"] = url
            print(f"$ export PIPELINE_BASE_URL={url}")
            say(f"{JOB}: the summaries again, on the Ray engine")
            code = sh("run", JOB, "--yes", "--fresh")
            sh("report", "out/review-summaries-ray")
            say(f"Done: {ROOT / 'out' / 'review-summaries-ray'} is a folder of Parquet chunks, one dataset.")
            return 0 if code in (0, 1) else code
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
