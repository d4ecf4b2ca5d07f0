"""Image generation end to end over the simulator: files beside the output, whole and of the asked size, priced by
the image-token table; resumes that never pay twice and regenerate what was lost; refusals before the run."""

from __future__ import annotations

import hashlib
import io
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline.errors import JobError
from pipeline.job import Job
from pipeline.plan import check
from pipeline.pricing import lookup_price
from pipeline.providers.registry import DESCRIPTORS
from pipeline.run import run
from pipeline.tokens import get_encoding
from tests.conftest import run_cli, wait_for

OPENAI = DESCRIPTORS["openai"].price_ids  # genai-prices' ids of OpenAI's models

PIPELINE = str(Path(sys.executable).parent / "pipeline")
TOKENS_MEDIUM_1536 = 1568  # the guide's table: one medium 1536x1024 image


def products(n: int) -> pl.DataFrame:
    return pl.DataFrame({"sku": [f"p{i:04d}" for i in range(n)],
                         "name": [f"{['blue', 'red', 'green'][i % 3]} lamp number {i}" for i in range(n)]})


def image_job(make_job, base_url: str, *, rows: int = 20, request: str = "", mode: str = "online",
              data: pl.DataFrame | None = None, provider: str = "openai", limits: str = "") -> Path:
    req = textwrap.dedent(f'''\
        endpoint = "images"
        model = "gpt-image-1.5"
        prompt = "A catalogue photo of a {{{{ name }}}}"
        size = "1536x1024"
        quality = "medium"
        mode = "{mode}"
        ''') + request
    return make_job(data=products(rows) if data is None else data, request=req,
                    input='path = "input.parquet"\nid = "sku"\nkeep = ["name"]', limits=limits,
                    extra=f'[api]\nprovider = "{provider}"\nbase_url = "{base_url}"\n'
                          '[batch]\npoll_interval_s = 0.05\npoll_max_interval_s = 0.2\n')


def table_cost(prompts: list[str], per_image: int, *, batch: bool = False) -> float:
    """What the rows cost by the token rule: text tokens at the input rate, image tokens at the image rate."""
    price = lookup_price("gpt-image-1.5", price_ids=OPENAI, output_keys=("output_image_mtok", "output_mtok"))
    assert price is not None
    enc = get_encoding("o200k_base")
    text = sum(len(enc.encode_ordinary(p)) for p in prompts)
    rates = (price.batch_input, price.batch_output) if batch else (price.input, price.output)
    return (text * rates[0].base + len(prompts) * per_image * rates[1].base) / 1_000_000


def check_files(out: pl.DataFrame, size: tuple[int, int]) -> None:
    for path, digest, nbytes in out.select("image_path", "image_sha256", "image_bytes").iter_rows():
        data = Path(path).read_bytes()
        assert len(data) == nbytes and hashlib.sha256(data).hexdigest() == digest
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == size and im.format == "PNG"


@pytest.mark.parametrize("mode", ["online", "batch"])
def test_an_image_job_writes_whole_images_of_the_asked_size_priced_by_the_table(make_job, sim, tmp_path, mode):
    with sim(batch_delay_s=0.3) as s:
        job = image_job(make_job, s.base_url, rows=200, mode=mode)
        estimate = run_cli("estimate", job, "--json")
        assert estimate.exit_code == 0, estimate.output
        result = run(Job.load(job))
        assert result.exit_code == 0, result.stats.errors
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 200 and (out["status"] == "ok").all()
    assert out.schema["image_path"] == pl.String and out["mime_type"].unique().to_list() == ["image/png"]
    check_files(out, (1536, 1024))
    assert out["image_path"].n_unique() == 200  # one file per row, none shared by chance
    assert all(Path(p).parent == tmp_path / "out/result.images" for p in out["image_path"])
    prompts = [f"A catalogue photo of a {n}" for n in out["name"]]
    expected = table_cost(prompts, TOKENS_MEDIUM_1536, batch=mode == "batch")
    assert out["cost_usd"].sum() == pytest.approx(expected, rel=1e-9)
    assert (out["completion_tokens"] == TOKENS_MEDIUM_1536).all()
    import json

    est = json.loads(estimate.output)
    key = "batch_cost_usd_expected" if mode == "batch" else "cost_usd_expected"
    assert est[key] == pytest.approx(expected, rel=1e-9)  # a documented size and quality: the estimate is exact
    assert est["made"] == ["images to make", "200"]


