"""``pipeline run JOB --sample N``: a look at real answers before the full run, and what the full run will
really cost, projected from what the sample used.

N rows are picked at random (reproducibly: ``--seed``) among the rows still to do, sent now, and written to
``<output>.sample.parquet``; their answers are journaled like any others, so the full run does not pay for them
again. The projection replaces the estimate's guess about answers with measurement: the sample's output tokens
per request (mean and spread), its latency, its cost. The range is a 95% interval of the mean (normal
approximation), scaled to the requests left; it narrows as the sample grows. The measurement is kept in the
sample's manifest, where ``pipeline estimate`` finds it for its expected cost and says so.
"""

from __future__ import annotations

import math
import statistics
from array import array
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.job import Job
from pipeline.measured import Measured, sample_paths
from pipeline.plan import RunPlan, finish, prepare
from pipeline.pricing import Usage
from pipeline.source import ROW, iter_chunks

Z95 = 1.96


@dataclass
class Projection:
    """The full run, projected from the sample: what is left, and its cost and duration with a 95% range."""

    requests_left: int
    output_tokens: tuple[float, float, float]       # low, expected, high
    cost_usd: tuple[float, float, float] | None
    duration_s: tuple[float, float]                 # with the sample's mean and p95 latency (or the limits)
    basis: str


def project(plan: RunPlan, m: Measured, sent_now: int, prompt_now: int) -> Projection:
    """Scale the sample's measurement to the rest of the job."""
    est, job, price = plan.estimate, plan.job, plan.checked.price
    left = max(0, est.requests - sent_now)
    half = Z95 * m.output_tokens_sd / math.sqrt(max(m.requests, 1))
    per = (max(0.0, m.output_tokens_mean - half), m.output_tokens_mean,
           min(float(job.request.max_tokens), m.output_tokens_mean + half))
    out = tuple(left * p for p in per)
    prompt = max(0, est.prompt_tokens - prompt_now)
    cost = tuple(price.cost(Usage(prompt, int(o))) for o in out) if price is not None else None
    lim = job.limits
    by_latency = [left * (lat or 0) / 1000 / max(1, lim.concurrency) for lat in (m.latency_ms_mean, m.latency_ms_p95)]
    by_limits = 0.0
    if lim.requests_per_minute:
        by_limits = max(by_limits, left / lim.requests_per_minute * 60)
    if lim.tokens_per_minute:  # admission charges max_tokens, whatever the answer then uses
        by_limits = max(by_limits, (prompt + left * job.request.max_tokens) / lim.tokens_per_minute * 60)
    duration = (max(by_latency[0], by_limits), max(by_latency[1], by_limits))
    basis = (f"measured on {m.requests} request(s) of the sample: {m.output_tokens_mean:,.1f} output tokens each "
             f"(sd {m.output_tokens_sd:,.1f}); prompt tokens counted exactly before the run")
    return Projection(left, out, cost, duration, basis)  # type: ignore[arg-type]


@dataclass
class SampleResult:
    """A sample run: its rows (inputs beside answers), the measurement, and the projection of the full run."""

    rows: pl.DataFrame
    id_column: str
    input_columns: list[str]       # the template columns, as the rows' inputs
    answer_columns: list[str]      # the typed answer columns (a schema's or the tools'), else none: see content
    measured: Measured | None
    projection: Projection | None
    output: Path
    sent: int
    exit_code: int


def run_sample(job: Job, n: int, *, seed: int = 0, base_url: str | None = None, allow_insecure: bool = False,
               transport: Any = None) -> SampleResult:
    """Send ``n`` random rows still to do; journal their answers, project the full run, and stop."""
    from pipeline.online import run_online

    plan = prepare(job, mode="online", base_url=base_url, allow_insecure=allow_insecure)
    try:
        # Rows with a request still to send: the estimate counted their prompt (answered rows, repeats of another
        # row's request, skipped rows and rows with a bad image have no count), so every pick is one request.
        counted = np.frombuffer(plan.counted, dtype=np.dtype(plan.counted.typecode)) if len(plan.counted) else None
        candidates = (np.flatnonzero(counted > 0) if counted is not None else np.empty(0, dtype=np.int64))
        if plan.todo is not None:
            candidates = np.intersect1d(candidates, np.frombuffer(plan.todo, dtype=np.int64))
        rng = np.random.default_rng(seed)
        picks = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
        sample_plan = replace(plan, todo=array("q", picks.tolist()), kept=None, paths=sample_paths(job),
                              only_todo=True, fresh=True)
        end = run_online(sample_plan, transport=transport)
        manifest_extra: dict[str, Any] = {}
        out = pl.read_parquet(sample_plan.paths.output)
        sent = out.filter(~pl.col("deduplicated") & (pl.col("attempts").fill_null(0) > 0))
        measured = _measure(sent, seed)
        projection = project(plan, measured, sent.height, int(sent["prompt_tokens"].sum() or 0)) if measured else None
        if measured is not None:
            manifest_extra["sample"] = measured.to_dict()
        if projection is not None:
            manifest_extra["projection"] = projection.__dict__
        end.manifest.update(manifest_extra)
        finish(sample_plan, end)
        inputs = _inputs(plan, picks)
        rows = inputs.join(out.drop([c for c in out.columns if c in inputs.columns and c != _id(job)]),
                           on=_id(job), how="left") if inputs.height else out
        from pipeline.plan import answer_columns

        columns = answer_columns(job, sample_plan.paths.output).columns or {}
        inputs_shown = [c for c in plan.checked.renderer.template_columns if c != _id(job)]
        return SampleResult(rows, _id(job), inputs_shown, [c for c in columns if c != "tool_calls"], measured,
                            projection, sample_plan.paths.output, end.stats.requests_sent,
                            end.stopped.exit_code if end.stopped is not None else 1 if end.stats.failed else 0)
    finally:
        plan.close()


def _id(job: Job) -> str:
    return job.input.id or "row"


def _measure(sent: pl.DataFrame, seed: int) -> Measured | None:
    ok = sent.filter(pl.col("status") == "ok")
    if not ok.height:
        return None
    out_tokens = [float(v) for v in ok["completion_tokens"].fill_null(0).to_list()]
    lat = ok["latency_ms"].drop_nulls()
    return Measured(rows=sent.height, requests=ok.height, output_tokens_mean=statistics.fmean(out_tokens),
                    output_tokens_sd=statistics.stdev(out_tokens) if len(out_tokens) > 1 else 0.0,
                    prompt_tokens_mean=float(ok["prompt_tokens"].mean() or 0.0),  # type: ignore[arg-type]
                    latency_ms_mean=float(lat.mean()) if lat.len() else None,  # type: ignore[arg-type]
                    latency_ms_p95=float(lat.quantile(0.95, "nearest")) if lat.len() else None,  # type: ignore[arg-type]
                    cost_usd=None if sent["cost_usd"].null_count() == sent.height else float(sent["cost_usd"].sum()),
                    seed=seed)


def _inputs(plan: RunPlan, picks: np.ndarray) -> pl.DataFrame:
    """The template columns of the picked rows, keyed by the row's id, to print beside the answers."""
    job, renderer = plan.job, plan.checked.renderer
    columns = [c for c in renderer.columns if c not in job.input.keep or c == job.input.id]
    frames = list(iter_chunks(plan.checked.source, columns, rows=array("q", picks.tolist())))
    if not frames:
        return pl.DataFrame()
    df = pl.concat(frames)
    return df.rename({ROW: "row"}) if job.input.id is None else df.drop(ROW)
