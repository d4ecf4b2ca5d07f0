"""``pipeline.map``: a frame in, the same kind of frame out, through the same engine, journal and estimate."""

import asyncio
import tomllib
from pathlib import Path
from typing import Literal

import pandas as pd
import polars as pl
import pyarrow as pa
import pytest
from pydantic import BaseModel

import pipeline
from pipeline.job import Job

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["sentiment", "stars"],
          "properties": {"sentiment": {"type": "string", "enum": ["positive", "negative"]},
                         "stars": {"type": "integer"}}}


class Label(BaseModel):
    sentiment: Literal["positive", "negative"]
    stars: int


def frame(n: int = 12) -> pl.DataFrame:
    return pl.DataFrame({"text": [f"review {i}: {'great' if i % 2 else 'poor'} product" for i in range(n)],
                         "n": list(range(n))})


@pytest.mark.parametrize("name", ["summarise.toml", "classify.toml", "route_tickets.toml", "describe_photos.toml",
                                  "embed.toml", "classify_anthropic.toml"])
def test_a_job_in_code_equals_the_job_file_and_to_toml_loads_back_equal(name, tmp_path):
    path = ROOT / "jobs" / name
    from_file = Job.load(path)
    assert Job.from_dict(tomllib.loads(path.read_text()), base=path.parent) == from_file
    written = tmp_path / "again.toml"
    written.write_text(from_file.to_toml(tmp_path))
    assert Job.load(written) == from_file


def test_a_wrong_key_in_code_is_named_like_in_a_file():
    with pytest.raises(pipeline.PipelineError, match=r"<code>: \[request\].promt is not a known key; did you "
                                                     r"mean 'prompt'\?"):
        Job.from_dict({"name": "x", "input": {"path": "a.parquet"}, "output": {"path": "o.parquet"},
                       "request": {"model": "gpt-4o-mini", "promt": "{{ text }}"}})


@pytest.mark.parametrize("kind", ["polars", "lazy", "pandas", "arrow"])
def test_map_returns_the_same_kind_with_every_row_in_order_and_typed_columns(sim, tmp_path, kind):
    df = frame()
    given = {"polars": df, "lazy": df.lazy(), "pandas": df.to_pandas(), "arrow": df.to_arrow()}[kind]
    with sim() as s:
        out = pipeline.map(given, model="gpt-4o-mini", prompt="Classify: {{ text }}", schema=SCHEMA,
                           max_tokens=40, base_url=s.base_url, workdir=tmp_path)
    expected_type = {"polars": pl.DataFrame, "lazy": pl.LazyFrame, "pandas": pd.DataFrame, "arrow": pa.Table}[kind]
    assert isinstance(out, expected_type)
    got = pl.from_pandas(out) if kind == "pandas" else out.collect() if kind == "lazy" else pl.DataFrame(out)
    assert got.columns[:4] == ["text", "n", "sentiment", "stars"]
    assert got["n"].to_list() == list(range(12)) and (got["status"] == "ok").all()
    assert got.schema["stars"] == pl.Int64 and set(got["sentiment"]) <= {"positive", "negative"}


def test_a_pydantic_schema_gives_the_columns_of_the_equivalent_json_schema_and_a_second_map_sends_nothing(
        sim, tmp_path):
    df = frame()
    with sim() as s:
        by_model = pipeline.map(df, model="gpt-4o-mini", prompt="Classify: {{ text }}", schema=Label, max_tokens=40,
                                base_url=s.base_url, workdir=tmp_path)
        sent = s.stats.requests
        again = df.llm.map(model="gpt-4o-mini", prompt="Classify: {{ text }}", schema=Label, max_tokens=40,
                           base_url=s.base_url, workdir=tmp_path)
        assert s.stats.requests == sent == 12  # the second map was answered from the journal
        by_dict = pipeline.map(df, model="gpt-4o-mini", prompt="Classify: {{ text }}", schema=SCHEMA, max_tokens=40,
                               base_url=s.base_url, workdir=tmp_path / "other")
    assert by_model.schema == by_dict.schema
    assert by_model.select("sentiment", "stars").equals(by_dict.select("sentiment", "stars"))
    assert again.select("sentiment", "stars").equals(by_model.select("sentiment", "stars"))


def test_map_works_inside_a_running_event_loop_and_amap_awaits(sim, tmp_path):
    df = frame(5)
    with sim() as s:
        async def notebook_cell():
            inside = pipeline.map(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20,
                                  base_url=s.base_url, workdir=tmp_path)
            awaited = await pipeline.amap(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20,
                                          base_url=s.base_url, workdir=tmp_path)
            return inside, awaited

        inside, awaited = asyncio.run(notebook_cell())
        assert s.stats.requests == 5
    assert inside["content"].to_list() == awaited["content"].to_list() and inside["content"].null_count() == 0


