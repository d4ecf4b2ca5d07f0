"""The simulator's transcription (``POST /v1/audio/transcriptions``, a multipart form), with its own copy of the
API's rules: the models and what each takes, the 25 MB limit, the formats it reads (by the file's bytes).

Transcripts are derived from the audio so tests can check them: a WAV file's ``LIST/INFO/ICMT`` comment is what
was "said" (``data/make_calls.py`` writes one into each call), otherwise the words say the file's length and a
short hash of its bytes. The duration is read from the file (a WAV's header here; other formats by mutagen).
whisper-1 reports its usage in seconds, the gpt-4o models in tokens (the audio at 10 tokens a second here).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import struct
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from pipeline.sim.errors import SimFailure
from pipeline.tokens import get_encoding

if TYPE_CHECKING:
    from pipeline.sim.host import Host

MAX_BYTES = 26_214_400
MODELS = re.compile(r"^(whisper-1|gpt-transcribe|gpt-4o-transcribe|gpt-4o-transcribe-diarize|"
                    r"gpt-4o-mini-transcribe(-\d{4}-\d{2}-\d{2})?)$")
FORMATS = {"whisper-1": ("json", "text", "srt", "verbose_json", "vtt"),
           "gpt-4o-transcribe-diarize": ("json", "text", "diarized_json")}
FIELDS = frozenset({"file", "model", "language", "prompt", "response_format", "temperature",
                    "timestamp_granularities[]", "include[]", "chunking_strategy", "stream"})
AUDIO_TOKENS_PER_S = 10


def _bad(message: str, param: str | None = None, code: str | None = None) -> SimFailure:
    return SimFailure(400, message, code=code, param=param)


def container(data: bytes) -> str:
    """What the file is, by its bytes; SimFailure for what the API does not read."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        tag = _wav_fmt(data)[0]
        if tag not in (1, 3, 6, 7, 0xFFFE):
            raise _bad("Audio file might be corrupted or unsupported", "file", "invalid_value")
        return "wav"
    for magic, kind in ((b"fLaC", "flac"), (b"ID3", "mp3"), (b"OggS", "ogg"), (b"\x1a\x45\xdf\xa3", "webm")):
        if data.startswith(magic):
            return kind
    if len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0:
        return "mp3"
    if data[4:8] == b"ftyp":
        return "mp4"
    raise _bad("Invalid file format. Supported formats: ['flac', 'm4a', 'mp3', 'mp4', 'mpeg', 'mpga', 'oga', 'ogg', "
               "'wav', 'webm']", "file", "invalid_value")


def _chunks(data: bytes) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    at = 12
    while at + 8 <= len(data):
        kind, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        out.setdefault(kind, data[at + 8:at + 8 + size])
        at += 8 + size + (size & 1)
    return out


def _wav_fmt(data: bytes) -> tuple[int, int, int, int]:
    fmt = _chunks(data).get(b"fmt ")
    if fmt is None or len(fmt) < 16:
        raise _bad("Audio file might be corrupted or unsupported", "file", "invalid_value")
    tag, channels, rate, byte_rate = struct.unpack("<HHII", fmt[:12])
    return tag, channels, rate, byte_rate


def duration(data: bytes, kind: str) -> float:
    """The file's length in seconds."""
    if kind == "wav":
        byte_rate = _wav_fmt(data)[3]
        return len(_chunks(data).get(b"data", b"")) / byte_rate if byte_rate else 0.0
    import mutagen

    found = mutagen.File(io.BytesIO(data))
    if found is None or not getattr(found.info, "length", None):
        raise _bad("Audio file might be corrupted or unsupported", "file", "invalid_value")
    return float(found.info.length)


def spoken(data: bytes, kind: str, seconds: float) -> str:
    """What the audio "says": a WAV's INFO comment, else its length and a short hash of its bytes."""
    if kind == "wav":
        info = _chunks(data).get(b"LIST", b"")
        if info[:4] == b"INFO":
            at = 4
            while at + 8 <= len(info):
                kind_, size = info[at:at + 4], struct.unpack("<I", info[at + 4:at + 8])[0]
                if kind_ == b"ICMT":
                    return info[at + 8:at + 8 + size].rstrip(b"\x00").decode("utf-8", "replace")
                at += 8 + size + (size & 1)
    return f"A recording of {seconds:.1f} seconds, number {hashlib.sha256(data).hexdigest()[:8]}."


