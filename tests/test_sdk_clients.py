"""The official SDKs' own clients against the simulator: each call parses, and each error is the SDK's class for it.

A simulator that answers in a shape the SDK cannot read, or with a status the SDK names otherwise, would let every
test above it pass on a lie; the SDKs are the oracle."""

import base64
import io
import json
import time

import anthropic
import openai
import pytest
from PIL import Image
from pydantic import BaseModel

from tests.conftest import SECRET

MESSAGES = [{"role": "user", "content": "The kettle arrived broken. Answer in JSON."}]


class Verdict(BaseModel):
    sentiment: str
    stars: int


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(s, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key=SECRET, base_url=s.base_url, max_retries=0, **kw)


def test_openai_parse_tools_and_images(sim):
    with sim(api_key=SECRET) as s:
        c = _client(s)
        parsed = c.chat.completions.parse(model="gpt-4o-mini", messages=MESSAGES, response_format=Verdict)
        assert isinstance(parsed.choices[0].message.parsed, Verdict)
        tool = {"type": "function", "function": {"name": "refund", "description": "Refund an order",
                                                 "parameters": {"type": "object", "properties": {
                                                     "order_id": {"type": "string"}}, "required": ["order_id"],
                                                     "additionalProperties": False}, "strict": True}}
        called = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=[tool],
                                           tool_choice="required")
        call = called.choices[0].message.tool_calls[0]
        assert call.function.name == "refund" and "order_id" in json.loads(call.function.arguments)
        seen = c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [
            {"type": "text", "text": "Describe it."}, {"type": "image_url", "image_url": {"url": _png()}}]}])
        assert seen.choices[0].message.content and seen.usage.prompt_tokens > 85


def test_openai_files_and_batches(sim):
    with sim(api_key=SECRET, batch_delay_s=0.2) as s:
        c = _client(s)
        lines = "".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                    "body": {"model": "gpt-4o-mini", "messages": [{"role": "user",
                                                                                   "content": f"row {i}"}]}}) + "\n"
                        for i in range(3))
        f = c.files.create(file=("in.jsonl", lines.encode()), purpose="batch")
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + 60
        while (b := c.batches.retrieve(b.id)).status not in ("completed", "failed", "expired"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert b.status == "completed" and b.request_counts.completed == 3 and b.output_file_id
        out = [json.loads(x) for x in c.files.content(b.output_file_id).text.splitlines()]
        assert sorted(x["custom_id"] for x in out) == ["r0", "r1", "r2"]


def test_openai_images_generate_and_what_the_api_refuses(sim):
    with sim(api_key=SECRET) as s:
        c = _client(s)
        r = c.images.generate(model="gpt-image-1.5", prompt="a red lamp", size="1024x1536", quality="low", n=2,
                              output_format="jpeg", output_compression=80)
        assert len(r.data) == 2 and r.output_format == "jpeg" and r.size == "1024x1536"
        assert r.usage is not None and r.usage.output_tokens == 2 * 408  # the guide's table: low, 1024x1536
        for d in r.data:
            assert d.b64_json is not None
            with Image.open(io.BytesIO(base64.b64decode(d.b64_json))) as im:
                assert im.size == (1024, 1536) and im.format == "JPEG"
        refused = [dict(style="vivid"), dict(response_format="url"), dict(quality="hd"), dict(size="1792x1024"),
                   dict(n=11), dict(output_format="png", output_compression=50),
                   dict(background="transparent", output_format="jpeg")]
        for params in refused:
            with pytest.raises(openai.BadRequestError):
                c.images.generate(model="gpt-image-1.5", prompt="a lamp", **params)  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            c.images.generate(model="dall-e-3", prompt="a lamp")  # retired
        free = c.images.generate(model="gpt-image-2", prompt="a lamp", size="1536x864")
        assert free.data and free.data[0].b64_json
        with Image.open(io.BytesIO(base64.b64decode(free.data[0].b64_json))) as im:
            assert im.size == (1536, 864)


def test_openai_audio_transcriptions_and_what_the_api_refuses(sim):
    from tests.test_endpoint_transcriptions import wav

    call = wav(2.0, "Where is my parcel?")
    with sim(api_key=SECRET) as s:
        c = _client(s)
        verbose = c.audio.transcriptions.create(model="whisper-1", file=("call.wav", call, "audio/wav"),
                                                response_format="verbose_json", timestamp_granularities=["word"])
        assert verbose.text == "Where is my parcel?" and verbose.duration == pytest.approx(2.0)
        assert verbose.words and verbose.words[0].word == "Where" and verbose.segments
        plain = c.audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("call.wav", call, "audio/wav"),
                                              prompt="A support call.")
        assert plain.text == "Where is my parcel?" and plain.usage is not None and plain.usage.type == "tokens"
        srt = c.audio.transcriptions.create(model="whisper-1", file=("call.wav", call), response_format="srt")
        assert "00:00:00,000 --> 00:00:02,000" in srt
        refused = [dict(model="gpt-4o-transcribe", response_format="verbose_json"),
                   dict(model="whisper-1", timestamp_granularities=["word"]),
                   dict(model="whisper-1", language="english"), dict(model="whisper-1", temperature=1.5)]
        for params in refused:
            with pytest.raises(openai.BadRequestError):
                c.audio.transcriptions.create(file=("call.wav", call), **params)  # type: ignore[call-overload]
        with pytest.raises(openai.BadRequestError):  # not audio, whatever its name says
            c.audio.transcriptions.create(model="whisper-1", file=("call.wav", b"plain text, not audio"))
        with pytest.raises(openai.APIStatusError) as big:
            c.audio.transcriptions.create(model="whisper-1", file=("big.wav", call + b"\x00" * 26_214_400))
        assert big.value.status_code == 413


