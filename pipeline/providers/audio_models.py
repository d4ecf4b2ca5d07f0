"""OpenAI's transcription models: what each takes (``POST /v1/audio/transcriptions``), so a job is refused before
the run rather than row by row. Source: the API reference of the endpoint, as the ``openai`` 3.x SDK's
``transcription_create_params.py`` carries it (read 2026-12-06): gpt-4o-transcribe and gpt-4o-mini-transcribe
answer in ``json`` only; gpt-4o-transcribe-diarize in json or text and takes no prompt nor timestamps;
``timestamp_granularities`` needs ``verbose_json``, which only whisper-1 gives.
"""

from __future__ import annotations

import re

from pipeline.errors import JobError
from pipeline.spec import TranscriptionSpec

_OPENAI_MODELS = ("openai", "azure")  # providers whose transcription models are OpenAI's own
_JSON_ONLY = re.compile(r"^gpt-4o(-mini)?-transcribe(-\d{4}-\d{2}-\d{2})?$")


def check_transcription_job(source: str, provider: str, model: str, t: TranscriptionSpec) -> list[str]:
    """Refuse (JobError) what the model's API refuses, before the run."""
    if provider not in _OPENAI_MODELS:
        return []
    where = f"{source}: [request]"
    if _JSON_ONLY.match(model) and t.response_format != "json":
        raise JobError(f'{where}.response_format = "{t.response_format}": {model} answers in json only')
    if model == "gpt-4o-transcribe-diarize":
        if t.response_format not in ("json", "text"):
            raise JobError(f'{where}.response_format = "{t.response_format}": {model} answers in json or text')
        if t.hint is not None:
            raise JobError(f"{where}.prompt is not taken by {model}")
    return []
