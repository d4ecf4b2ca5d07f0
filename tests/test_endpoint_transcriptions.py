"""Transcription end to end over the simulator: each file checked before the run (a bad one fails its row alone,
with the reason), uploaded as a multipart form, its text back as typed columns; priced per minute of audio by the
files' own durations, exactly as the estimate said."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import polars as pl
import pytest

from pipeline.errors import JobError
from pipeline.job import Job
from pipeline.plan import check
from pipeline.providers.registry import DESCRIPTORS
from pipeline.run import run
from tests.conftest import run_cli

OPENAI = DESCRIPTORS["openai"].price_ids  # genai-prices' ids of OpenAI's models

RATE = 8_000


def wav(seconds: float, said: str, *, tag: int = 1) -> bytes:
    """A mono 16-bit WAV of silence with ``said`` as its INFO comment (what the simulator "hears"); ``tag`` is
    the format chunk's codec."""
    frames = b"\x00\x00" * int(seconds * RATE)
    fmt = struct.pack("<HHIIHH", tag, 1, RATE, RATE * 2, 2, 16)
    text = said.encode() + b"\x00"
    text += b"\x00" * (len(text) % 2)
    info = b"INFO" + b"ICMT" + struct.pack("<I", len(text)) + text
    body = (b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(frames)) + frames
            + b"LIST" + struct.pack("<I", len(info)) + info)
    return b"RIFF" + struct.pack("<I", 4 + len(body)) + b"WAVE" + body


def calls(folder: Path, n: int) -> tuple[pl.DataFrame, dict[str, tuple[float, str]]]:
    """``n`` good calls, and the broken ones: not audio, too large, an unknown codec, a missing file, an Ogg of
    no codec the API reads, an empty cell."""
    folder.mkdir(parents=True, exist_ok=True)
    good: dict[str, tuple[float, str]] = {}
    rows = []
    for i in range(n):
        seconds, said = 0.5 + (i % 7) * 0.25, f"Caller {i} asks about order {1000 + i}."
        (folder / f"c{i:02d}.wav").write_bytes(wav(seconds, said))
        good[f"c{i:02d}"] = (seconds, said)
        rows.append((f"c{i:02d}", f"calls/c{i:02d}.wav"))
    (folder / "notes.wav").write_text("these are my notes, not a recording")
    big = folder / "long.wav"
    with open(big, "wb") as fh:  # sparse: larger than the API takes, without writing 27 MB
        fh.write(wav(0.1, "long"))
        fh.truncate(27_000_000)
    (folder / "mp3inwav.wav").write_bytes(wav(1.0, "odd codec", tag=0x0055))
    (folder / "voice.ogg").write_bytes(b"OggS" + b"\x00" * 24 + b"\x01Speex   " + b"\x00" * 40)
    rows += [("bad-notes", "calls/notes.wav"), ("bad-big", "calls/long.wav"), ("bad-codec", "calls/mp3inwav.wav"),
             ("bad-missing", "calls/gone.wav"), ("bad-ogg", "calls/voice.ogg"), ("bad-empty", None)]
    return pl.DataFrame({"call_id": [r[0] for r in rows], "file": [r[1] for r in rows]}), good


def transcription_job(make_job, base_url: str, data: pl.DataFrame, request: str = "", provider: str = "openai"):
    req = textwrap.dedent('''\
        endpoint = "transcriptions"
        model = "whisper-1"
        audio = "{{ file }}"
        ''') + request
    return make_job(data=data, fmt="csv" if data.schema.get("file") == pl.String else "parquet", request=req,
                    input=f'path = "input.{"csv" if data.schema.get("file") == pl.String else "parquet"}"\n'
                          'id = "call_id"',
                    extra=f'[api]\nprovider = "{provider}"\nbase_url = "{base_url}"\n')


def test_fifty_files_good_ones_answered_bad_ones_fail_alone_priced_by_their_durations(make_job, sim, tmp_path):
    data, good = calls(tmp_path / "calls", 44)
    with sim() as s:
        job = transcription_job(make_job, s.base_url, data, 'response_format = "verbose_json"\nlanguage = "en"\n')
        est = json.loads(run_cli("estimate", job, "--json").output)
        result = run(Job.load(job))
        assert result.exit_code == 1 and result.stats.ok == 44 and result.stats.failed == 6
        assert s.stats.requests == 44  # nothing bad was sent
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.height == 50
    by = {r["call_id"]: r for r in out.iter_rows(named=True)}
    for call_id, (seconds, said) in good.items():
        r = by[call_id]
        assert r["status"] == "ok" and r["text"] == said and r["duration_s"] == pytest.approx(seconds)
        assert r["segments"][0]["text"] == said and r["language"] == "english"
    reasons = {k: by[k]["error"] for k in by if k.startswith("bad-")}
    assert all(by[k]["error_type"] == "bad_audio" for k in reasons)
    assert "not an audio file the API takes" in reasons["bad-notes"]
    assert "more than the API takes" in reasons["bad-big"]
    assert "unknown codec (format tag 0x0055)" in reasons["bad-codec"]
    assert "file not found" in reasons["bad-missing"]
    assert "Ogg file of an unknown codec" in reasons["bad-ogg"]
    assert "no audio" in reasons["bad-empty"]
    per_second = 0.006 / 60  # whisper-1: $0.36 an hour in the bundled table
    expected = sum(seconds for seconds, _ in good.values()) * per_second
    assert est["cost_usd_max"] == pytest.approx(expected, rel=1e-9)
    assert est["made"][0] == "audio to transcribe" and est["rows_bad_image"] == 6
    assert out["cost_usd"].sum() == pytest.approx(expected, rel=1e-9)
    assert not out.filter(pl.col("status") == "ok")["usage_estimated"].any()  # the API's own seconds


