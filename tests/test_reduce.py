"""Map then reduce over the simulator: a group that fits is one request; a large group folds round by round within
the budget, in the rounds the estimate planned; a rerun (after a kill, or with one group changed) pays only for
what is new."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from pipeline.job import Job
from pipeline.planning import estimate
from pipeline.run import run
from tests.conftest import wait_for

PIPELINE = str(Path(sys.executable).parent / "pipeline")
REDUCE = textwrap.dedent('''\
    [reduce]
    model = "gpt-4o-mini"
    group_by = ["shop"]
    order_by = ["n"]
    items = ["n", "note"]
    system = "Summarise the notes."
    prompt = """{% if partial %}Merge these partial summaries:{% else %}Summarise these notes:{% endif %}
    {% for item in items %}- {% if partial %}{{ item.content }}{% else %}[{{ item.n }}] {{ item.note }}{% endif %}
    {% endfor %}"""
    max_tokens = 8
    ''')


def notes(groups: dict[str, int]) -> pl.DataFrame:
    rows = [(shop, n) for shop, count in groups.items() for n in range(count)]
    return pl.DataFrame({"shop": [r[0] for r in rows], "n": [r[1] for r in rows],
                         "note": [f"note number {n} of {shop}" for shop, n in rows]})


def reduce_job(tmp_path: Path, base_url: str, data: pl.DataFrame, budget: int = 2_000) -> Path:
    data.write_parquet(tmp_path / "notes.parquet")
    job = tmp_path / "fold.toml"
    job.write_text(f'name = "fold"\n[input]\npath = "notes.parquet"\n[output]\npath = "out/fold.parquet"\n'
                   f'[api]\nbase_url = "{base_url}"\n[limits]\nconcurrency = 16\n'
                   + REDUCE + f"max_items_tokens = {budget}\n")
    return job


def themes_job(make_job: Any, base_url: str, *, rows: int, map_max_tokens: int, max_items_tokens: int) -> Path:
    """A map (one line per review) then a reduce of the answers by product (30 tokens a fold answer)."""
    request = f'model = "gpt-4o-mini"\nprompt = "One line on {{{{ text }}}}"\nmax_tokens = {map_max_tokens}'
    return make_job(rows=rows, request=request, extra=f'[api]\nbase_url = "{base_url}"\n' + textwrap.dedent('''\
        [reduce]
        group_by = ["product"]
        items = ["content"]
        prompt = """Themes of {{ group.product }}:
        {% for item in items %}- {{ item.content }}
        {% endfor %}"""
        max_tokens = 30
        ''') + f"max_items_tokens = {max_items_tokens}\n")


def test_a_group_that_fits_is_one_request_and_a_large_one_folds_in_the_planned_rounds(sim, tmp_path):
    data = notes({"small": 12, "large": 5000})
    with sim() as s:
        job = reduce_job(tmp_path, s.base_url, data)
        chain = estimate(Job.load(job)).chain
        assert chain is not None
        result = run(Job.load(job))
        assert result.exit_code == 0 and result.reduce is not None
    out = pl.read_parquet(tmp_path / "out/fold.reduce.parquet")
    by = {r["shop"]: r for r in out.iter_rows(named=True)}
    assert by["small"]["requests"] == 1 and by["small"]["rounds"] == 1 and by["small"]["items"] == 12
    assert by["large"]["items"] == 5000 and by["large"]["status"] == "ok"
    assert by["large"]["rounds"] == len(chain["rounds"])  # the rounds the estimate planned
    work = tmp_path / "out/fold.reduce.work"
    first = pl.read_parquet(work / "round-1.parquet")
    assert first.height == chain["rounds"][0]["requests"]  # round 1 exactly as planned (the items are known)
    assert s.stats.requests == result.reduce.requests_sent <= chain["requests"]  # later rounds: at most the bound
    for r in range(1, by["large"]["rounds"] + 1):  # every request within the budget
        assert pl.read_parquet(work / f"round-{r}.parquet")["prompt_tokens"].max() <= 2_000
    packs = pl.read_parquet(work / "round-1.input.parquet")["__pack"].to_list()
    for shop, count in (("small", 12), ("large", 5000)):  # every item in exactly one pack of round 1
        for n in range(count):
            needle = f"] note number {n} of {shop}\n"
            assert sum(p.count(needle) for p in packs) == 1, (shop, n)


def test_killed_in_round_two_then_rerun_pays_nothing_again_from_round_one(sim, tmp_path):
    data = notes({"a": 3000, "b": 2500})
    with sim(latency_ms=15) as s:
        job = reduce_job(tmp_path, s.base_url, data, budget=1_500)
        chain = estimate(Job.load(job)).chain
        assert chain is not None and len(chain["rounds"]) >= 2
        round_one = chain["rounds"][0]["requests"]
        proc = subprocess.Popen([PIPELINE, "run", str(job), "--plain", "--yes"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        work = tmp_path / "out/fold.reduce.work"
        wait_for(lambda: (work / "round-2.input.parquet").exists() or proc.poll() is not None, timeout_s=120)
        wait_for(lambda: s.stats.ok > round_one or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        sent_before = s.stats.requests
        final = subprocess.run([PIPELINE, "run", str(job), "--plain", "--yes"], capture_output=True, text=True,
                               timeout=180)
        assert final.returncode == 0, final.stderr
        assert s.stats.duplicate_ok <= 16  # only what was in flight at the kill, none of round 1
        assert s.stats.requests - sent_before < chain["requests"] - round_one + 16
    out = pl.read_parquet(tmp_path / "out/fold.reduce.parquet")
    assert (out["status"] == "ok").all() and out.height == 2


def test_changing_one_group_resends_only_that_groups_packs(sim, tmp_path):
    data = notes({"a": 800, "b": 800, "c": 5})
    with sim() as s:
        job = reduce_job(tmp_path, s.base_url, data, budget=1_200)
        assert run(Job.load(job)).exit_code == 0
        before = pl.read_parquet(tmp_path / "out/fold.reduce.parquet").sort("shop")
        first = s.stats.requests
        changed = data.with_columns(pl.when((pl.col("shop") == "b") & (pl.col("n") == 10))
                                    .then(pl.lit("a different note")).otherwise(pl.col("note")).alias("note"))
        changed.write_parquet(tmp_path / "notes.parquet")
        assert run(Job.load(job)).exit_code == 0
        again = s.stats.requests - first
    after = pl.read_parquet(tmp_path / "out/fold.reduce.parquet").sort("shop")
    b = before.filter(pl.col("shop") == "b").row(0, named=True)
    # b's packs from the changed one on are cut anew (a shorter note moves the boundaries after it), and its path up
    # the fold: never a pack of a or c
    assert 1 <= again <= b["requests"]
    assert after.filter(pl.col("shop") != "b")["content"].to_list() == \
        before.filter(pl.col("shop") != "b")["content"].to_list()


def test_map_then_reduce_folds_the_maps_answers_by_a_kept_column(sim, make_job, tmp_path):
    with sim() as s:
        job = themes_job(make_job, s.base_url, rows=60, map_max_tokens=20, max_items_tokens=3000)
        result = run(Job.load(job))
        assert result.exit_code == 0 and result.reduce is not None
        assert s.stats.requests == 60 + 3  # the map's rows, then one request per product
    out = pl.read_parquet(tmp_path / "out/result.reduce.parquet").sort("product")
    assert out["product"].to_list() == ["kettle", "lamp", "tent"] and (out["items"] == 20).all()
    assert result.manifest_data["reduce"]["groups"] == 3 and result.manifest_data["reduce"]["requests"] == 3
    from tests.conftest import run_cli

    report = run_cli("report", tmp_path / "out/result.parquet")
    assert "reduce: groups (ok / failed)" in report.output and "3 (3 / 0)" in report.output


def test_a_job_of_reduce_alone_validates_and_estimates_its_fold(tmp_path):
    from tests.conftest import run_cli

    job = reduce_job(tmp_path, "http://127.0.0.1:9/v1", notes({"a": 30, "b": 3}))
    checked = run_cli("validate", job)
    assert checked.exit_code == 0 and "a reduce of the input's rows" in checked.output
    assert "reduce │     1 │        2" in checked.output  # one request per group: both fit


def test_fresh_sends_every_pack_again_and_keeps_the_earlier_rounds_aside(sim, tmp_path):
    with sim() as s:
        job = reduce_job(tmp_path, s.base_url, notes({"a": 40, "b": 40}))
        assert run(Job.load(job)).exit_code == 0
        first = s.stats.requests
        assert run(Job.load(job), fresh=True).exit_code == 0
        assert s.stats.requests == 2 * first
    aside = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("fold.reduce.2")]
    assert len(aside) == 1  # the earlier rounds, kept


def _same_folds(a: pl.DataFrame, b: pl.DataFrame) -> None:
    columns = ["shop", "content", "items", "rounds", "requests", "prompt_tokens", "completion_tokens", "status"]
    assert a.sort("shop").select(columns).to_dicts() == b.sort("shop").select(columns).to_dicts()


def test_batch_mode_gives_the_same_table_as_online_at_half_the_price(sim, tmp_path):
    data = notes({"a": 600, "b": 40})
    (tmp_path / "online").mkdir()
    (tmp_path / "batch").mkdir()
    with sim(batch_delay_s=0.05) as s:
        online = reduce_job(tmp_path / "online", s.base_url, data, budget=1_200)
        assert run(Job.load(online)).exit_code == 0
        sent_online = s.stats.requests
        batch = reduce_job(tmp_path / "batch", s.base_url, data, budget=1_200)
        batch.write_text(batch.read_text() + 'mode = "batch"\n[batch]\npoll_interval_s = 0.05\n'
                         'poll_max_interval_s = 0.2\n')
        result = run(Job.load(batch))
        assert result.exit_code == 0 and result.reduce is not None
        assert s.stats.requests == sent_online  # nothing of the batch run went online
    by_online = pl.read_parquet(tmp_path / "online/out/fold.reduce.parquet")
    by_batch = pl.read_parquet(tmp_path / "batch/out/fold.reduce.parquet")
    _same_folds(by_online, by_batch)
    rounds = int(by_batch["rounds"].max())  # type: ignore[arg-type]
    assert rounds >= 2 and s.stats.batches_created == rounds  # each round is one batch
    assert by_batch["cost_usd"].sum() == pytest.approx(by_online["cost_usd"].sum() / 2)


def test_no_wait_goes_one_round_per_run_until_the_fold_is_done(sim, tmp_path):
    from tests.conftest import run_cli

    data = notes({"a": 600, "b": 40})
    with sim(batch_delay_s=0.05) as s:
        job = reduce_job(tmp_path, s.base_url, data, budget=1_200)
        runs, manifest = 0, tmp_path / "out/fold.manifest.json"
        while True:
            done = run_cli("run", job, "--mode", "batch", "--no-wait", "--yes")
            runs += 1
            assert done.exit_code == 0, done.output
            if json.loads(manifest.read_text())["status"] == "complete":
                break
            assert "packs are still in batches" in done.output and runs < 10
            # the next run (a cron's) comes once the provider has ended the round's batch
            wait_for(lambda: all(b["status"] == "completed" for b in s.sim.batch_api.batches.values()))
        rounds = int(pl.read_parquet(tmp_path / "out/fold.reduce.parquet")["rounds"].max())  # type: ignore[arg-type]
        assert runs == rounds + 1 and s.stats.batches_created == rounds  # no round submitted twice
        assert s.stats.requests == 0
    out = pl.read_parquet(tmp_path / "out/fold.reduce.parquet")
    assert (out["status"] == "ok").all() and out.height == 2


def test_after_a_sample_the_chain_estimate_adds_the_rounds_the_measured_answers_need(sim, make_job, tmp_path):
    from tests.conftest import run_cli

    with sim() as s:
        job = themes_job(make_job, s.base_url, rows=300, map_max_tokens=400, max_items_tokens=2500)
        before = run_cli("estimate", job)
        assert before.exit_code == 0 and "expected after the sample" not in before.output
        bound = estimate(Job.load(job)).chain
        sampled = run_cli("run", job, "--sample", "20")
        assert sampled.exit_code == 0, sampled.output
        after = estimate(Job.load(job)).chain
    assert after is not None and bound is not None and after["expected"] is not None
    # the sim's answers are far shorter than max_tokens = 400: fewer packs than the bound's
    assert after["expected"]["requests"] < bound["requests"] == after["requests"]
    assert after["expected"]["cost_usd"] < bound["cost_usd_max"]
    assert "sample's mean" in after["expected"]["basis"]
    shown = run_cli("estimate", job)
    assert "expected after the sample" in shown.output and "cost bound" in shown.output


def test_one_budget_bounds_the_map_and_every_reduce_round_of_a_run(sim, make_job, tmp_path):
    with sim() as s:
        job = themes_job(make_job, s.base_url, rows=600, map_max_tokens=20, max_items_tokens=600)
        unlimited = run(Job.load(job))
        assert unlimited.reduce is not None and unlimited.exit_code == 0
        map_cost, reduce_cost = unlimited.stats.cost_usd, unlimited.reduce.cost_usd
        # a budget the map fits in and the whole chain does not: the reduce stops before crossing it
        cap = map_cost + reduce_cost / 2
        job.write_text(job.read_text() + f"[budget]\nmax_cost_usd = {cap}\n")
        capped = run(Job.load(job), fresh=True)
    assert capped.reduce is not None and type(capped.reduce.stopped).__name__ == "BudgetExceeded"
    assert capped.stats.cost_usd == pytest.approx(map_cost)
    assert capped.stats.cost_usd + capped.reduce.cost_usd <= cap
    assert capped.exit_code == 3
    out = pl.read_parquet(tmp_path / "out/result.reduce.parquet")
    assert (out["status"] == "error").all() and out["error"].str.contains("max_cost_usd").all()
