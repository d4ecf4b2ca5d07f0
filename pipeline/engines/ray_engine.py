"""The Ray engine: the same job on a Ray cluster, partition by partition, under one global rate budget.

The driver plans partitions from listings and footers (no row passes through it), records in its journal which
partitions are finished, and keeps at most ``workers`` tasks running. Each task runs ``run_partition`` (the
local engine's scheduler and senders on its slice) and commits its answers to the output dataset itself. One
named async actor per run wraps ``GlobalBudget``; tasks lease from it. Ray retries a task whose worker died
(``TASK_RETRIES``); the retry skips what the dead attempt committed, and a rerun of the job skips finished
partitions and committed chunks alike.

Only this module imports Ray, and only when the Ray engine is asked for.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.access import check_transport_security, resolve_api_key, resolve_base_url
from pipeline.endpoints import endpoint_of
from pipeline.engines.commit import committed, covered
from pipeline.engines.partitions import Partition, plan_partitions
from pipeline.engines.task import TaskSpec, run_partition
from pipeline.errors import (
    AbortError,
    Interrupted,
    OutputError,
    PipelineError,
    StopRun,
    UsageError,
)
from pipeline.job import Job
from pipeline.journal import Journal, journal_fingerprint
from pipeline.outcome import RunStats
from pipeline.plan import check, manifest_of, stop_from
from pipeline.runlock import RunLock
from pipeline.sink import OutputPaths, claim_output, move_aside, read_manifest, write_manifest
from pipeline.storage import filesystem, is_url, manifest_url, pull_manifest, upload

TASK_RETRIES = 3          # a task whose worker dies is run again this many times
WAIT_S = 0.5              # how often the driver looks at its tasks (and reports progress)
PARTITIONS_TABLE = """CREATE TABLE IF NOT EXISTS partitions (
    id TEXT PRIMARY KEY, file TEXT NOT NULL, row_start INTEGER NOT NULL, rows INTEGER NOT NULL,
    status TEXT NOT NULL, totals TEXT, finished_at TEXT)"""


@dataclass
class RayRun:
    """How a Ray run ended: the dataset, its manifest, the summed totals, and the reason if it stopped."""

    output: Path | str
    manifest: Path
    stats: RunStats
    partitions: int
    partitions_done: int
    stopped: PipelineError | None = None
    manifest_data: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """As a local run's: 0 all answered, 1 some failed, 3 stopped."""
        if self.stopped is not None:
            return self.stopped.exit_code
        return 1 if self.stats.failed else 0


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("the Ray engine needs Ray: pip install 'llm-pipeline[ray]'") from None
    return ray


_ACTOR: Any = None


def _actor_class(ray: Any) -> Any:
    """The budget actor, defined once Ray is imported: a thin async wrapper around ``GlobalBudget``."""
    global _ACTOR
    if _ACTOR is None:
        from pipeline.engines.budget import GlobalBudget, Lease, Report

        class BudgetActor:
            def __init__(self, rpm: int | None, tpm: int | None, max_cost_usd: float | None) -> None:
                self.budget = GlobalBudget(rpm, tpm, max_cost_usd=max_cost_usd, clock=time.monotonic)

            async def lease(self, worker: str, wanted: list[int], report: Report) -> Lease:
                return self.budget.lease(worker, wanted, report)

            async def cooldown(self, worker: str, seconds: float, report: Report) -> None:
                self.budget.cooldown(worker, seconds, report)

            async def totals(self) -> dict[str, Any]:
                return self.budget.totals()

        # Restarted if its process dies (with empty buckets: no burst) and never blocks: every method is async.
        _ACTOR = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(BudgetActor)
    return _ACTOR


def _task(spec: TaskSpec, actor: Any) -> dict[str, Any]:
    """The Ray task: a partition run with the actor's lease and cooldown calls (a fresh worker id per attempt,
    since a retried attempt's totals start from zero)."""
    worker = f"{spec.worker}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return run_partition(spec, lambda wanted, report: actor.lease.remote(worker, wanted, report),
                         lambda seconds, report: actor.cooldown.remote(worker, seconds, report))


def dataset_of(job: Job) -> str:
    """The output dataset: a folder (or object-storage prefix) of chunk files at ``[output].path``."""
    return job.output.path


