"""The transcription endpoint: one row's audio file in (a multipart upload), its text out.

``[request].audio`` names the row's file (a path relative to the input, a URL, or a binary column); each is checked
before anything is sent (``pipeline.audio``: its container and codec from its bytes, its size, its duration from its
headers), so a bad file fails its row alone. A request's identity is its logical request (the model's fields and
the audio's SHA-256), never the multipart bytes, whose boundary is random. The file is streamed from disk when its
request is sent, never held whole for the run.

Transcription has no Batch API: a batch-mode job is refused before the run (the providers' descriptors say so).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import orjson
import polars as pl

from pipeline.audio import Audio, AudioLoader, AudioProblem
from pipeline.endpoints.base import AnswerColumns, Endpoint, JobParts, Media, MediaProblem, RowSender, mode_of
from pipeline.outcome import Outcome, answered, failed
from pipeline.pricing import Usage
from pipeline.providers.base import Answer, TranscriptAnswer
from pipeline.spec import Message, RequestSpec, TranscriptionSpec
from pipeline.tables import Table, shown, type_name

if TYPE_CHECKING:
    from pipeline.pricing import Price, PriceIds
    from pipeline.providers.base import BatchResult, Codec, TranscriptionsCodec
    from pipeline.rendered import Request
    from pipeline.senders import Sending, Sent
    from pipeline.structured import Checker
    from pipeline.tokens import ChatTokenCounter

RESPONSE_FORMATS = ("json", "verbose_json", "text", "srt", "vtt")
GRANULARITIES = ("word", "segment")
FOREIGN_KEYS = ("system", "messages", "max_tokens", "top_p", "seed", "stop", "reasoning_effort", "response_schema",
                "response_schema_file", "schema_retries", "images", "image_position", "tools", "tool_choice", "input",
                "dimensions", "encoding_format", "batch_size", "batch_tokens", "max_input_tokens", "n", "size",
                "quality")
SEGMENT = pl.Struct({"id": pl.Int64(), "start": pl.Float64(), "end": pl.Float64(), "text": pl.String()})


class Transcriptions(Endpoint):
    """``endpoint = "transcriptions"``: ``[request].audio`` is the row's file; ``prompt`` an optional text hint."""

    name = "transcriptions"
    prompt_role = "audio"
    chat_messages = False
    bills_output = False  # priced per minute of audio, or by the usage the API reports
    row_prints = False  # a row is known by its key, which hashes the audio's bytes
    size_limit = "size limit"
    ray = False
    billed_units: ClassVar[bool] = True  # seconds of audio

    def parse(self, req: Table, base: Path) -> RequestSpec:
        """The transcription keys: model, audio (the template), prompt (a template), language, response_format,
        temperature, timestamp_granularities."""
        for key in FOREIGN_KEYS:
            if req.has(key):
                raise req.fail(key, 'does not apply to endpoint = "transcriptions"')
        model = req.str("model", required=True)
        audio = req.str("audio", required=True)
        assert model is not None and audio is not None
        fmt = req.str("response_format", "json")
        if fmt not in RESPONSE_FORMATS:
            raise req.fail("response_format", f"must be one of {', '.join(RESPONSE_FORMATS)}, got {shown(fmt)}")
        granularities = req.str_list("timestamp_granularities")
        for g in granularities:
            if g not in GRANULARITIES:
                raise req.fail("timestamp_granularities", f"takes word and segment, got {shown(g)}")
        if granularities and fmt != "verbose_json":
            raise req.fail("timestamp_granularities", 'needs response_format = "verbose_json"')
        language = req.str("language")
        if language is not None and (len(language) != 2 or not language.isalpha() or not language.islower()):
            raise req.fail("language", f"must be an ISO-639-1 code such as \"en\", got {shown(language)}")
        hint = req.get("prompt")
        if hint is not None and not isinstance(hint, str):
            raise req.fail("prompt", f"must be a string (a template), got {type_name(hint)}")
        spec = RequestSpec(
            endpoint=self.name, model=model, prompt=audio, prompt_source=req.where("audio"), max_tokens=0,
            messages=(Message(role="prompt", content=hint),) if hint else (), mode=mode_of(req),
            transcription=TranscriptionSpec(hint=hint, language=language, response_format=fmt,
                                            temperature=req.number("temperature", low=0.0, high=1.0,
                                                                   strict_low=False),
                                            timestamp_granularities=granularities))
        req.done()
        return spec

    def body(self, codec: Codec, messages: list[dict[str, str]]) -> bytes:
        """Never called: a row's body needs its audio, which ``media`` reads."""
        raise AssertionError("a transcription's body is built by its media (``media``)")

    def media(self, spec: RequestSpec, input_folder: Path) -> Media:
        """The rows' audio files, read and checked before the run."""
        return AudioMedia(spec, AudioLoader(input_folder))

    def sender(self, sending: Sending, spec: RequestSpec, *, codec: Codec, checker: Checker | None,
               counter: ChatTokenCounter | None) -> TranscriptionsSender:
        """A row per request, its file read when it is sent."""
        return TranscriptionsSender(sending, cast("TranscriptionsCodec", codec))

    def price(self, job: JobParts, price_ids: PriceIds) -> Price | None:
        """Per second of audio (whisper-1), or the model's token rates with OpenAI's per-minute figure for the
        estimate."""
        from pipeline.pricing import lookup_audio_price

        return lookup_audio_price(job.request.model, job.pricing, price_ids=price_ids)

    def units(self, req: Request) -> float:
        """The audio's seconds, from its logical body."""
        return float(_logical(req.body)["file"]["duration_s"])

    def made(self, spec: RequestSpec, requests: int, units: float) -> tuple[str, str]:
        """The minutes of audio the requests take."""
        return "audio to transcribe", f"{units / 60:,.1f} minutes in {requests:,} file(s)"

    def context_window(self, spec: RequestSpec, model_window: int | None) -> int | None:
        """No context window: a file's limit is its size, checked before the run."""
        return None

    def answers(self, spec: RequestSpec, output: Path, url: str | None = None) -> AnswerColumns:
        """The transcript's columns."""
        assert spec.transcription is not None
        columns = TranscriptColumns(spec.transcription.response_format == "verbose_json")
        return AnswerColumns(columns, columns.columns)

    def family_warnings(self, job: JobParts) -> list[str]:
        """The model's documented rules (``providers.audio_models``) applied to the job's parameters."""
        from pipeline.providers.audio_models import check_transcription_job

        assert job.request.transcription is not None
        return check_transcription_job(job.source, job.api.provider, job.request.model, job.request.transcription)

    def batch_outcome(self, r: BatchResult, price: Price | None, *, codec: Codec,
                      checker: Checker | None) -> Outcome:
        """Never called: no provider's Batch API takes transcriptions."""
        raise AssertionError("transcriptions have no Batch API")