def test_a_map_stopped_by_its_budget_keeps_its_answers_and_the_next_pays_only_the_rest(sim, tmp_path):
    df = frame(200)
    with sim() as s:
        first = pipeline.map(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=40, concurrency=4,
                             max_cost_usd=0.001, base_url=s.base_url, workdir=tmp_path)
        answered = int((first["status"] == "ok").sum())
        assert 0 < answered < 200 and first.height == 200 and first["n"].to_list() == list(range(200))
        done = pipeline.map(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=40, concurrency=4,
                            max_cost_usd=1.0, base_url=s.base_url, workdir=tmp_path)
        assert (done["status"] == "ok").all()
        assert s.stats.duplicate_ok == 0 and s.stats.ok == 200


def test_estimate_of_a_frame_counts_every_row_and_sends_nothing(sim, tmp_path):
    est = pipeline.estimate(frame(30), model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20,
                            workdir=tmp_path)
    assert est.rows == 30 and est.requests == 30 and est.prompt_tokens_exact and est.cost_usd_max


def test_as_models_gives_validated_model_instances(sim, tmp_path):
    with sim() as s:
        out = pipeline.map(frame(4), model="gpt-4o-mini", prompt="Classify: {{ text }}", schema=Label, max_tokens=40,
                           base_url=s.base_url, workdir=tmp_path, as_models=True)
    labels = out["answer"].to_list()
    assert all(isinstance(x, Label) for x in labels)
    assert [x.sentiment for x in labels] == out["sentiment"].to_list()


INTERRUPTED = '''
import asyncio, sys
import polars as pl
import pipeline

df = pl.DataFrame({"text": [f"review {i}" for i in range(400)]})

def cell():
    return pipeline.map(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20, concurrency=4,
                        base_url=sys.argv[1], workdir=sys.argv[2], progress=False)

async def notebook():  # a cell of a notebook: an event loop already runs in this thread
    return cell()

out = asyncio.run(notebook()) if sys.argv[3] == "loop" else cell()
print("answered", int((out["status"] == "ok").sum()), out.height, flush=True)
'''


@pytest.mark.parametrize("where", ["script", "loop"])
def test_an_interrupted_map_keeps_its_answers_and_the_next_pays_only_the_rest(sim, tmp_path, where):
    import signal
    import subprocess
    import sys

    from tests.conftest import wait_for

    script = tmp_path / "cell.py"
    script.write_text(INTERRUPTED)
    with sim(latency_ms=20) as s:
        proc = subprocess.Popen([sys.executable, str(script), s.base_url, str(tmp_path / "work"), where],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
        wait_for(lambda: s.stats.ok >= 40 or proc.poll() is not None)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)  # the kernel's interrupt button sends this
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        answered = int(out.split()[1])
        assert out.split()[2] == "400" and 40 <= answered < 400
        first = s.stats.ok
        done = subprocess.run([sys.executable, str(script), s.base_url, str(tmp_path / "work"), where],
                              capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.split()[1] == "400"
        assert s.stats.duplicate_ok <= first - answered  # only what was in flight at the interrupt
        assert s.stats.ok - first == 400 - answered + (first - answered)


def test_progress_is_one_line_updated_in_place(sim, tmp_path, capsys):
    with sim() as s:
        pipeline.map(frame(30), model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20, base_url=s.base_url,
                     workdir=tmp_path)
    err = capsys.readouterr().err
    assert "pipeline: 30/30 rows" in err and err.count("\n") == 1 and err.endswith("\n")
    with sim() as s:
        pipeline.map(frame(30), model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20, base_url=s.base_url,
                     workdir=tmp_path, progress=False, fresh=True)
    assert capsys.readouterr().err == ""


def test_a_batch_map_without_waiting_returns_a_handle_collected_later(sim, tmp_path):
    df = frame(8)
    with sim(batch_delay_s=0.3) as s:
        handle = pipeline.map(df, model="gpt-4o-mini", prompt="Say {{ text }}", max_tokens=20, base_url=s.base_url,
                              workdir=tmp_path, mode="batch", wait=False, poll_interval_s=0.05)
        assert isinstance(handle, pipeline.frames.BatchHandle) and s.stats.batches_created == 1
        out = handle.collect()
        assert out["n"].to_list() == list(range(8)) and (out["status"] == "ok").all()
        assert s.stats.batches_created == 1  # collected, never submitted again


def test_a_providers_own_keys_in_code_go_to_api_as_in_a_file():
    from pipeline.frames import job_keys

    keys = job_keys(model="gpt-4o-mini", prompt="{{ text }}", provider="azure", deployment="prod-mini",
                    api_version="2024-10-21", base_url="https://r.openai.azure.com")
    assert keys["api"] == {"provider": "azure", "deployment": "prod-mini", "api_version": "2024-10-21",
                           "base_url": "https://r.openai.azure.com"}
    claude = job_keys(model="claude-haiku-4-5", prompt="{{ text }}", provider="anthropic",
                      anthropic_version="2023-06-01")
    assert claude["api"] == {"provider": "anthropic", "anthropic_version": "2023-06-01"}
    assert job_keys(model="m", prompt="p", json_object_schema=True)["api"] == {"json_object_schema": True}