def run_ray(job: Job, *, base_url: str | None = None, address: str | None = None, workers: int | None = None,
            fresh: bool = False, allow_insecure: bool = False,
            on_progress: Callable[[RunStats, int, int], None] | None = None,
            sink_wrapper: Callable[[Any], Any] | None = None) -> RayRun:
    """Run a job on Ray; resumes from the driver's journal and the committed chunks unless ``fresh``.

    ``on_progress(stats, partitions_finished, partitions_to_run)`` is called as each task ends. ``sink_wrapper``
    goes in front of every task's sink (the tests' fault injection: ``engines.task.TaskSpec``)."""
    t0, started = time.monotonic(), datetime.now(tz=UTC)
    if not endpoint_of(job.request.endpoint).ray:
        raise UsageError(f'{job.source}: endpoint = "{job.request.endpoint}" runs on the local engine only')
    checked = check(job)
    url = resolve_base_url(job, base_url)
    check_transport_security(url, resolve_api_key(job, url) is not None, allow_insecure)
    workers = workers or job.engine.workers
    address = address or job.engine.address
    dataset = dataset_of(job)
    remote = is_url(dataset)
    if remote:
        pull_manifest(job)
    paths = OutputPaths(Path(job.output.local))
    lock = RunLock(paths.output)
    lock.acquire()  # one run of this job at a time, whichever engine (the local one takes the same lock)
    try:
        if not remote and Path(dataset).is_file():
            raise OutputError(f"{dataset}: is a file (the local engine's output); the Ray engine writes a folder of "
                              "chunks there: choose another [output].path or remove the file")
        claim_output(paths, job.name, job.fingerprint(), journal_owner=journal_fingerprint(paths.journal))
        earlier = [] if fresh else (read_manifest(paths) or {}).get("runs") or []
        # Ours from the first moment: a driver stopped before its end leaves a folder a rerun may resume.
        write_manifest(paths, {"job": job.name, "fingerprint": job.fingerprint(), "status": "running",
                               "engine": {"kind": "ray"}, "output": dataset, "runs": earlier})
        if fresh:
            move_aside(paths.journal)
            _clear(dataset, job)
        if not remote:
            Path(dataset).mkdir(parents=True, exist_ok=True)
        parts = plan_partitions(checked.source, job.fingerprint(), job.engine.partition_rows)
        journal = Journal(paths.journal, check=True)
        try:
            owner = journal.get_meta("fingerprint")
            if owner is not None and owner != job.fingerprint():
                raise OutputError(f"{paths.journal}: the journal belongs to another job; use --fresh to start over")
            journal.set_meta("fingerprint", job.fingerprint())
            db = journal.db
            db.execute(PARTITIONS_TABLE)
            finished = {r[0] for r in db.execute("SELECT id FROM partitions WHERE status = 'done'")}
            chunks = committed(dataset, job.storage.endpoint_url)
            stale = _drop_stale(dataset, job, chunks, {p.id for p in parts})
            todo = [p for p in parts if p.id not in finished and covered(chunks.get(p.id, [])) < p.rows]
            for p in parts:  # every partition planned is on record; some finished by a task whose result the driver
                if p.id not in finished:  # never saw (it was stopped): their chunks say so
                    _mark(db, p, "todo" if p in todo else "done", {})
            stats, stopped, engine = _drive(job, url, address, workers, todo, dataset, db, on_progress,
                                            sink_wrapper)
        finally:
            journal.close()
        chunks = committed(dataset, job.storage.endpoint_url)
        rows_in_output = sum(covered(chunks.get(p.id, [])) for p in parts)
        done = sum(1 for p in parts if covered(chunks.get(p.id, [])) >= p.rows)
        manifest = _manifest(job, checked, url, paths, dataset, stats, stopped, started, t0, rows_in_output,
                             {**engine, "kind": "ray", "address": address or "local", "workers": workers,
                              "partitions": len(parts), "partitions_done": done, "partitions_run": len(todo),
                              "stale_chunks_removed": stale, "commit_rows": job.engine.commit_rows}, earlier)
        write_manifest(paths, manifest)
        if remote:
            upload(paths.manifest, manifest_url(dataset), job.storage.endpoint_url)
        return RayRun(output=dataset if remote else Path(dataset), manifest=paths.manifest, stats=stats,
                      partitions=len(parts), partitions_done=done, stopped=stopped, manifest_data=manifest)
    finally:
        lock.release()