def _logical(body: bytes) -> dict[str, Any]:
    """The logical request of a body (its first line; a binary column's audio follows it)."""
    data: dict[str, Any] = orjson.loads(body.split(b"\n", 1)[0])
    return data


class AudioMedia:
    """Builds a row's body from its rendered messages and its audio: the logical request as a JSON line (its key
    is the hash of this line), followed by the audio's bytes when they came from a binary column."""

    kind = "bad_audio"

    def __init__(self, spec: RequestSpec, loader: AudioLoader) -> None:
        assert spec.transcription is not None
        self.t, self.model, self.loader = spec.transcription, spec.model, loader

    def body(self, messages: list[dict[str, str]], value: Any) -> tuple[bytes, bytes]:
        """(the request's body, what its key hashes); MediaProblem says why the row's audio cannot be sent."""
        try:
            audio = self.loader.load(value)
        except AudioProblem as e:
            raise MediaProblem(f"bad audio: {e}", self.kind) from None
        t = self.t
        logical = {"model": self.model,
                   "file": {"sha256": audio.sha256, "bytes": audio.size, "container": audio.container,
                            "codec": audio.codec, "duration_s": audio.duration_s},
                   "language": t.language, "prompt": messages[0]["content"] if t.hint else None,
                   "response_format": t.response_format, "temperature": t.temperature,
                   "timestamp_granularities": list(t.timestamp_granularities)}
        key_line = orjson.dumps(logical)
        where = orjson.dumps({**logical, "path": audio.path})
        return (where if audio.data is None else where + b"\n" + audio.data), key_line


