import base64
import io
import json
import math
from pathlib import Path

import orjson
import polars as pl
import pytest
from PIL import Image as PILImage

from pipeline.errors import JobError
from pipeline.images import (
    Image,
    ImageLimits,
    ImageProblem,
    anthropic_tokens,
    check,
    openai_rule,
    patch_tokens,
    patches,
    sniff,
    tile_tokens,
)
from pipeline.job import Job
from pipeline.planning import estimate
from pipeline.run import run
from tests.conftest import run_cli

# -- the documented examples --------------------------------------------------------------------------------


def test_openai_tile_rule_documented_examples():
    # platform.openai.com/docs/guides/images-vision, "Calculating costs", for gpt-4o
    assert tile_tokens(1024, 1024, "high") == 765
    assert tile_tokens(2048, 4096, "high") == 1105
    assert tile_tokens(4096, 8192, "low") == 85
    gpt4o = openai_rule("gpt-4o-2024-08-06")
    assert gpt4o.tokens(Image(width=1024, height=1024, detail="high")) == 765
    assert gpt4o.tokens(Image(width=2048, height=4096, detail="auto")) == 1105  # auto counted as high
    assert gpt4o.tokens(Image(width=4096, height=8192, detail="low")) == 85
    assert openai_rule("gpt-4.1").tokens(Image(width=1024, height=1024)) == 765
    assert openai_rule("gpt-5").tokens(Image(width=1024, height=1024)) == 765


def test_openai_patch_rule_documented_examples():
    # the same page: 1024 x 1024 is 1,024 patches; 1800 x 2400 is scaled to 1056 x 1408, 1,452 patches
    assert patches(1024, 1024) == 1024
    assert patches(1800, 2400) == 1452
    assert patches(20_000, 20_000) <= 1536
    assert patch_tokens(1024, 1024, 1.62) == math.ceil(1024 * 1.62)
    assert openai_rule("gpt-4.1-mini").tokens(Image(width=1800, height=2400)) == math.ceil(1452 * 1.62)
    assert openai_rule("gpt-4.1-nano-2025-04-14").tokens(Image(width=1024, height=1024)) == \
        math.ceil(1024 * 2.46)
    assert openai_rule("gpt-5-mini").tokens(Image(width=64, height=64, detail="low")) == math.ceil(4 * 1.62)
    assert openai_rule("o4-mini").tokens(Image(width=64, height=64)) == math.ceil(4 * 1.72)


def test_gpt_4o_mini_has_its_own_constants():
    mini = openai_rule("gpt-4o-mini")
    assert mini.tokens(Image(width=1024, height=1024, detail="high")) == 2833 + 4 * 5667
    assert mini.tokens(Image(width=1024, height=1024, detail="low")) == 2833


def test_anthropic_rule_and_resize():
    # docs.anthropic.com vision: tokens = width * height / 750; a 1092 x 1092 image is about 1,590 tokens
    assert anthropic_tokens(1000, 1000) == 1334
    assert anthropic_tokens(1092, 1092) == 1590
    assert anthropic_tokens(200, 200) == 54
    assert anthropic_tokens(4000, 4000) <= math.ceil(784 * 1568 / 750)  # resized first
    assert anthropic_tokens(3136, 1000) == anthropic_tokens(1568, 500)  # long edge to 1,568


def test_unknown_model_is_bounded_and_says_so():
    rule = openai_rule("llava-1.6")
    assert not rule.exact and "no known image rule" in rule.name
    img = Image(width=1024, height=1024)
    known = (openai_rule("gpt-4o"), openai_rule("gpt-4.1-nano"))
    assert rule.tokens(img) >= max(r.tokens(img) for r in known)
    url = Image(url="https://example.com/a.png")  # no dimensions offline: the most an image can cost
    assert rule.tokens(url) >= rule.tokens(Image(width=8000, height=8000))
    assert openai_rule("gpt-4o").tokens(url) == 85 + 170 * 8


# -- reading and checking -------------------------------------------------------------------------------------

