"""``pipeline.map(frame, ...)``: a DataFrame in, the same kind of DataFrame out, through the same engine, journal,
limits, budget and estimate as a job file.

A frame (polars ``DataFrame`` or ``LazyFrame``, pandas ``DataFrame``, pyarrow ``Table``) becomes the input of a
job whose keys are given as keywords (or a ``Job``): it is written as Parquet into a work folder, with the
journal and the output beside it, and the answers come back as columns next to the frame's own, one row per input
row in input order. The work folder is named by the job and the frame's columns, so mapping the same frame again
(a notebook cell run twice) pays only for rows not answered yet; ``fresh=True`` starts over. Nothing is written
anywhere the caller did not choose: the default work folder is a per-user cache.

Inside a running event loop (Jupyter, an async app) the run goes to a thread of its own, since the engine runs
its own loop; ``amap`` is the awaitable form.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import Interrupted, UsageError
from pipeline.estimate import Estimate
from pipeline.interrupts import StopSignals
from pipeline.job import Job
from pipeline.outcome import RESULT_SCHEMA
from pipeline.planning import estimate as estimate_job
from pipeline.providers.registry import DESCRIPTORS

ROW_COLUMN = "row"  # the output's id column when the job names none: the input position

# keyword -> (table, key) of the job file; everything not listed goes to [request]
_TABLES = {
    "concurrency": "limits", "requests_per_minute": "limits", "tokens_per_minute": "limits",
    "input_tokens_per_minute": "limits", "output_tokens_per_minute": "limits", "max_attempts": "limits",
    "timeout_s": "limits", "max_cost_usd": "budget", "provider": "api", "base_url": "api", "api_key_env": "api",
    "max_tokens_field": "api", "structured_output": "api", "skip_nulls": "input", "output_tokens": "estimate",
    "poll_interval_s": "batch", "poll_max_interval_s": "batch", "max_requests_per_file": "batch",
    "max_bytes_per_file": "batch", "input_per_mtok": "pricing", "output_per_mtok": "pricing",
    "cached_input_per_mtok": "pricing", "per_audio_minute_usd": "pricing",
}
_TABLES |= {key: "api" for d in DESCRIPTORS.values() for key in d.own_api_keys}  # each provider's own keys
_RENAMED = {"schema": "response_schema"}


def default_workdir() -> Path:
    """The per-user cache folder the work folders of ``map`` live in."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "pipeline" / "map"


def job_keys(name: str = "map", **keys: Any) -> dict[str, Any]:
    """A job file's tables from ``map``'s keywords (``model=``, ``prompt=``, ``schema=``, limits, budget...)."""
    tables: dict[str, dict[str, Any]] = {"request": {}}
    for key, value in keys.items():
        if value is None:
            continue
        key = _RENAMED.get(key, key)
        if key == "response_schema":
            value = json_schema(value)
        tables.setdefault(_TABLES.get(key, "request"), {})[key] = value
    return {"name": name, **tables}


def json_schema(schema: Any) -> dict[str, Any]:
    """The strict JSON Schema of a pydantic model, a dataclass, or a dict of JSON Schema (returned as is)."""
    if isinstance(schema, Mapping):
        return dict(schema)
    try:
        from pydantic import BaseModel, TypeAdapter
    except ImportError:  # pragma: no cover - pydantic comes with the SDKs; a plain dict needs neither
        raise UsageError("schema=: a pydantic model or a dataclass needs pydantic installed; or pass a dict of "
                         "JSON Schema") from None
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        raw = schema.model_json_schema()
    elif dataclasses.is_dataclass(schema):
        raw = TypeAdapter(schema).json_schema()
    else:
        raise UsageError(f"schema=: expected a pydantic model, a dataclass or a dict, got {type(schema).__name__}")
    return _strict(_inline(raw, raw.get("$defs", {})))


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """The schema with its ``$ref``s replaced by the definitions (the typed columns read one tree)."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def _strict(node: Any) -> Any:
    """Structured Outputs' strict subset: every object closed and every property required; no titles."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items() if k not in ("title", "default")}
        if out.get("type") == "object" and "properties" in out:
            out["additionalProperties"] = False
            out["required"] = list(out["properties"])
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _as_polars(frame: Any) -> tuple[pl.DataFrame, str]:
    """The frame as a polars DataFrame, and its kind (to give the same kind back)."""
    if isinstance(frame, pl.DataFrame):
        return frame, "polars"
    if isinstance(frame, pl.LazyFrame):
        return frame.collect(), "lazy"
    module = type(frame).__module__.split(".")[0]
    if module == "pyarrow":
        df = pl.from_arrow(frame)
        assert isinstance(df, pl.DataFrame)
        return df, "arrow"
    if module == "pandas":
        return pl.from_pandas(frame), "pandas"
    raise UsageError(f"map: expected a polars, pandas or pyarrow table, got {type(frame).__name__}")


