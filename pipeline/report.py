"""``pipeline report``: what an output holds, read back from the Parquet file and its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import InputError
from pipeline.sink import OutputPaths, read_manifest


def read_output(output: str | Path) -> pl.DataFrame:
    """An output table: the local engine's file, or the Ray engine's dataset folder (its chunks, in row order of
    their partitions)."""
    path = Path(output)
    if path.is_dir():
        files = sorted(str(f) for f in path.glob("part-*.parquet"))
        if not files:
            raise InputError(f"{path}: the output dataset has no committed chunk yet")
    elif path.is_file():
        files = [str(path)]
    else:
        raise InputError(f"{path}: output file not found")
    try:
        return pl.read_parquet(files)
    except Exception as e:  # polars raises several unrelated types for unreadable files
        raise InputError(f"{path}: cannot read the output: {str(e).splitlines()[0] if str(e) else e}") from None


def build_report(output: str | Path) -> dict[str, Any]:
    """Totals, cost, errors by type, latency percentiles and (for enum-like text columns) distributions."""
    path = Path(output)
    df = read_output(path)
    if "status" not in df.columns:
        raise InputError(f"{path}: not a pipeline output (no status column)")
    manifest = read_manifest(OutputPaths(path)) or {}
    ok = df.filter(pl.col("status") == "ok")
    lat = ok.get_column("latency_ms").drop_nulls() if "latency_ms" in ok.columns else pl.Series([], dtype=pl.Float64)
    charged = df.filter(~pl.col("deduplicated").fill_null(False))
    report: dict[str, Any] = {
        "output": str(path),
        "job": manifest.get("job"),
        "model": manifest.get("model"),
        "run_status": manifest.get("status"),
        "mode": manifest.get("mode", "online"),
        "rows": df.height,
        "by_status": dict(df.group_by("status").len().sort("status").iter_rows()),
        "prompt_tokens": int(charged["prompt_tokens"].sum() or 0),
        "cached_tokens": int(charged["cached_tokens"].sum() or 0),
        "completion_tokens": int(charged["completion_tokens"].sum() or 0),
        "reasoning_tokens": int(charged["reasoning_tokens"].sum() or 0),
        "cost_usd": None if df["cost_usd"].null_count() == df.height else float(df["cost_usd"].sum()),
        "deduplicated_rows": int(df["deduplicated"].sum() or 0),
        "errors_by_type": dict(df.filter(pl.col("status") == "error").group_by("error_type").len()
                               .sort("len", descending=True).iter_rows()),
        "latency_ms": {q: (float(lat.quantile(v, "nearest")) if lat.len() else None)  # type: ignore[arg-type]
                       for q, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))},
        "price_source": (manifest.get("price") or {}).get("source"),
        "price_date": (manifest.get("price") or {}).get("source_date"),
    }
    est = manifest.get("estimate") or {}
    basis = "batch_" if report["mode"] == "batch" else ""  # batch runs are priced (and estimated) at that price
    report["estimate_cost_usd_max"] = est.get(f"{basis}cost_usd_max")
    report["estimate_cost_usd_expected"] = est.get(f"{basis}cost_usd_expected")
    report["distributions"] = _distributions(df)
    report["cache_write_tokens"] = int(charged["cache_write_tokens"].sum() or 0)
    report["cache_saved_usd"] = _cache_saved(report, manifest.get("price"))
    report["reduce"] = manifest.get("reduce")  # the [reduce] step's summary, when the job has one
    return report


def _cache_saved(report: dict[str, Any], price: dict[str, Any] | None) -> float | None:
    """What prompt caching saved: cached tokens at the input rate less the cached rate, less what writing to
    the cache cost above the input rate (Anthropic). At the standard rates (a Batch run's are about half)."""
    if not price or not (report["cached_tokens"] or report["cache_write_tokens"]):
        return None
    base = price["input_per_mtok"]
    write = price.get("cache_write_per_mtok") or base
    return (report["cached_tokens"] * (base - price["cached_input_per_mtok"])
            - report["cache_write_tokens"] * (write - base)) / 1e6


def _distributions(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Label counts for typed answer columns with few distinct values (classification jobs)."""
    out: dict[str, dict[str, int]] = {}
    answer_cols = df.columns[df.columns.index("deduplicated") + 1:] if "deduplicated" in df.columns else []
    for c in answer_cols:
        s = df.get_column(c)
        if s.dtype in (pl.String, pl.Boolean, pl.Categorical, pl.Enum) and s.n_unique() <= 20:
            counts = s.value_counts(sort=True)
            out[c] = {str(k): int(v) for k, v in counts.iter_rows()}
    return out