def test_several_images_per_row_are_lists_and_a_bad_row_fails_alone(make_job, sim, tmp_path):
    data = products(6).with_columns(
        pl.when(pl.col("sku") == "p0001").then(pl.lit("SIM_NOT_IMAGE lamp"))
        .when(pl.col("sku") == "p0002").then(pl.lit("SIM_400 lamp")).otherwise(pl.col("name")).alias("name"))
    with sim() as s:
        job = image_job(make_job, s.base_url, data=data, request="n = 2\n")
        result = run(Job.load(job))
        assert result.exit_code == 1 and result.stats.failed == 2
    out = pl.read_parquet(tmp_path / "out/result.parquet").sort("sku")
    assert out.schema["image_path"] == pl.List(pl.String)
    by = {r["sku"]: r for r in out.iter_rows(named=True)}
    assert by["p0001"]["error_type"] == "invalid_answer" and "not a PNG" in by["p0001"]["error"]
    assert by["p0001"]["cost_usd"] > 0 and by["p0001"]["image_path"] is None  # paid for, so counted
    assert by["p0002"]["status"] == "error" and "HTTP 400" in by["p0002"]["error"]
    ok = out.filter(pl.col("status") == "ok")
    assert ok.height == 4 and (ok["image_path"].list.len() == 2).all()
    for paths, hashes in ok.select("image_path", "image_sha256").iter_rows():
        assert [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths] == hashes
        assert len(set(hashes)) == 2  # two different images, two files


def test_a_deleted_or_changed_image_is_made_again_and_nothing_else_is_sent(make_job, sim, tmp_path):
    with sim() as s:
        job = image_job(make_job, s.base_url, rows=12)
        assert run(Job.load(job)).exit_code == 0
        out = pl.read_parquet(tmp_path / "out/result.parquet")
        deleted, changed = Path(out["image_path"][3]), Path(out["image_path"][7])
        deleted.unlink()
        changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")  # same size, other bytes
        again = run(Job.load(job))
        assert again.exit_code == 0 and again.stats.requests_sent == 2 and s.stats.requests == 14
    out2 = pl.read_parquet(tmp_path / "out/result.parquet")
    check_files(out2, (1536, 1024))
    assert out2["image_path"].to_list() == out["image_path"].to_list()  # the same images, made again