def _back(df: pl.DataFrame, kind: str) -> Any:
    if kind == "lazy":
        return df.lazy()
    if kind == "arrow":
        return df.to_arrow()
    if kind == "pandas":
        return df.to_pandas()
    return df


def _job_for(df: pl.DataFrame, job: Job | None, keys: Mapping[str, Any], workdir: Path | None,
             name: str | None) -> tuple[Job, Path]:
    """The job that runs ``df``: its input and output in the work folder, named by the job and the columns."""
    if job is None:
        if not keys.get("model"):
            raise UsageError("map: give model= (and prompt=), or a Job")
        raw = job_keys(name or "map", **keys)
    else:
        raw = json.loads(json.dumps(job.raw)) if job.raw else {}
        if not raw:
            raise UsageError("map: the Job has no keys to rebuild it from; use Job.load or Job.from_dict")
        for table in job_keys(**keys).items():  # keywords override the job's keys
            if isinstance(table[1], dict):
                raw.setdefault(table[0], {}).update(table[1])
    clash = [c for c in df.columns if c in RESULT_SCHEMA or c == ROW_COLUMN]
    if clash:
        raise UsageError(f"map: the frame's column(s) {', '.join(clash)} would clash with the answer columns of "
                         "the same name; rename them first")
    # Named by what decides the answers (the model and its dialect) and the frame's columns, not by the limits or
    # the budget: a map run again with a larger budget resumes; another prompt resends only the rows it changes.
    api = raw.get("api") or {}
    shape = json.dumps({"model": (raw.get("request") or {}).get("model"), "provider": api.get("provider"),
                        "deployment": api.get("deployment"), "columns": {c: str(t) for c, t in df.schema.items()}},
                       sort_keys=True, default=str)
    folder = (workdir or default_workdir()) / f"{raw['name']}-{hashlib.sha256(shape.encode()).hexdigest()[:12]}"
    raw["input"] = {**{k: v for k, v in (raw.get("input") or {}).items() if k not in ("id", "keep")},
                    "path": str(folder / "input.parquet")}
    raw["output"] = {"path": str(folder / "output.parquet")}
    return Job.from_dict(raw, base=folder, source=job.source if job is not None else "<map>"), folder


def _staged(df: pl.DataFrame, job: Job | None, keys: Mapping[str, Any], workdir: str | Path | None,
            name: str | None) -> Job:
    """The job for ``df``, with the frame written as its input in the work folder."""
    the_job, folder = _job_for(df, job, keys, Path(workdir) if workdir else None, name)
    folder.mkdir(parents=True, exist_ok=True)
    df.write_parquet(folder / "input.parquet")
    return the_job


def _interruptible(call: Callable[[StopSignals | None], Any]) -> Any:
    """``call(signals)`` here, or in a thread of its own when this thread already runs an event loop (a
    notebook, an async app), since the engine runs its own loop.

    From the main thread, an interrupt (Ctrl-C, the kernel's interrupt button) stops the run the way it stops
    ``pipeline run``: the signal handlers are installed here, where signals arrive, and stop the run wherever it
    goes on; this thread then waits for it to write what was answered."""
    try:
        asyncio.get_running_loop()
        loop_runs = True
    except RuntimeError:
        loop_runs = False
    main = threading.current_thread() is threading.main_thread()
    if not main:
        if not loop_runs:
            return call(None)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-map") as pool:
            return pool.submit(call, None).result()
    with StopSignals() as signals:
        if not loop_runs:
            return call(signals)
        with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-map") as pool:
            future = pool.submit(call, signals)
            while True:
                try:
                    return future.result()
                except (Interrupted, KeyboardInterrupt):
                    if future.done():
                        raise
                    # raised here by the handler before the run could take the signal itself: the run has seen
                    # it (``signals.reason``) and stops; wait for it to finish writing