def _drive(job: Job, url: str, address: str | None, workers: int, todo: list[Partition], dataset: str, db: Any,
           on_progress: Callable[[RunStats, int, int], None] | None,
           sink_wrapper: Callable[[Any], Any] | None = None) -> tuple[RunStats, PipelineError | None, dict[str, Any]]:
    """Run the partitions still to do, ``workers`` at a time; sum their totals."""
    stats = RunStats(rows_total=sum(p.rows for p in todo))
    if not todo:
        return stats, None, {}
    # Ray reports usage statistics to its makers unless told not to: nothing here leaves the machine unasked.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, configure_logging=True, logging_level="ERROR")
    stopped: PipelineError | None = None
    engine: dict[str, Any] = {}
    actor = None
    try:
        lim = job.limits
        actor = _actor_class(ray).options(name=f"pipeline-budget-{job.fingerprint()}-{uuid.uuid4().hex[:8]}",
                                          namespace="pipeline").remote(
            lim.requests_per_minute, lim.tokens_per_minute, job.budget.max_cost_usd)
        remote_task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_task)
        share = max(1, lim.concurrency // workers)
        queue = list(todo)
        running: dict[Any, Partition] = {}
        interrupted = False
        finished = 0
        while queue or running:
            while queue and len(running) < workers and stopped is None:
                p = queue.pop(0)
                spec = TaskSpec(job=job, partition=p, dataset=dataset, url=url, concurrency=share, worker=p.id,
                                workers=workers, sink_wrapper=sink_wrapper)
                running[remote_task.remote(spec, actor)] = p
            if not running:
                break
            try:
                ready, _ = ray.wait(list(running), num_returns=1, timeout=WAIT_S)
            except (KeyboardInterrupt, Interrupted) as e:
                if interrupted:  # a second Ctrl-C: leave now (what the tasks committed stays)
                    raise
                interrupted = True
                stopped = e if isinstance(e, Interrupted) else Interrupted("stopped by SIGINT")
                # A cancelled task gets a KeyboardInterrupt, stops its scheduler and commits what it holds.
                for ref in running:
                    ray.cancel(ref)
                continue
            for ref in ready:
                p = running.pop(ref)
                result = _result(ray, ref, p)
                _add(stats, result)
                if result.get("error") is not None and stopped is None:
                    stopped = result["error"]
                elif result.get("stopped") is not None and stopped is None:
                    s = result["stopped"]
                    stopped = stop_from(s)
                    if s["kind"] != "budget":  # a budget stop reaches every task through its leases
                        for other in running:
                            ray.cancel(other)
                if result["committed_before"] + result["committed"] >= p.rows:
                    _mark(db, p, "done", result["totals"])
                    finished += 1
                if on_progress is not None:
                    on_progress(stats, finished, len(todo))
        engine["budget"] = ray.get(actor.totals.remote())
    finally:
        if actor is not None:
            ray.kill(actor)
        if started_here:
            ray.shutdown()
    return stats, stopped, engine


def _result(ray: Any, ref: Any, p: Partition) -> dict[str, Any]:
    """A task's result; a task that raised (or whose worker died more than ``TASK_RETRIES`` times) becomes an
    error naming its partition."""
    try:
        return ray.get(ref)
    except ray.exceptions.TaskCancelledError:
        return _empty(p, None)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PipelineError):
            return _empty(p, cause if isinstance(cause, StopRun | AbortError) else StopRun(str(cause)))
        return _empty(p, StopRun(f"partition {p.id} ({p.file}, rows {p.row_start}-{p.row_end - 1}) failed: "
                                 f"{str(e).strip().splitlines()[-1][:300]}"))
    except ray.exceptions.RayError as e:
        return _empty(p, StopRun(f"partition {p.id} ({p.file}) was lost: {type(e).__name__} (its worker died "
                                 f"{TASK_RETRIES + 1} times); committed rows are kept, rerun to resume"))


def _empty(p: Partition, error: PipelineError | None) -> dict[str, Any]:
    return {"partition": p.id, "rows": p.rows, "committed_before": 0, "committed": 0, "chunks": 0,
            "totals": RunStats().totals(), "errors": {}, "stopped": None, "error": error}


def _add(stats: RunStats, result: dict[str, Any]) -> None:
    stats.add_totals(result["totals"], result["errors"])


def _mark(db: Any, p: Partition, status: str, totals: dict[str, Any]) -> None:
    import json

    db.execute("INSERT OR REPLACE INTO partitions VALUES (?, ?, ?, ?, ?, ?, ?)",
               (p.id, p.file, p.row_start, p.rows, status, json.dumps(totals), datetime.now(tz=UTC).isoformat()))


def _clear(dataset: str, job: Job) -> None:
    """--fresh: the dataset's chunks go (the local engine's --fresh rebuilds its output file too)."""
    if is_url(dataset):
        fs, path = filesystem(dataset, job.storage.endpoint_url)
        try:
            fs.delete_dir_contents(path.rstrip("/"), missing_dir_ok=True)
        except OSError as e:
            raise OutputError(f"{dataset}: cannot clear the dataset: {e}") from None
    else:
        shutil.rmtree(dataset, ignore_errors=True)


def _drop_stale(dataset: str, job: Job, chunks: dict[str, list[tuple[int, int]]], current: set[str]) -> int:
    """Chunks of partitions the input no longer has (a file changed or went): they describe rows that are not
    in the input any more, so they leave the dataset, as a local run's output holds only the input's rows."""
    from pipeline.engines.commit import chunk_name

    stale = [(pid, lo, hi) for pid, ranges in chunks.items() if pid not in current for lo, hi in ranges]
    for pid, lo, hi in stale:
        name = chunk_name(pid, lo, hi)
        if is_url(dataset):
            fs, path = filesystem(dataset, job.storage.endpoint_url)
            fs.delete_file(f"{path.rstrip('/')}/{name}")
        else:
            (Path(dataset) / name).unlink(missing_ok=True)
    return len(stale)


def _manifest(job: Job, checked: Any, url: str, paths: OutputPaths, dataset: str, stats: RunStats,
              stopped: PipelineError | None, started: datetime, t0: float, rows: int,
              engine: dict[str, Any], earlier: list[dict[str, Any]]) -> dict[str, Any]:
    return manifest_of(job, url=url, mode="online", status="complete" if stopped is None else "stopped",
                       stopped=stopped, output=dataset, rows=rows, stats=stats, price=checked.price,
                       started=started, t0=t0, journal=str(paths.journal), earlier=earlier,
                       extra={"engine": engine})


__all__ = ["RayRun", "dataset_of", "run_ray"]
