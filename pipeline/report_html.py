"""``pipeline report OUT --html``: one self-contained HTML file a person can look at to judge a run.

The charts are drawn by matplotlib as inline SVG: the file needs no script, no style sheet and no font from
anywhere (it opens offline, in any browser, and prints), and matplotlib is the most used plotting library there
is. Each chart is a ``<figure class="chart" id="chart-...">``, so a test (and a reader's eye) can find it.

What it shows: cost and tokens by status (and by label for a structured or tool job), the latency histogram with
p50 / p95 / p99, requests, 429s and errors over time for each run (from the per-second timeline the run
records in its manifest), the distributions of the typed answer columns, the estimate next to what the run
really used, the failed rows by error type with a few examples each, and for Batch API runs each batch's
timeline. The text report (``report.py``) stays for terminals.
"""

from __future__ import annotations

import html
import io
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.errors import OutputError
from pipeline.report import build_report, read_output
from pipeline.sink import OutputPaths, read_manifest

EXAMPLES_PER_ERROR = 3
MAX_RUN_TIMELINES = 6
MIN_TIMELINE_S = 5.0  # a run shorter than this gets no timeline chart: its bars have no shape
EXAMPLE_ROWS = 5
_CSS = """.headline{display:flex;gap:2.5em;margin:1em 0}.headline .big{font-size:1.8em;font-weight:600}

body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #1d2329; padding: 0 1rem; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; border-bottom: 1px solid #d8dde2; }
table { border-collapse: collapse; margin: .5rem 0; font-size: .9rem; }
td, th { border: 1px solid #d8dde2; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f2f4f6; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1rem; }
figure.chart { margin: 0; border: 1px solid #e3e7ea; padding: .5rem; border-radius: 4px; }
figure.chart svg { width: 100%; height: auto; }
figcaption { font-size: .85rem; color: #4a545e; margin-top: .25rem; }
.note { color: #4a545e; font-size: .9rem; }
"""