def test_killed_midway_then_rerun_every_row_once_and_no_file_half_written(make_job, sim, tmp_path):
    rows, concurrency = 300, 8
    with sim(latency_ms=5, latency_jitter_ms=10) as s:
        job = image_job(make_job, s.base_url, rows=rows, limits=f"concurrency = {concurrency}")
        kills = 0
        for after in (40, 150):
            proc = subprocess.Popen([PIPELINE, "run", str(job), "--plain", "--yes"], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            wait_for(lambda after=after, proc=proc: s.stats.ok >= after or proc.poll() is not None)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(10)
        assert kills == 2
        final = subprocess.run([PIPELINE, "run", str(job), "--plain", "--yes"], capture_output=True, text=True,
                               timeout=120)
        assert final.returncode == 0, final.stderr
        assert s.stats.duplicate_ok <= kills * concurrency  # only what was in flight at each kill
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == rows and out["sku"].n_unique() == rows and (out["status"] == "ok").all()
    check_files(out, (1536, 1024))
    folder = tmp_path / "out/result.images"
    assert not list(folder.glob(".*.part"))  # the rerun swept what the kills left half-written
    for f in folder.iterdir():  # every file under its final name is whole: its name carries its hash
        assert hashlib.sha256(f.read_bytes()).hexdigest()[:16] == f.stem.split("-")[2]


def test_an_answer_by_url_is_fetched_at_once(make_job, sim, tmp_path):
    data = products(3).with_columns(("SIM_URL " + pl.col("name")).alias("name"))
    with sim() as s:
        job = image_job(make_job, s.base_url, data=data)
        assert run(Job.load(job)).exit_code == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    check_files(out, (1536, 1024))


@pytest.mark.parametrize(("request_keys", "provider", "message"), [
    ("", "anthropic", 'provider = "anthropic" has no images API'),
    ('model = "dall-e-3"\n', "openai", "was retired on 2026-05-12"),
    ('quality = "hd"\n', "openai", "quality must be one of low, medium, high, auto for gpt-image-1.5"),
    ('size = "1792x1024"\n', "openai", "size = '1792x1024' must be one of auto, 1024x1024"),
    ('style = "vivid"\n', "openai", "style is not taken by GPT image models"),
    ('output_compression = 50\n', "openai", 'applies with output_format = "jpeg" or "webp" only'),
    ('background = "transparent"\noutput_format = "jpeg"\n', "openai", "transparent background needs"),
    ("n = 11\n", "openai", "can be at most 10"),
    ("max_tokens = 10\n", "openai", 'does not apply to endpoint = "images"'),
    ('mode = "batch"\n', "azure", 'Batch API of provider = "azure" does not take images requests'),
])
def test_what_the_api_refuses_is_refused_before_the_run_in_one_line(make_job, request_keys, provider, message):
    base = "https://x.openai.azure.com/openai/v1" if provider == "azure" else "http://127.0.0.1:9/v1"
    job = with_keys(image_job(make_job, base, provider=provider), request_keys)
    with pytest.raises(JobError) as e:
        check(Job.load(job))
    assert message in str(e.value) and "\n" not in str(e.value)


def with_keys(job: Path, request_keys: str) -> Path:
    """The job with these [request] keys, each replacing the job's own of that name."""
    text = job.read_text()
    for line in request_keys.splitlines():
        name = line.split(" = ")[0]
        text = "\n".join(ln for ln in text.splitlines() if not ln.startswith(f"{name} = ")) + "\n"
        text = text.replace("[request]\n", f"[request]\n{line}\n", 1)
    job.write_text(text)
    return job


def test_free_sizes_are_taken_by_the_models_that_take_them(make_job, sim, tmp_path):
    with sim() as s:
        job = with_keys(image_job(make_job, s.base_url, rows=2), 'model = "gpt-image-2"\nsize = "1536x864"\n')
        assert any("not documented" in w for w in check(Job.load(job)).warnings)
        assert run(Job.load(job)).exit_code == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    check_files(out, (1536, 864))


def test_images_run_on_the_local_engine_only(make_job):
    job = image_job(make_job, "http://127.0.0.1:9/v1")
    job.write_text(job.read_text() + '\n[engine]\nkind = "ray"\n')
    with pytest.raises(JobError, match="runs on the local engine only"):
        Job.load(job)


def test_beside_an_object_storage_output_the_images_are_objects_too(make_job, sim, tmp_path, s3):
    fs = s3("s3://data/")
    with sim() as s:
        job = image_job(make_job, s.base_url, rows=6)
        job.write_text(job.read_text().replace('path = "out/result.parquet"', 'path = "s3://data/out/art.parquet"'))
        assert run(Job.load(job)).exit_code == 0
        assert run(Job.load(job)).stats.requests_sent == 0  # the stage on this machine keeps the journal and files
        assert s.stats.requests == 6
    import pyarrow.parquet as pq

    out = pl.from_arrow(pq.read_table("data/out/art.parquet", filesystem=fs))
    assert isinstance(out, pl.DataFrame) and out.height == 6
    for url, digest in out.select("image_path", "image_sha256").iter_rows():
        assert url.startswith("s3://data/out/art.images/")
        data = fs.open_input_stream(url.removeprefix("s3://")).read()
        assert hashlib.sha256(data).hexdigest() == digest