class _ProgressLine:
    """A run's progress as one line updated in place: a notebook output updated by its display id, else a
    terminal line rewritten with a carriage return (never a scrolling wall of text)."""

    def __init__(self) -> None:
        self._handle: Any = None
        self._last = 0.0
        self._text = ""
        try:
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None and getattr(shell, "kernel", None) is not None:
                from IPython.display import display

                self._handle = display("pipeline: starting ...", display_id=True)
        except ImportError:
            pass

    def __call__(self, stats: Any) -> None:
        now = time.monotonic()
        if now - self._last < 0.25 and stats.rows_done < stats.rows_total:
            return
        self._last = now
        self._text = (f"pipeline: {stats.rows_done:,}/{stats.rows_total:,} rows | {stats.failed:,} failed | "
                      f"${stats.cost_usd:.4f} | {stats.elapsed_s:,.0f} s")
        if self._handle is not None:
            self._handle.update(self._text)
        else:
            sys.stderr.write("\r" + self._text)
            sys.stderr.flush()

    def close(self) -> None:
        """End the line (a terminal's next output starts on a line of its own)."""
        if self._handle is None and self._text:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _run(job: Job, *, progress: bool, on_progress: Callable[[Any], None] | None, **kwargs: Any) -> Any:
    """Run ``job`` locally (the frame is in this process) with the progress asked for, interruptibly."""
    from pipeline.run import run

    line = _ProgressLine() if progress and on_progress is None else None
    try:
        return _interruptible(lambda signals: run(job, on_progress=on_progress or line, signals=signals,
                                                  engine="local", **kwargs))
    finally:
        if line is not None:
            line.close()


def _joined(df: pl.DataFrame, kind: str, result: Any, schema: Any, as_models: bool) -> Any:
    """The frame with the run's answers as columns, one row per input row in input order, as the kind given."""
    # what the run freed goes back first, so the answers do not land on top of the run's high-water mark (map's
    # peak RSS 341 MiB against the command's 285 without this; bench/frames.py)
    from pipeline.tokens import give_back_freed_memory

    give_back_freed_memory()
    answers = pl.read_parquet(result.output)
    # The frame's columns, then the answer (the schema's or the tools' typed columns, else content), then the rest.
    typed = [c for c in answers.columns if c not in RESULT_SCHEMA and c != ROW_COLUMN]
    first = typed or ["content"]
    order = [*df.columns, *first, *[c for c in RESULT_SCHEMA if c in answers.columns and c not in first]]
    rows = answers.get_column(ROW_COLUMN)
    if answers.height == df.height and (rows == pl.int_range(0, df.height, eager=True)).all():
        # every row answered, in input order (a whole run's output): side by side, sharing the frame's columns
        # instead of copying them through a join (the copy was the largest allocation of a map)
        joined = pl.concat([df, answers.drop(ROW_COLUMN)], how="horizontal").select(order)
    else:  # a stopped run: the rows it answered, the others with null answers
        joined = (df.with_row_index(ROW_COLUMN).with_columns(pl.col(ROW_COLUMN).cast(pl.Int64))
                  .join(answers, on=ROW_COLUMN, how="left").sort(ROW_COLUMN).select(order))
    if result.stopped is not None and not answers.height:
        raise result.stopped
    if as_models:
        joined = joined.with_columns(_models(joined, schema, first))
    return _back(joined, kind)