def _timestamp(t: float, sep: str) -> str:
    ms = round(t * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


class AudioService:
    """The transcription route of one simulator."""

    def __init__(self, sim: Host) -> None:
        self.sim = sim

    def routes(self, app: web.Application) -> None:
        """Register the routes on ``app`` (OpenAI's, Azure's v1 and deployment URLs)."""
        r = app.router
        for prefix in ("/v1", "/openai/v1"):
            r.add_post(f"{prefix}/audio/transcriptions", self.transcribe)
        r.add_post("/openai/deployments/{deployment}/audio/transcriptions", self.transcribe)

    async def transcribe(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/audio/transcriptions."""
        return await self.sim.in_flight(self._transcribe(request))

    async def _transcribe(self, request: web.Request) -> web.StreamResponse:
        sim = self.sim
        sim.arrived()
        if (denied := sim.unauthorised(request)) is not None:
            return denied
        if not request.content_type.startswith("multipart/form-data"):
            return _bad("The request must be multipart/form-data with a file.").response()
        form = await request.post()
        try:
            call = self._call(form, request.match_info.get("deployment"))
        except SimFailure as f:
            return f.response()
        model, data, fields = call["model"], call["data"], call["fields"]
        canonical = orjson.dumps({"fields": fields, "file": hashlib.sha256(data).hexdigest()})
        tokens = call["input_tokens"] + call["output_tokens"]
        refused = await sim.admit(request, canonical, fields, tokens, model)
        if refused is not None:
            return refused
        await sim.delay()
        fmt = fields.get("response_format", "json")
        if fmt in ("text", "srt", "vtt"):
            text, seconds = call["text"], call["seconds"]
            if fmt == "srt":
                text = f"1\n{_timestamp(0, ',')} --> {_timestamp(seconds, ',')}\n{text}\n"
            elif fmt == "vtt":
                text = f"WEBVTT\n\n{_timestamp(0, '.')} --> {_timestamp(seconds, '.')}\n{text}\n"
            sim.count_ok(canonical)
            return web.Response(text=text, content_type="text/plain")
        return await sim.respond(request, canonical, self._payload(call, fmt))

    def _call(self, form: Any, deployment: str | None) -> dict[str, Any]:
        fields = {k: v for k, v in form.items() if isinstance(v, str) and k != "timestamp_granularities[]"}
        granularities = [v for v in form.getall("timestamp_granularities[]", [])]
        model = fields.get("model") or deployment
        if not isinstance(model, str) or not model:
            raise _bad("you must provide a model parameter", "model")
        lenient = self.sim.config.lenient
        if not lenient:
            unknown = sorted(set(form.keys()) - FIELDS)
            if unknown:
                raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
            if not MODELS.match(model):
                raise SimFailure(404, f"The model `{model}` does not exist or you do not have access to it.",
                                 code="model_not_found", param="model")
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise _bad("you must provide a file", "file")
        data = upload.file.read()
        if len(data) > MAX_BYTES:
            raise SimFailure(413, f"Maximum content size limit ({MAX_BYTES}) exceeded ({len(data)} bytes read)",
                             code="file_too_large", param="file")
        kind = container(data)
        fmt = fields.get("response_format", "json")
        allowed = FORMATS.get(model, ("json",) if model.startswith("gpt-4o") else ("json", "text"))
        if fmt not in allowed:
            raise _bad(f"response_format '{fmt}' is not compatible with model '{model}'. Use {', '.join(allowed)}.",
                       "response_format", "unsupported_value")
        if granularities and fmt != "verbose_json":
            raise _bad("timestamp_granularities requires response_format=verbose_json", "timestamp_granularities")
        if "temperature" in fields:
            try:
                t = float(fields["temperature"])
            except ValueError:
                raise _bad("temperature must be a number", "temperature") from None
            if not 0 <= t <= 1:
                raise _bad(f"Invalid 'temperature': must be between 0 and 1, got {t}.", "temperature")
        language = fields.get("language")
        if language is not None and not re.fullmatch(r"[a-z]{2}", language):
            raise _bad(f"Invalid language '{language}'. Language parameter must be specified in ISO-639-1 format.",
                       "language", "invalid_language_format")
        seconds = duration(data, kind)
        text = spoken(data, kind, seconds)
        enc = get_encoding("o200k_base")
        hint = len(enc.encode_ordinary(fields.get("prompt", "")))
        return {"model": model, "data": data, "fields": {**fields, "model": model, "granularities": granularities},
                "seconds": seconds, "text": text, "input_tokens": hint + math.ceil(seconds * AUDIO_TOKENS_PER_S),
                "hint_tokens": hint, "output_tokens": len(enc.encode_ordinary(text)), "language": language}

    def _payload(self, call: dict[str, Any], fmt: str) -> dict[str, Any]:
        seconds, text, model = call["seconds"], call["text"], call["model"]
        if model == "whisper-1":
            usage: dict[str, Any] = {"type": "duration", "seconds": seconds}
        else:
            audio = call["input_tokens"] - call["hint_tokens"]
            usage = {"type": "tokens", "input_tokens": call["input_tokens"], "output_tokens": call["output_tokens"],
                     "total_tokens": call["input_tokens"] + call["output_tokens"],
                     "input_token_details": {"text_tokens": call["hint_tokens"], "audio_tokens": audio}}
        if fmt != "verbose_json":
            return {"text": text, "usage": usage}
        words = text.split()
        step = seconds / max(len(words), 1)
        segment = {"id": 0, "seek": 0, "start": 0.0, "end": seconds, "text": text, "tokens": [],
                   "temperature": 0.0, "avg_logprob": -0.2, "compression_ratio": 1.2, "no_speech_prob": 0.01}
        out: dict[str, Any] = {"task": "transcribe", "language": {"en": "english"}.get(call["language"] or "en",
                                                                                         call["language"]),
                               "duration": seconds, "text": text, "segments": [segment], "usage": usage}
        if "word" in call["fields"]["granularities"]:
            out["words"] = [{"word": w, "start": i * step, "end": (i + 1) * step} for i, w in enumerate(words)]
        return out