def test_azure_both_url_styles(sim):
    with sim(api_key=SECRET) as s:
        root = s.base_url.removesuffix("/v1")
        old = openai.AzureOpenAI(api_key=SECRET, azure_endpoint=root, api_version="2024-10-21", max_retries=0)
        a = old.chat.completions.create(model="prod-mini", messages=MESSAGES)  # the deployment, in the URL
        v1 = openai.OpenAI(api_key="unused", base_url=f"{root}/openai/v1", default_headers={"api-key": SECRET},
                           max_retries=0)
        b = v1.chat.completions.create(model="prod-mini", messages=MESSAGES)
        assert a.choices[0].message.content and b.choices[0].message.content


@pytest.mark.parametrize(("config", "error"), [
    ({"models": ("gpt-4o-mini",)}, openai.NotFoundError),
    ({"rate_429": 1.0}, openai.RateLimitError),
    ({"error_rate": 1.0}, openai.InternalServerError),
    ({"insufficient_quota": True}, openai.RateLimitError),
])
def test_openai_error_classes(sim, config, error):
    with sim(api_key=SECRET, **config) as s, pytest.raises(error):
        _client(s).chat.completions.create(model="gpt-4.1", messages=MESSAGES)


def _claude(s) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=SECRET, base_url=s.base_url.removesuffix("/v1"), max_retries=0)


def test_anthropic_message_batches(sim):
    with sim(api_key=SECRET, batch_delay_s=0.2) as s:
        c = _claude(s)
        batch = c.messages.batches.create(requests=[
            {"custom_id": f"r{i}", "params": {"model": "claude-haiku-4-5", "max_tokens": 30,
                                              "messages": [{"role": "user", "content": f"row {i}"}]}}
            for i in range(3)])
        deadline = time.monotonic() + 60
        while (batch := c.messages.batches.retrieve(batch.id)).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        results = list(c.messages.batches.results(batch.id))
        assert sorted(r.custom_id for r in results) == ["r0", "r1", "r2"]
        assert all(r.result.type == "succeeded" for r in results)


@pytest.mark.parametrize(("config", "status"), [({"overloaded_rate": 1.0}, 529), ({"rate_429": 1.0}, 429),
                                                ({"error_rate": 1.0}, 500)])
def test_anthropic_error_classes(sim, config, status):
    with sim(api_key=SECRET, **config) as s, pytest.raises(anthropic.APIStatusError) as e:
        _claude(s).messages.create(model="claude-haiku-4-5", max_tokens=20, messages=MESSAGES)
    assert e.value.status_code in ((500, 502, 503) if status == 500 else (status,))
    if status == 529:
        assert isinstance(e.value, anthropic.OverloadedError)
    if status == 429:
        assert isinstance(e.value, anthropic.RateLimitError)