def map(frame: Any, job: Job | None = None, *, workdir: str | Path | None = None, fresh: bool = False,
        name: str | None = None, base_url: str | None = None, mode: str | None = None, wait: bool = True,
        on_estimate: Callable[[Estimate], bool] | None = None, on_progress: Callable[[Any], None] | None = None,
        progress: bool = True, as_models: bool = False, **keys: Any) -> Any:
    """Send every row of ``frame`` and return it with the answers as new columns (the same kind of frame).

    ``job`` or the job's keys as keywords: ``model=``, ``prompt=``, ``system=``, ``schema=`` (a dict of JSON
    Schema, a pydantic model or a dataclass), ``max_tokens=``, the limits, ``max_cost_usd=``, ``provider=``...
    A stopped run (budget, abort, an interrupt) returns the rows answered so far, the others with null answers.
    ``progress``: one line updated in place (a notebook output, or the terminal's line); ``on_progress`` replaces
    it. ``mode="batch"`` with ``wait=False`` submits to the Batch API and returns a ``BatchHandle`` to collect
    later. ``as_models`` (with a pydantic ``schema=``): an ``answer`` column of validated model instances as well."""
    df, kind = _as_polars(frame)
    the_job = _staged(df, job, keys, workdir, name)
    if mode == "batch" and not wait:
        first = _run(the_job, progress=False, on_progress=None, base_url=base_url, fresh=fresh, mode="batch",
                     wait=False, on_estimate=on_estimate)
        return BatchHandle(the_job, df, kind, keys.get("schema"), as_models, base_url, first)
    result = _run(the_job, progress=progress, on_progress=on_progress, base_url=base_url, fresh=fresh, mode=mode,
                  on_estimate=on_estimate)
    return _joined(df, kind, result, keys.get("schema"), as_models)


@dataclasses.dataclass
class BatchHandle:
    """A ``map`` submitted to the Batch API without waiting (``mode="batch", wait=False``): ``collect()`` later.
    The job's journal records the batches, so a new ``map`` of the same frame with the same keys finds them too."""

    job: Job
    frame: pl.DataFrame
    kind: str
    schema: Any
    as_models: bool
    base_url: str | None
    submitted: Any  # the submitting run's RunResult

    def collect(self, *, wait: bool = True) -> Any:
        """The frame with its answers: waits for the batches (``wait=False``: what has come back so far, the
        rest with null answers; nothing is submitted twice)."""
        result = _run(self.job, progress=False, on_progress=None, base_url=self.base_url, mode="batch", wait=wait)
        return _joined(self.frame, self.kind, result, self.schema, self.as_models)


def _models(df: pl.DataFrame, schema: Any, fields: list[str]) -> pl.Series:
    """The typed answer columns of each answered row as an instance of the pydantic model (None for the rest)."""
    from pydantic import BaseModel

    if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
        raise UsageError("map: as_models=True needs schema= to be a pydantic model")
    ok = df.get_column("status") == "ok"
    rows = df.select(fields).iter_rows(named=True)
    return pl.Series("answer", [schema.model_validate(r) if good else None for r, good in zip(rows, ok, strict=True)],
                     dtype=pl.Object)


async def amap(frame: Any, job: Job | None = None, **kwargs: Any) -> Any:
    """``map`` for async callers: awaits the run, in a thread of its own."""
    return await asyncio.to_thread(map, frame, job, **kwargs)


def estimate(frame_or_job: Any, job: Job | None = None, *, workdir: str | Path | None = None,
             name: str | None = None, **keys: Any) -> Estimate:
    """The estimate of ``map`` on a frame (nothing is sent), or of a ``Job`` (``estimate(job, limit=...)``)."""
    if isinstance(frame_or_job, Job):
        return estimate_job(frame_or_job, **keys)
    df, _ = _as_polars(frame_or_job)
    return estimate_job(_staged(df, job, keys, workdir, name))


@pl.api.register_dataframe_namespace("llm")
class LLMFrame:
    """``df.llm.map(model=..., prompt=...)`` and ``df.llm.estimate(...)`` on polars DataFrames."""

    def __init__(self, df: pl.DataFrame) -> None:
        self._df = df

    def map(self, job: Job | None = None, **kwargs: Any) -> pl.DataFrame:
        """``pipeline.map`` of this frame."""
        result = map(self._df, job, **kwargs)
        assert isinstance(result, pl.DataFrame)
        return result

    def estimate(self, job: Job | None = None, **kwargs: Any) -> Estimate:
        """``pipeline.estimate`` of this frame."""
        return estimate(self._df, job, **kwargs)
