"""What the real APIs refuse, as the simulator enforces it: its own copy of the rules, never imported from the
client's side (a wrong table there must not pass here as well).

Written from the providers' documents and their refusals as users report them, in the shape each API answers
with (status, error type, message, ``param`` and ``code`` for OpenAI):
- OpenAI Chat Completions: the request fields of the API reference (openai-python
  ``types/chat/completion_create_params.py``), refused otherwise with "Unrecognized request argument supplied";
  ``temperature`` 0-2 and ``top_p`` 0-1; reasoning models (o-series, GPT-5 but its chat model) take no
  ``temperature``/``top_p`` ("Unsupported parameter: 'temperature' is not supported with this model.",
  ``unsupported_parameter``), except GPT-5.1 and later with ``reasoning_effort`` "none"; they take
  ``max_completion_tokens``, not ``max_tokens``; o3 and o4-mini take no ``stop``; models without reasoning take
  no ``reasoning_effort``; ``response_format`` ``json_object`` has ``type`` only and needs the word "JSON" in
  the messages.
- Anthropic Messages: ``anthropic-version`` 2023-01-01, 2023-06-01 or 2026-10-21; the key in ``x-api-key`` or
  ``Authorization: Bearer``; ``temperature`` 0-1; the Claude 4.5 families, Opus 4.1 and the 4.6 models take
  ``temperature`` or ``top_p``, not both; Opus 4.7 takes neither; version 2026-10-21 removed ``temperature``,
  ``top_p`` and ``top_k`` for every model.
"""

from __future__ import annotations

import re
from typing import Any

from pipeline.sim.errors import SimFailure

OPENAI_CHAT_FIELDS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_retention", "reasoning_effort", "response_format",
    "safety_identifier", "seed", "service_tier", "stop", "store", "stream", "stream_options", "temperature",
    "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity", "web_search_options"})

ANTHROPIC_VERSIONS = frozenset({"2023-01-01", "2023-06-01", "2026-10-21"})
ANTHROPIC_NO_SAMPLING_FROM = "2026-10-21"

_GPT5 = re.compile(r"^gpt-5(?:\.(\d+))?(-chat|-codex|-pro)?")


def _openai_reasoning(model: str) -> tuple[bool, bool, bool]:
    """(reasons, takes sampling when effort is none, takes stop) for an OpenAI model name."""
    m = model.lower()
    if re.match(r"^o\d", m):
        return True, False, not m.startswith(("o3", "o4"))
    g = _GPT5.match(m)
    if g is None:
        return False, False, True
    minor, variant = int(g.group(1) or 0), g.group(2)
    if variant == "-chat" and minor == 0:
        return False, False, True  # gpt-5-chat-latest answers without reasoning
    return True, minor >= 1 and variant is None, True


def _unsupported(param: str, message: str | None = None) -> SimFailure:
    return SimFailure(400, message or f"Unsupported parameter: '{param}' is not supported with this model.",
                      code="unsupported_parameter", param=param)