def _svg(fig: Any) -> str:
    """A matplotlib figure as inline SVG text (its XML header dropped), and the figure closed."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    start, end = text.find("<metadata>"), text.find("</metadata>")  # the RDF block: nothing a reader needs
    return text[:start] + text[end + len("</metadata>"):] if start >= 0 and end > start else text


def _figure(chart_id: str, fig: Any, caption: str) -> str:
    return (f'<figure class="chart" id="chart-{chart_id}">{_svg(fig)}'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _plt() -> Any:
    import matplotlib

    matplotlib.use("svg")  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False,
                         "axes.spines.right": False, "figure.dpi": 96})
    return plt


def _money(v: float | None) -> str:
    return "n/a" if v is None else f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def _by_group_chart(plt: Any, df: pl.DataFrame, column: str, chart_id: str, what: str) -> str:
    """Cost and tokens per value of ``column`` (status, or a label)."""
    charged = df.filter(~pl.col("deduplicated").fill_null(False))
    g = (charged.group_by(pl.col(column).cast(pl.String).fill_null("(none)"))
         .agg(pl.col("cost_usd").sum().alias("cost"),
              (pl.col("prompt_tokens").fill_null(0) + pl.col("completion_tokens").fill_null(0)).sum().alias("tokens"),
              pl.len().alias("rows"))
         .sort("rows", descending=True).head(15))
    names = g[column].to_list()
    fig, (a, b) = plt.subplots(1, 2, figsize=(7.5, 2.8))
    a.bar(names, g["cost"].to_list(), color="#3d7ab8")
    a.set_title(f"cost (USD) by {what}")
    b.bar(names, g["tokens"].to_list(), color="#6aa26a")
    b.set_title(f"tokens (prompt + completion) by {what}")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30 if len(names) > 3 else 0)
    total = ", ".join(f"{n}: {r:,} rows, {_money(c)}" for n, r, c in zip(names, g["rows"], g["cost"], strict=True))
    return _figure(chart_id, fig, f"Cost and tokens by {what} (rows answered from another row's request are not "
                                  f"counted twice). {total}.")


def _latency_chart(plt: Any, df: pl.DataFrame, report: dict[str, Any]) -> str:
    lat = df.filter(pl.col("status") == "ok")["latency_ms"].drop_nulls()
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    if lat.len():
        ax.hist(lat.to_list(), bins=40, color="#3d7ab8")
        for q, colour in (("p50", "#2b8a3e"), ("p95", "#e67700"), ("p99", "#c92a2a")):
            v = report["latency_ms"][q]
            ax.axvline(v, color=colour, linestyle="--", linewidth=1.2, label=f"{q} {v:,.0f} ms")
        ax.legend(frameon=False)
    ax.set_xlabel("latency of answered requests (ms)")
    ax.set_ylabel("requests")
    p = report["latency_ms"]
    caption = ("Latency of the answered requests" + (f": p50 {p['p50']:,.0f} ms, p95 {p['p95']:,.0f} ms, "
                                                     f"p99 {p['p99']:,.0f} ms." if lat.len() else ": none recorded "
                                                     "(rows read back from the journal or a batch carry none)."))
    return _figure("latency", fig, caption)


def _timeline_chart(plt: Any, run: dict[str, Any], n: int) -> str:
    t = run.get("timeline") or {}
    seconds = t.get("t") or [0]
    width = t.get("bucket_s", 1)
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    third = width / 3.2  # three bars a bucket, side by side
    for i, (name, colour, label) in enumerate((("requests", "#3d7ab8", "requests sent / s"),
                                              ("rate_limited", "#e67700", "429s / s"),
                                              ("failed", "#c92a2a", "failed rows / s"))):
        ax.bar([s + i * third for s in seconds], [r / width for r in t.get(name, [0])], width=third, align="edge",
               color=colour, label=label)
    ax.set_xlabel(f"seconds since the run started (buckets of {width} s)")
    ax.legend(frameon=False, loc="upper right")
    totals = run.get("totals", {})
    when = run.get("started_at", "")[:19].replace("T", " ")
    caption = (f"Run {n} ({run.get('mode')}, {run.get('status')}, started {when} UTC, "
               f"{run.get('duration_s', 0):,.1f} s): {totals.get('requests_sent', 0):,} requests, "
               f"{totals.get('rate_limited_429', 0):,} 429s, "
               f"{totals.get('failed', 0):,} failed rows, {totals.get('resumed_from_journal', 0):,} from the journal.")
    return _figure(f"timeline-{n}", fig, caption)


def _distribution_chart(plt: Any, column: str, dist: dict[str, int]) -> str:
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.barh(list(dist)[::-1], list(dist.values())[::-1], color="#7b61a8")
    ax.set_xlabel("rows")
    shown = ", ".join(f"{k}: {v:,}" for k, v in dist.items())
    return _figure(f"dist-{column}", fig, f"Distribution of {column}: {shown}.")


def _numeric_chart(plt: Any, column: str, values: pl.Series) -> str:
    fig, ax = plt.subplots(figsize=(5, 2.6))
    ax.hist(values.to_list(), bins=20, color="#7b61a8")
    ax.set_xlabel(column)
    ax.set_ylabel("rows")
    low, mid, high = (float(v) for v in (values.min(), values.median(), values.max()))  # type: ignore[arg-type]
    caption = (f"Distribution of {column}: {values.len():,} values, min {low:,.4g}, median {mid:,.4g}, "
               f"max {high:,.4g}.")
    return _figure(f"dist-{column}", fig, caption)


def _numeric_answers(df: pl.DataFrame) -> dict[str, pl.Series]:
    """The typed numeric answer columns (after the result columns), with their non-null values."""
    start = df.columns.index("deduplicated") + 1 if "deduplicated" in df.columns else len(df.columns)
    return {c: df[c].drop_nulls() for c in df.columns[start:]
            if df[c].dtype.is_numeric() and df[c].drop_nulls().len()}


def _estimate_chart(plt: Any, run: dict[str, Any]) -> str | None:
    """The estimate of the last run that sent requests, next to what that run really used."""
    est, totals = run.get("estimate") or {}, run.get("totals") or {}
    if not est.get("requests"):
        return None
    batch = run.get("mode") == "batch"
    cost_max = est.get("batch_cost_usd_max" if batch else "cost_usd_max")
    cost_exp = est.get("batch_cost_usd_expected" if batch else "cost_usd_expected")
    rows: list[tuple[str, Any, Any, Any]] = [
            ("prompt tokens", est.get("prompt_tokens"), est.get("prompt_tokens"), totals.get("prompt_tokens")),
            ("output tokens", est.get("expected_output_tokens"), est.get("max_output_tokens"),
             totals.get("completion_tokens")),
            ("cost (USD)", cost_exp, cost_max, totals.get("cost_usd_this_run")),
            ("duration (s)", None, est.get("duration_s"), run.get("duration_s"))]
    fig, axes = plt.subplots(1, 4, figsize=(9, 2.6))
    for ax, (name, expected, bound, actual) in zip(axes, rows, strict=True):
        # one meaning per word: the token and cost bounds are ceilings, the duration's is a floor (the limits')
        labels = ["expected", "floor" if name.startswith("duration") else "at most", "actual"]
        values = [expected or 0, bound or 0, actual or 0]
        ax.bar(labels, values, color=["#9fc2e7", "#3d7ab8", "#2b8a3e"])
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    caption = ("The estimate before the run next to what it used: prompt tokens are counted before the run; "
               "output tokens and cost are bounded by max_tokens (and expected from [estimate].output_tokens or a "
               "sample, when known); the duration's floor is what the limits impose (it cannot be faster). "
               + "; ".join(f"{n}: expected {_shown(e, n)}, {'floor' if n.startswith('duration') else 'at most'} "
                           f"{_shown(b, n)}, actual {_shown(a, n)}" for n, e, b, a in rows) + ".")
    return _figure("estimate", fig, caption)


def _shown(value: Any, what: str) -> str:
    if value is None:
        return "n/a"
    if what.startswith("cost"):
        return _money(value)
    if what.startswith("duration"):
        return f"{value:,.1f} s"
    return f"{value:,}"


def _batch_chart(plt: Any, batches: list[dict[str, Any]]) -> str | None:
    timed = [b for b in batches if b.get("written_at")]
    if not timed:
        return None
    t0 = min(b["written_at"] for b in timed)
    fig, ax = plt.subplots(figsize=(7.5, 0.6 + 0.35 * len(timed)))
    for i, b in enumerate(timed):
        written, submitted, collected = b["written_at"], b.get("submitted_at"), b.get("collected_at")
        if submitted:
            ax.barh(i, submitted - written, left=written - t0, color="#9fc2e7")
        end = collected or (submitted or written)
        if submitted and collected:
            ax.barh(i, collected - submitted, left=submitted - t0, color="#3d7ab8")
        ax.text(end - t0, i, f"  part {b['part']}: {b.get('status')}, {b.get('requests', 0):,} requests",
                va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_xlabel("seconds since the first batch file was written (light: written to submitted; dark: at the "
                  "provider until collected)")
    return _figure("batches", fig, f"Each batch's timeline ({len(timed)} batch(es)).")


def _headline(report: dict[str, Any]) -> str:
    """The four numbers a reader wants first, large."""
    rows = report["rows"] or 0
    ok = report["by_status"].get("ok", 0)
    p50 = (report.get("latency_ms") or {}).get("p50")
    cells = [("rows answered", f"{ok:,} of {rows:,}" if rows else "0"),
             ("cost", _money(report["cost_usd"])),
             ("failed", f"{report['by_status'].get('error', 0):,}"),
             ("median latency", f"{p50:,.0f} ms" if isinstance(p50, int | float) else "n/a")]
    return ("<div class='headline'>" + "".join(f"<div><span class='big'>{html.escape(v)}</span><br>{html.escape(k)}"
                                               "</div>" for k, v in cells) + "</div>")


def _examples_table(df: pl.DataFrame, n: int = EXAMPLE_ROWS) -> str:
    """A few answered rows, picked at random (a fixed seed: the same rows each time), with their answer."""
    ok = df.filter(pl.col("status") == "ok")
    if not ok.height:
        return "<p class='note'>No answered row.</p>"
    sample = ok.sample(min(n, ok.height), seed=0)
    id_col = df.columns[0]
    answer_cols = [c for c in df.columns[df.columns.index("deduplicated") + 1:] if c != "embedding"] \
        if "deduplicated" in df.columns else []
    shown = [id_col, *[c for c in df.columns[1:df.columns.index("status")]], *(answer_cols or ["content"])]
    head = "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in shown) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c])[:300])}</td>" for c in shown) + "</tr>"
                   for r in sample.iter_rows(named=True))
    return head + body + "</table>"


def _failures_table(df: pl.DataFrame) -> str:
    failed = df.filter(pl.col("status") == "error")
    if not failed.height:
        return "<p class='note'>No row failed.</p>"
    id_col = df.columns[0]  # the row's id (or its position)
    parts = ["<table><tr><th>error type</th><th>rows</th><th>examples (row: error)</th></tr>"]
    for (kind,), group in failed.group_by("error_type", maintain_order=True):
        examples = "<br>".join(f"{html.escape(str(r[id_col]))}: {html.escape(str(r['error'])[:300])}"
                               for r in group.head(EXAMPLES_PER_ERROR).iter_rows(named=True))
        parts.append(f"<tr><td>{html.escape(str(kind))}</td><td class='n'>{group.height:,}</td>"
                     f"<td>{examples}</td></tr>")
    return "".join(parts) + "</table>"


def _runs_table(runs: list[dict[str, Any]]) -> str:
    head = ("<table><tr><th>run</th><th>started (UTC)</th><th>mode</th><th>status</th><th>duration</th>"
            "<th>requests</th><th>ok</th><th>failed</th><th>from journal</th><th>429s</th><th>cost</th></tr>")
    rows = []
    for i, r in enumerate(runs, start=1):
        t = r.get("totals", {})
        rows.append(f"<tr><td class='n'>{i}</td><td>{html.escape(r.get('started_at', '')[:19].replace('T', ' '))}</td>"
                    f"<td>{html.escape(str(r.get('mode')))}</td><td>{html.escape(str(r.get('status')))}</td>"
                    f"<td class='n'>{r.get('duration_s', 0):,.1f} s</td>"
                    f"<td class='n'>{t.get('requests_sent', 0):,}</td>"
                    f"<td class='n'>{t.get('ok', 0):,}</td><td class='n'>{t.get('failed', 0):,}</td>"
                    f"<td class='n'>{t.get('resumed_from_journal', 0):,}</td>"
                    f"<td class='n'>{t.get('rate_limited_429', 0):,}</td>"
                    f"<td class='n'>{_money(t.get('cost_usd_this_run'))}</td></tr>")
    return head + "".join(rows) + "</table>"


def write_html_report(output: str | Path, html_path: str | Path | None = None) -> Path:
    """Write the HTML report of an output (beside it, ``<output>.report.html``, unless told where)."""
    report = build_report(output)
    out = Path(output)
    df = read_output(out)
    manifest = read_manifest(OutputPaths(out)) or {}
    runs: list[dict[str, Any]] = manifest.get("runs") or []
    target = Path(html_path) if html_path else out.with_suffix(".report.html")
    plt = _plt()
    # A chart only where it tells something: cost by status needs more than one status; a timeline needs a run
    # long enough to have a shape (a few seconds of bars say nothing the runs table does not).
    charts = ([_by_group_chart(plt, df, "status", "by-status", "status")]
              if df.get_column("status").n_unique() > 1 else [])
    labels = list(report["distributions"])
    if labels:
        charts.append(_by_group_chart(plt, df, labels[0], "by-label", labels[0]))
    charts.append(_latency_chart(plt, df, report))
    with_requests = [r for r in runs if (r.get("estimate") or {}).get("requests")]
    if with_requests and (chart := _estimate_chart(plt, with_requests[-1])) is not None:
        charts.append(chart)
    timelines = [_timeline_chart(plt, r, i) for i, r in enumerate(runs, start=1)
                 if (r.get("duration_s") or 0) >= MIN_TIMELINE_S][-MAX_RUN_TIMELINES:]
    dists = [_distribution_chart(plt, c, d) for c, d in report["distributions"].items()]
    dists += [_numeric_chart(plt, c, v) for c, v in _numeric_answers(df).items()]
    batch = _batch_chart(plt, manifest.get("batches") or []) if manifest.get("mode") == "batch" else None
    generated = datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    summary = (f"<table><tr><th>job / model</th><td>{html.escape(str(report['job']))} / "
               f"{html.escape(str(report['model']))}</td></tr>"
               f"<tr><th>last run</th><td>{html.escape(str(report['run_status']))} "
               f"({html.escape(report['mode'])})</td></tr>"
               f"<tr><th>rows</th><td class='n'>{report['rows']:,} ("
               + ", ".join(f"{k} {v:,}" for k, v in report["by_status"].items()) + ")</td></tr>"
               f"<tr><th>prompt / cached / completion tokens</th><td class='n'>{report['prompt_tokens']:,} / "
               f"{report['cached_tokens']:,} / {report['completion_tokens']:,}</td></tr>"
               f"<tr><th>cost</th><td class='n'>{_money(report['cost_usd'])}</td></tr>"
               + (f"<tr><th>prompt caching saved</th><td class='n'>{_money(report['cache_saved_usd'])} "
                  f"({report['cached_tokens']:,} tokens read from the cache)</td></tr>"
                  if report["cache_saved_usd"] is not None else "") +
               f"<tr><th>prices</th><td>{html.escape(str(report['price_source']))}</td></tr></table>")
    body = [f"<h1>Report: {html.escape(str(report['job']))}</h1>",
            f"<p class='note'>{html.escape(str(out))}, written {generated}. Charts drawn offline by matplotlib.</p>",
            _headline(report), summary, "<h2>Example rows</h2>", _examples_table(df),
            "<h2>Cost, tokens and latency</h2>", f"<div class='grid'>{''.join(charts)}</div>",
            "<h2>Runs</h2>", _runs_table(runs) if runs else "<p class='note'>No run history in the manifest.</p>",
            f"<div class='grid'>{''.join(timelines)}</div>"]
    if batch:
        body += ["<h2>Batches</h2>", batch]
    if dists:
        body += ["<h2>Answer distributions</h2>", f"<div class='grid'>{''.join(dists)}</div>"]
    body += ["<h2>Failed rows by error type</h2>", _failures_table(df)]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report: "
            f"{html.escape(str(report['job']))}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"{target}: cannot write the HTML report: {e.strerror}") from None
    return target
