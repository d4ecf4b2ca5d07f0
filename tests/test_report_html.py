"""The HTML report: built from real runs over the simulator, then opened in headless Chromium (Debian's
``chromium``; ``.ci/run`` installs it) through the DevTools protocol: it must render with no console error and no
request leaving the file, every chart must be drawn, and a screenshot is kept under ``out/``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.job import Job
from pipeline.report_html import write_html_report
from pipeline.run import run
from tests.conftest import reviews, run_cli

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "out" / "report-screenshot.png"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCHEMA = ('[request.response_schema]\ntype = "object"\nadditionalProperties = false\n'
          'required = ["sentiment", "stars"]\n'
          '[request.response_schema.properties.sentiment]\ntype = "string"\n'
          'enum = ["positive", "negative", "neutral"]\n'
          '[request.response_schema.properties.stars]\ntype = "integer"\nminimum = 1\nmaximum = 5\n')


def _structured_output(make_job, sim) -> Path:
    """A classification job with a few failing rows, run twice (the second run resumes), over the simulator."""
    df = reviews(60).with_columns(pl.when(pl.int_range(pl.len()) % 20 == 3).then(pl.lit("SIM_400"))
                                  .otherwise(pl.col("text")).alias("text"))
    job = Job.load(make_job(data=df, request=f'model = "gpt-4o-mini"\nprompt = "{{{{ text }}}}"\nmax_tokens = 30\n'
                                             f'{SCHEMA}', extra="[estimate]\noutput_tokens = 10"))
    with sim(latency_ms=5) as s:
        run(job, base_url=s.base_url, limit=30)
        run(job, base_url=s.base_url)
    return Path(job.output.path)


def _batch_output(make_job, sim) -> Path:
    job = Job.load(make_job(rows=20, request='model = "gpt-4o-mini"\nprompt = "{{ text }}"\nmax_tokens = 30\n'
                                             'mode = "batch"', output='path = "out/batch.parquet"',
                            extra="[batch]\npoll_interval_s = 0.05\nmax_requests_per_file = 8"))
    with sim(batch_delay_s=0.2) as s:
        assert run(job, base_url=s.base_url).exit_code == 0
    return Path(job.output.path)


def test_report_html_holds_every_chart_and_each_run(make_job, sim):
    out = _structured_output(make_job, sim)
    page = write_html_report(out).read_text()
    ids = set(re.findall(r'<figure class="chart" id="chart-([a-z0-9-]+)">', page))
    assert {"by-status", "by-label", "latency", "estimate", "dist-sentiment", "dist-stars"} <= ids
    assert not {"timeline-1", "timeline-2"} & ids  # runs of under 5 s: their bars would have no shape
    assert "<h2>Example rows</h2>" in page and "rows answered" in page and "median latency" in page
    assert "<script" not in page and "http://" not in page.replace("http://www.w3.org", "")  # nothing to fetch
    assert page.count("<svg") >= len(ids)
    assert "http_400" in page and "Invalid request" in page  # failed rows by type, with examples
    manifest = json.loads(out.with_suffix(".manifest.json").read_text())
    runs = manifest["runs"]
    # rows 3, 23 and 43 ask the same failing question: sent once, in the first run
    assert [r["totals"]["requests_sent"] for r in runs] == [29, 29]
    assert runs[1]["totals"]["resumed_from_journal"] == 29  # row 23 repeats row 3: deduplicated
    timeline = runs[0]["timeline"]
    assert sum(timeline["requests"]) == 29 and sum(timeline["ok"]) == 30 - 2
    assert sum(timeline["failed"]) == 2 and len(timeline["t"]) == len(timeline["requests"])


def test_batch_report_shows_each_batch(make_job, sim):
    out = _batch_output(make_job, sim)
    page = write_html_report(out, out.parent / "b.html").read_text()
    assert 'id="chart-batches"' in page and "part 3: completed" in page
    batches = json.loads(out.with_suffix(".manifest.json").read_text())["batches"]
    assert len(batches) == 3 and all(b["written_at"] <= b["submitted_at"] <= b["collected_at"] for b in batches)


def test_report_cli_writes_html_beside_the_output(make_job, sim):
    out = _structured_output(make_job, sim)
    result = run_cli("report", out, "--html")
    assert result.exit_code == 0 and f"wrote {out.with_suffix('.report.html')}" in result.output
    assert run_cli("report", out.parent / "nope.parquet", "--html").exit_code == 2


async def _open_in_chromium(url: str, profile: Path) -> dict[str, Any]:
    """Load ``url`` in headless Chromium over the DevTools protocol; the console errors, the requests that left
    the page, what the page says of its charts, and a full-page screenshot."""
    import aiohttp

    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0",
        f"--user-data-dir={profile}", "--window-size=1200,900", "about:blank",
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "chromium exited before its DevTools endpoint was up"
            if m := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = m.group(1)
                break
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
            async with http.ws_connect(page_ws, max_msg_size=0) as ws:
                counter, errors, requests, loaded = 0, [], [], asyncio.Event()
                replies: dict[int, asyncio.Future[Any]] = {}

                async def reader() -> None:
                    async for msg in ws:
                        data = json.loads(msg.data)
                        if "id" in data:
                            replies.pop(data["id"]).set_result(data.get("result"))
                        method, params = data.get("method"), data.get("params", {})
                        console_error = method == "Runtime.consoleAPICalled" and params["type"] in ("error",
                                                                                                     "assert")
                        logged_error = method == "Log.entryAdded" and params["entry"]["level"] == "error"
                        if console_error or logged_error or method == "Runtime.exceptionThrown":
                            errors.append(params)
                        elif method == "Network.requestWillBeSent":
                            requests.append(params["request"]["url"])
                        elif method == "Page.loadEventFired":
                            loaded.set()

                async def send(method: str, **params: Any) -> Any:
                    nonlocal counter
                    counter += 1
                    replies[counter] = asyncio.get_running_loop().create_future()
                    await ws.send_json({"id": counter, "method": method, "params": params})
                    return await asyncio.wait_for(replies[counter], 30)

                task = asyncio.create_task(reader())
                for domain in ("Runtime", "Log", "Network", "Page"):
                    await send(f"{domain}.enable")
                await send("Page.navigate", url=url)
                await asyncio.wait_for(loaded.wait(), 30)
                charts = await send("Runtime.evaluate", returnByValue=True, expression="""
                    [...document.querySelectorAll('figure.chart')].map(f => {
                        const svg = f.querySelector('svg'); const r = svg ? svg.getBoundingClientRect() : null;
                        return {id: f.id, width: r ? r.width : 0, height: r ? r.height : 0,
                                marks: svg ? svg.querySelectorAll('path, rect, line, text, use').length : 0};
                    })""")
                metrics = await send("Page.getLayoutMetrics")
                size = metrics["cssContentSize"]
                shot = await send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                  clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
                task.cancel()
        return {"errors": errors, "requests": requests, "charts": charts["result"]["value"],
                "png": base64.b64decode(shot["data"])}
    finally:
        proc.kill()
        await proc.wait()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("PIPELINE_CI"),
                    reason="needs Debian's chromium package (/usr/bin/chromium) to open the report headless; "
                           ".ci/run installs it")
def test_report_renders_in_headless_chromium(make_job, sim, tmp_path):
    assert CHROMIUM is not None, "CI must have chromium: .ci/run installs Debian's chromium package"
    out = _structured_output(make_job, sim)
    html = write_html_report(out)
    seen = asyncio.run(_open_in_chromium(html.as_uri(), tmp_path / "profile"))
    assert seen["errors"] == []
    assert all(u.startswith(("file:", "data:", "about:")) for u in seen["requests"]), seen["requests"]
    charts = {c["id"]: c for c in seen["charts"]}
    expected = {"chart-by-status", "chart-by-label", "chart-latency", "chart-estimate", "chart-dist-sentiment",
                "chart-dist-stars"}
    assert expected <= set(charts)
    for c in charts.values():
        assert c["width"] > 100 and c["height"] > 50 and c["marks"] > 20, c  # drawn, not an empty box
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(seen["png"])
    assert seen["png"][:8] == b"\x89PNG\r\n\x1a\n" and len(seen["png"]) > 20_000


def test_a_run_long_enough_gets_its_timeline_chart():
    from pipeline.report_html import _plt, _timeline_chart

    run = {"mode": "online", "status": "complete", "started_at": "2026-12-06T08:00:00", "duration_s": 12.0,
           "totals": {"requests_sent": 120, "rate_limited_429": 3, "failed": 1, "resumed_from_journal": 0},
           "timeline": {"bucket_s": 1, "t": list(range(12)), "requests": [10] * 12, "rate_limited": [0] * 11 + [3],
                        "failed": [0] * 11 + [1]}}
    chart = _timeline_chart(_plt(), run, 1)
    assert 'id="chart-timeline-1"' in chart and "<svg" in chart and "120 requests, 3 429s" in chart