class TranscriptionsSender(RowSender):
    """One row per request: its audio read (off the event loop) and uploaded as a multipart form."""

    def __init__(self, sending: Sending, codec: TranscriptionsCodec) -> None:
        self.sending, self.codec = sending, codec

    def refuse(self, req: Request) -> Outcome | None:
        """Checked before the run (``AudioMedia``)."""
        return None

    async def send(self, unit: list[Request]) -> Sent:
        """Send one row's audio, to its transcript: its seconds held against the budget (read from the logical
        request once, for the budget and the upload alike)."""
        req = unit[0]
        logical = _logical(req.body)
        seconds = float(logical["file"]["duration_s"])
        outcome = await self.sending.spending(req.prompt_tokens, 0, lambda: self._upload(req, logical, seconds),
                                              units=seconds)
        return [] if outcome is None else [(unit, outcome)]

    async def _upload(self, req: Request, logical: dict[str, Any], seconds: float) -> Outcome | None:
        s, codec = self.sending, self.codec
        audio = _audio_of(req.body, logical)
        fields = codec.form(logical)

        async def upload() -> TranscriptAnswer:  # a file is streamed from disk, at every attempt anew
            data = audio.data if audio.data is not None else Path(str(audio.path))
            status, headers, body = await s.client.post_form(codec.path, fields, ("file", audio.filename, data,
                                                                                  audio.mime))
            return codec.answer(status, headers, body)

        got = await s.call(req.budget_tokens, upload)
        if got is None:
            return None
        if got.answer is None:
            assert got.error is not None
            return failed(req.key, got.error, attempts=got.attempts)
        a = got.answer
        usage, estimated = a.usage, False
        if usage is None:  # text, srt and vtt carry no usage: the file's own duration, marked estimated
            usage, estimated = Usage(units=seconds), True
        record = {"text": a.text, "duration_s": a.duration_s if a.duration_s is not None else seconds,
                  "language": a.language, "segments": a.segments}
        answer = Answer(content=orjson.dumps(record).decode(), finish_reason=None, refusal=None, model=a.model,
                        usage=usage, rate=a.rate, usage_estimated=estimated)
        return answered(req.key, answer, s.price, attempts=got.attempts, latency_ms=got.latency_ms)


def _audio_of(body: bytes, logical: dict[str, Any]) -> Audio:
    """The audio a body names (a path) or carries (after its first line)."""
    f = logical["file"]
    data = body.split(b"\n", 1)[1] if logical.get("path") is None else None
    return Audio(container=f["container"], codec=f["codec"], size=f["bytes"], sha256=f["sha256"],
                 duration_s=f["duration_s"], path=logical.get("path"), data=data)


class TranscriptColumns:
    """The transcript's typed columns, from its record (the outcome's ``content``)."""

    def __init__(self, segments: bool) -> None:
        self.columns: dict[str, pl.DataType] = {"text": pl.String(), "duration_s": pl.Float64(),
                                                "language": pl.String()}
        if segments:
            self.columns["segments"] = pl.List(SEGMENT)

    def problem(self, content: str | None, tool_calls: str | None = None) -> str | None:
        """Every transcript is an answer."""
        return None

    def values(self, content: str | None, tool_calls: str | None = None) -> list[Any]:
        """The row's transcript columns (None each without one)."""
        if content is None:
            return [None] * len(self.columns)
        record = orjson.loads(content)
        return [record.get(name) for name in self.columns]