def check_openai_chat(body: dict[str, Any]) -> None:
    """Raise SimFailure for what OpenAI's Chat Completions refuses in ``body``."""
    for key in body:
        if key not in OPENAI_CHAT_FIELDS:
            raise SimFailure(400, f"Unrecognized request argument supplied: {key}", param=key)
    model = str(body.get("model") or "")
    reasons, sampling_without_effort, takes_stop = _openai_reasoning(model)
    effort = body.get("reasoning_effort")
    for key, top in (("temperature", 2.0), ("top_p", 1.0)):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int | float) or not 0 <= value <= top:
            raise SimFailure(400, f"Invalid '{key}': decimal above maximum value. Expected a value <= {top:g}, "
                                  f"but got {value} instead." if isinstance(value, int | float) and value > top else
                             f"Invalid '{key}': expected a number from 0 to {top:g}.", code="invalid_value", param=key)
        if reasons and not (sampling_without_effort and effort in (None, "none")):
            raise _unsupported(key)
    if reasons and body.get("max_tokens") is not None:
        raise _unsupported("max_tokens", "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                         "Use 'max_completion_tokens' instead.")
    if not takes_stop and body.get("stop"):
        raise _unsupported("stop")
    if effort is not None and not reasons:
        raise _unsupported("reasoning_effort", "Unrecognized request argument supplied: reasoning_effort")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        extra = sorted(set(fmt) - {"type"})
        if extra:
            raise SimFailure(400, f"Unrecognized request argument supplied: response_format.{extra[0]}",
                             param=f"response_format.{extra[0]}")
        if "json" not in _texts(body.get("messages")).lower():
            raise SimFailure(400, "'messages' must contain the word 'json' in some form, to use 'response_format' "
                                  "of type 'json_object'.", param="messages")


def _texts(messages: Any) -> str:
    parts: list[str] = []
    for m in messages if isinstance(messages, list) else ():
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
    return "\n".join(parts)


def check_anthropic_headers(headers: Any) -> str | None:
    """Why Anthropic would refuse these headers (None: it would not)."""
    version = headers.get("anthropic-version")
    if version is None:
        return "anthropic-version: header is required"
    if version not in ANTHROPIC_VERSIONS:
        return f"anthropic-version: invalid version {version!r}"
    return None


_CLAUDE = re.compile(r"claude-(opus|sonnet|haiku)-(\d+)(?:-(\d))?(?!\d)")


def check_anthropic_sampling(body: dict[str, Any], version: str) -> None:
    """Raise SimFailure for the sampling parameters Anthropic refuses for this model and API version."""
    given = [k for k in ("temperature", "top_p", "top_k") if body.get(k) is not None]
    if not given:
        return
    if version >= ANTHROPIC_NO_SAMPLING_FROM:
        raise SimFailure(400, f"{given[0]}: Extra inputs are not permitted")
    temperature = body.get("temperature")
    if temperature is not None and not (isinstance(temperature, int | float) and 0 <= temperature <= 1):
        raise SimFailure(400, "temperature: Input should be less than or equal to 1")
    top_p = body.get("top_p")
    if top_p is not None and not (isinstance(top_p, int | float) and 0 <= top_p <= 1):
        raise SimFailure(400, "top_p: Input should be less than or equal to 1")
    claude = claude_version(str(body.get("model") or ""))
    if claude is None:
        return
    name, version_nums = claude
    if name == "opus" and version_nums >= (4, 7):
        raise SimFailure(400, f"`{given[0]}` is deprecated for this model.")
    one_sampler = version_nums >= (4, 5) or (name == "opus" and version_nums >= (4, 1))
    if one_sampler and temperature is not None and top_p is not None:
        raise SimFailure(400, "temperature and top_p cannot both be specified for this model. Please use only one.")


# -- facts the simulator answers by (its own copies: the client's tables are not trusted here) -----------------

# OpenAI's embedding models and their default vector sizes (platform.openai.com/docs/guides/embeddings).
EMBEDDING_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


def claude_version(model: str) -> tuple[str, tuple[int, int]] | None:
    """("opus" | "sonnet" | "haiku", (major, minor)) of a Claude model name; None for another name."""
    m = _CLAUDE.search(model.lower()) or re.search(r"claude-(\d)-(\d)?-?(opus|sonnet|haiku)", model.lower())
    if m is None:
        return None
    if m.group(1) in ("opus", "sonnet", "haiku"):
        return m.group(1), (int(m.group(2)), int(m.group(3) or 0))
    return m.group(3), (int(m.group(1)), int(m.group(2) or 0))


def takes_output_format(model: str) -> bool:
    """Whether a Claude model takes ``output_config.format`` (structured outputs: the 4.5 models and later)."""
    v = claude_version(model)
    return v is not None and v[1] >= (4, 5)


def claude_cache_minimum(model: str) -> int:
    """The shortest prompt prefix Claude caches (prompt caching docs: 4,096 tokens for Opus 4.5 and Haiku 4.5,
    2,048 for the Haiku 3 models, 1,024 for the others)."""
    v = claude_version(model)
    if v is not None and v[0] in ("opus", "haiku") and v[1] >= (4, 5):
        return 4096
    if v is not None and v[0] == "haiku" and v[1] < (4, 0):
        return 2048
    return 1024


# -- images -------------------------------------------------------------------------------------------------

IMAGE_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}


def check_image(data: bytes, dialect: str) -> tuple[str, int, int]:
    """(media type, width, height) of an inline image the provider takes, fully decoded; SimFailure otherwise.

    OpenAI: PNG, JPEG, WEBP or non-animated GIF, up to 20 MB (images-vision guide). Anthropic: the same types, up
    to 5 MB of base64 text and 8,000 px a side (vision docs). The whole image is decoded, so a file cut short is
    refused as the provider refuses it."""
    from io import BytesIO

    from PIL import Image as PILImage

    def refuse(why: str) -> SimFailure:
        return SimFailure(400, f"Invalid image: {why}", code="invalid_image_format", param="messages")

    if not data:
        raise refuse("the image is empty")
    if dialect == "anthropic" and 4 * -(-len(data) // 3) > 5 * 1024 * 1024:
        raise refuse("image exceeds 5 MB maximum")
    if dialect != "anthropic" and len(data) > 20_000_000:
        raise refuse("image exceeds 20 MB maximum")
    try:
        with PILImage.open(BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
            animated = getattr(im, "is_animated", False)
            im.load()
    except Exception:  # Pillow's decoders raise many kinds
        raise refuse("the image data could not be decoded") from None
    if fmt not in IMAGE_TYPES:
        raise refuse(f"unsupported image type {fmt}; expected PNG, JPEG, GIF or WEBP")
    if dialect != "anthropic" and animated:
        raise refuse("animated GIFs are not supported")
    if dialect == "anthropic" and max(width, height) > 8000:
        raise refuse(f"image dimensions exceed max allowed size: 8000 pixels ({width} x {height})")
    return IMAGE_TYPES[fmt], width, height