def _image(fmt: str = "PNG", size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    PILImage.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("GIF", "image/gif"),
                                      ("WEBP", "image/webp")])
def test_sniff_reads_type_and_size_from_the_header(fmt, mime):
    assert sniff(_image(fmt, (64, 48)))[:3] == (mime, 64, 48)


def test_check_refuses_what_the_provider_refuses():
    with pytest.raises(ImageProblem, match="not a PNG, JPEG, GIF or WEBP image"):
        check(b"GIF89 but not really", ImageLimits(10**6, False, None, False, None))
    with pytest.raises(ImageProblem, match="more than the provider takes"):
        check(_image(), ImageLimits(50, False, None, False, None))
    with pytest.raises(ImageProblem, match=r"40 x 30 px, more than the provider takes \(.* at most 32 x 32 px\)"):
        check(_image(), ImageLimits(10**6, False, 32, False, None))
    buf = io.BytesIO()
    frames = [PILImage.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    with pytest.raises(ImageProblem, match="animated GIF"):
        check(buf.getvalue(), ImageLimits(10**6, False, None, False, None))


def _photos(tmp_path: Path) -> pl.DataFrame:
    """Six rows: good PNG, JPEG and WEBP files, a PNG under a .jpg name, a text file named .jpg, a missing file."""
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.png").write_bytes(_image("PNG", (100, 80)))
    (folder / "b.jpg").write_bytes(_image("JPEG", (600, 400), (10, 200, 10)))
    (folder / "c.webp").write_bytes(_image("WEBP", (300, 300), (10, 10, 200)))
    (folder / "d.jpg").write_bytes(_image("PNG", (50, 50), (120, 120, 0)))  # a PNG behind a .jpg name: fine
    (folder / "e.jpg").write_text("this is not an image at all")
    return pl.DataFrame({"review_id": [f"r{i}" for i in range(6)], "product": ["x"] * 6,
                         "text": [f"photo {i}" for i in range(6)],
                         "file": ["pics/a.png", "pics/b.jpg", "pics/c.webp", "pics/d.jpg", "pics/e.jpg",
                                  "pics/missing.png"]})


IMAGE_REQUEST = ('model = "gpt-4o"\nprompt = "Describe {{ text }}."\nmax_tokens = 40\n'
                 'images = [{ source = "{{ file }}", detail = "high" }]')


def test_validate_lists_each_bad_image_with_its_row(make_job, tmp_path):
    job = make_job(data=_photos(tmp_path), request=IMAGE_REQUEST)
    result = run_cli("validate", job, "--rows", "1")
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "row r4: bad image:" in out and "e.jpg: not a PNG, JPEG, GIF or WEBP image" in out
    assert "row r5: bad image:" in out and "missing.png: image file not found" in out
    assert "r3" not in out.split("will fail")[0].split("cannot be sent")[1]  # the PNG named .jpg is fine
    assert "2 row(s) will fail for their image" in out
    assert "characters of base64" in out  # the body is shown, its image cut short


def test_run_sends_good_images_and_fails_bad_rows_alone(make_job, tmp_path, sim):
    job = Job.load(make_job(data=_photos(tmp_path), request=IMAGE_REQUEST))
    est = estimate(job)
    assert est.rows_bad_image == 2 and est.requests == 4
    assert est.image_tokens == sum(tile_tokens(w, h, "high") for w, h in ((100, 80), (600, 400), (300, 300), (50, 50)))
    assert est.prompt_tokens_exact and "tile rule" in str(est.image_tokens_basis)
    with sim() as s:
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 4
    assert result.exit_code == 1  # two rows failed
    out = pl.read_parquet(job.output.path).sort("review_id")
    assert out["status"].to_list() == ["ok", "ok", "ok", "ok", "error", "error"]
    assert out["error_type"].to_list()[4:] == ["bad_image", "bad_image"]
    assert "not a PNG, JPEG, GIF or WEBP image" in out["error"][4]
    assert out["attempts"][4] is None  # nothing was sent for it
    assert out["prompt_tokens"].sum() == est.prompt_tokens  # the simulator bills by the same rule: exact
    journal = Path(job.output.path).with_suffix(".journal.sqlite")
    stored = b"".join(p.read_bytes() for p in journal.parent.glob(journal.name + "*"))
    assert journal.exists() and base64.b64encode(_image("PNG", (100, 80)))[:40] not in stored  # no image bytes


def test_resume_sends_nothing_twice_and_a_changed_image_again(make_job, tmp_path, sim):
    job = Job.load(make_job(data=_photos(tmp_path), request=IMAGE_REQUEST))
    with sim() as s:
        run(job, base_url=s.base_url)
        assert s.stats.requests == 4
        run(job, base_url=s.base_url)
        assert s.stats.requests == 4  # resumed: every answered image is known by its key
        (tmp_path / "pics" / "b.jpg").write_bytes(_image("JPEG", (600, 400), (250, 250, 0)))  # same path, new bytes
        run(job, base_url=s.base_url)
        assert s.stats.requests == 5  # only the changed image is sent again
        (tmp_path / "pics" / "e.jpg").write_bytes(_image("PNG", (20, 20)))  # the bad one mended
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 6
    assert result.stats.failed == 1 and result.stats.resumed == 4


def test_the_same_file_twice_is_paid_once(make_job, tmp_path, sim):
    df = _photos(tmp_path).head(2).with_columns(pl.lit("pics/a.png").alias("file"), pl.lit("same").alias("text"))
    job = Job.load(make_job(data=df, request=IMAGE_REQUEST))
    with sim() as s:
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 1
    assert result.stats.deduplicated == 1


def test_binary_column_and_url_images(make_job, sim):
    data = pl.DataFrame({"review_id": ["a", "b"], "product": ["x", "y"], "text": ["one", "two"],
                         "pic": [_image("PNG", (64, 64)), _image("JPEG", (32, 32))]},
                        schema_overrides={"pic": pl.Binary})
    request = ('model = "gpt-4o"\nprompt = "Describe {{ text }}."\nmax_tokens = 40\nimage_position = "before"\n'
               'images = ["{{ pic }}", "https://example.com/logo.png"]')
    job = Job.load(make_job(data=data, request=request))
    est = estimate(job)
    assert est.url_images == 2 and not est.prompt_tokens_exact and "URL image" in str(est.image_tokens_basis)
    from pipeline.plan import check as offline

    checked = offline(job)
    from pipeline.source import read_head

    req = checked.renderer.render_chunk(read_head(checked.source, checked.renderer.columns, 2)).requests[0]
    content = orjson.loads(req.body)["messages"][-1]["content"]
    assert [p["type"] for p in content] == ["image_url", "image_url", "text"]  # before the text
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert content[1]["image_url"] == {"url": "https://example.com/logo.png"}
    with sim() as s:
        result = run(job, base_url=s.base_url)
    assert result.exit_code == 0
    out = pl.read_parquet(job.output.path)
    # billed: the inline image by its size, the URL at the rule's most (the simulator cannot fetch it either)
    assert out["prompt_tokens"].sum() == est.prompt_tokens


def test_truncated_image_passes_the_header_check_and_the_server_refuses_it(make_job, tmp_path, sim):
    data = _photos(tmp_path).head(2)
    (tmp_path / "pics" / "b.jpg").write_bytes(_image("PNG", (600, 400))[:120])  # header intact, data cut
    job = Job.load(make_job(data=data, request=IMAGE_REQUEST))
    with sim() as s:
        result = run(job, base_url=s.base_url)
    out = pl.read_parquet(job.output.path).sort("review_id")
    assert out["status"].to_list() == ["ok", "error"]
    assert out["error_type"][1] == "http_400", out["error"][1]
    assert "Invalid image: the image data could not be decoded" in out["error"][1]
    assert result.stats.failed == 1


def test_anthropic_images_over_the_simulator(make_job, tmp_path, sim):
    request = 'model = "claude-sonnet-4-5"\nprompt = "Describe {{ text }}."\nmax_tokens = 40\nimages = ["{{ file }}"]'
    with sim() as s:
        job = Job.load(make_job(data=_photos(tmp_path), request=request,
                                extra=f'[api]\nprovider = "anthropic"\nbase_url = "{s.base_url}"'))
        est = estimate(job)
        assert "Anthropic" in str(est.image_tokens_basis)
        result = run(job)
        assert s.stats.requests == 4
    out = pl.read_parquet(job.output.path).sort("review_id")
    assert out["status"].to_list() == ["ok"] * 4 + ["error"] * 2
    assert out.filter(pl.col("status") == "ok")["prompt_tokens"].sum() <= est.prompt_tokens  # a bound
    assert result.exit_code == 1
    from pipeline.plan import check as offline
    from pipeline.source import read_head

    checked = offline(job)
    body = orjson.loads(checked.renderer.render_chunk(read_head(checked.source, checked.renderer.columns, 1))
                        .requests[0].body)
    content = body["messages"][-1]["content"]
    assert content[0] == {"type": "text", "text": "Describe photo 0."}
    assert content[1]["type"] == "image" and content[1]["source"]["type"] == "base64"
    assert content[1]["source"]["media_type"] == "image/png"


def test_oversize_image_fails_its_row(make_job, tmp_path, sim):
    data = _photos(tmp_path).head(2)
    (tmp_path / "pics" / "b.jpg").write_bytes(_image("PNG", (8001, 4)))  # wider than Claude takes
    request = 'model = "claude-sonnet-4-5"\nprompt = "Describe {{ text }}."\nmax_tokens = 40\nimages = ["{{ file }}"]'
    job = Job.load(make_job(data=data, request=request, extra='[api]\nprovider = "anthropic"\n'
                                                               'base_url = "http://127.0.0.1:9/v1"'))
    est = estimate(job)
    assert est.rows_bad_image == 1
    assert "8001 x 4 px, more than the provider takes (5.24288 MB base64-encoded per image, at most 8000 x 8000 px)" \
        in est.bad_images[0][1]


def test_job_errors_for_images(make_job):
    def bad(request: str, extra: str = "") -> str:
        with pytest.raises(JobError) as e:
            Job.load(make_job(request=request, extra=extra))
        return str(e.value)

    base = 'model = "gpt-4o"\nprompt = "x"\n'
    assert "[request].images[0].detail must be one of low, high, auto" in bad(
        base + 'images = [{ source = "{{ f }}", detail = "max" }]')
    assert "[request].images[0] must be a template string or a table" in bad(base + 'images = [{ path = "x" }]')
    assert "[request].image_position must be one of after, before" in bad(
        base + 'images = ["{{ f }}"]\nimage_position = "middle"')
    assert 'images[0].detail does not apply to provider = "anthropic"' in bad(
        base + 'images = [{ source = "{{ f }}", detail = "low" }]', '[api]\nprovider = "anthropic"')
    assert 'does not apply to endpoint = "embeddings"' in bad(
        'endpoint = "embeddings"\nmodel = "text-embedding-3-small"\ninput = "x"\nimages = ["{{ f }}"]')


def test_image_template_naming_a_missing_column_is_refused(make_job):
    job = Job.load(make_job(request='model = "gpt-4o"\nprompt = "x"\nimages = ["{{ photo }}"]'))
    result = run_cli("validate", job.source)
    assert result.exit_code == 2
    assert "[request].images[0]: template uses column(s) the input lacks: photo" in result.output


def test_estimate_json_shows_image_tokens_apart(make_job, tmp_path):
    job = make_job(data=_photos(tmp_path), request=IMAGE_REQUEST)
    result = run_cli("estimate", job, "--json")
    data = json.loads(result.output)
    assert data["image_tokens"] > 0 and data["prompt_tokens"] > data["image_tokens"]
    assert data["rows_bad_image"] == 2