def test_a_rerun_sends_nothing_and_a_changed_file_is_a_new_request(make_job, sim, tmp_path):
    data, _ = calls(tmp_path / "calls", 5)
    data = data.filter(~pl.col("call_id").str.starts_with("bad-"))
    with sim() as s:
        job = transcription_job(make_job, s.base_url, data)
        assert run(Job.load(job)).exit_code == 0
        assert run(Job.load(job)).stats.requests_sent == 0
        (tmp_path / "calls/c02.wav").write_bytes(wav(2.0, "A different call."))
        again = run(Job.load(job))
        assert again.stats.requests_sent == 1 and s.stats.requests == 6 and s.stats.duplicate_ok == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    assert out.filter(pl.col("call_id") == "c02")["text"].item() == "A different call."


def test_a_binary_column_and_the_text_formats(make_job, sim, tmp_path):
    data = pl.DataFrame({"call_id": ["a", "b"], "audio": [wav(1.0, "First call."), wav(1.5, "Second call.")]})
    with sim() as s:
        for fmt, expect in (("text", "First call."), ("srt", "00:00:00,000 --> 00:00:01,000\nFirst call."),
                            ("vtt", "WEBVTT")):
            job = transcription_job(make_job, s.base_url, data, f'response_format = "{fmt}"\n')
            job.write_text(job.read_text().replace('audio = "{{ file }}"', 'audio = "{{ audio }}"'))
            assert run(Job.load(job), fresh=True).exit_code == 0
            out = pl.read_parquet(tmp_path / "out/result.parquet").sort("call_id")
            assert expect in out["text"][0]
            assert out["usage_estimated"].all()  # text formats carry no usage: the file's own duration
            assert out["cost_usd"].sum() == pytest.approx(2.5 * 0.006 / 60, rel=1e-9)


def test_a_token_priced_model_is_billed_by_its_usage(make_job, sim, tmp_path):
    data, _ = calls(tmp_path / "calls", 3)
    data = data.filter(~pl.col("call_id").str.starts_with("bad-"))
    with sim() as s:
        job = transcription_job(make_job, s.base_url, data, 'prompt = "A support call."\n')
        job.write_text(job.read_text().replace('"whisper-1"', '"gpt-4o-mini-transcribe"'))
        assert run(Job.load(job)).exit_code == 0
    out = pl.read_parquet(tmp_path / "out/result.parquet")
    from pipeline.pricing import lookup_audio_price

    price = lookup_audio_price("gpt-4o-mini-transcribe", price_ids=OPENAI)
    assert price is not None and price.audio_input is not None
    for r in out.iter_rows(named=True):
        audio = r["prompt_tokens"] - 4  # "A support call." is 4 tokens; the rest is the audio
        expected = (4 * price.input.base + audio * price.audio_input.base
                    + r["completion_tokens"] * price.output.base) / 1_000_000
        assert r["cost_usd"] == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(("request_keys", "provider", "message"), [
    ('mode = "batch"\n', "openai", 'Batch API of provider = "openai" does not take transcriptions requests'),
    ("", "anthropic", 'provider = "anthropic" has no transcriptions API'),
    ('timestamp_granularities = ["word"]\n', "openai", 'needs response_format = "verbose_json"'),
    ('language = "english"\n', "openai", 'must be an ISO-639-1 code such as "en"'),
    ('response_format = "vtt"\nmodel = "gpt-4o-transcribe"\n', "openai", "gpt-4o-transcribe answers in json only"),
    ("max_tokens = 10\n", "openai", 'does not apply to endpoint = "transcriptions"'),
])
def test_what_the_api_refuses_is_refused_before_the_run(make_job, tmp_path, request_keys, provider, message):
    data, _ = calls(tmp_path / "calls", 1)
    job = transcription_job(make_job, "http://127.0.0.1:9/v1", data, request_keys, provider=provider)
    text = job.read_text()
    if "gpt-4o-transcribe" in request_keys:
        text = text.replace('model = "whisper-1"\n', "", 1)
    job.write_text(text)
    with pytest.raises(JobError) as e:
        check(Job.load(job))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_audio_by_url_is_downloaded_once_and_a_dead_link_fails_its_row(make_job, sim, tmp_path):
    import functools
    import http.server
    import threading
    import uuid

    served = tmp_path / "served"
    served.mkdir()
    tag = uuid.uuid4().hex  # a fresh URL: nothing of another run is in the download folder
    (served / f"{tag}.wav").write_bytes(wav(1.25, "Calling from a link."))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None  # type: ignore[assignment]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        data = pl.DataFrame({"call_id": ["web", "dead"], "file": [f"{root}/{tag}.wav", f"{root}/{tag}-gone.wav"]})
        with sim() as s:
            job = transcription_job(make_job, s.base_url, data)
            result = run(Job.load(job))
            assert result.stats.ok == 1 and result.stats.failed == 1
    finally:
        server.shutdown()
    out = pl.read_parquet(tmp_path / "out/result.parquet").sort("call_id")
    assert out["text"].to_list() == [None, "Calling from a link."]
    assert "cannot be downloaded (HTTP 404)" in out["error"][0]
