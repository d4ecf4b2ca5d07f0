"""The simulator's images and tools, for both dialects: image parts refused by the simulator's own copy of the
providers' rules (``rules.check_image``), counted for usage by the documented token rules the client's estimate
also uses (``pipeline.images``), and tool calls answered with arguments valid for the tool's schema.

Unlike the client, which reads only an image's header, the simulator decodes every inline image, so a file
whose header is fine but whose data is cut short is refused here, as a provider refuses it.
"""

from __future__ import annotations

from typing import Any

import orjson
import pybase64

from pipeline.images import (  # the documented token rules, for honest usage (not for refusals)
    Image,
    claude_rule,
    openai_rule,
)
from pipeline.sim import answers
from pipeline.sim.errors import SimFailure
from pipeline.sim.rules import check_image


def _decoded(data: bytes, provider: str, detail: str | None) -> Image:
    """Inline bytes checked by the simulator's own rules (``rules.check_image``) and fully decoded."""
    mime, width, height = check_image(data, provider)
    return Image(data=data, mime=mime, width=width, height=height, detail=detail)


def openai_part(part: dict[str, Any], model: str) -> tuple[int, str]:
    """(tokens, a few words about it) of one ``image_url`` content part."""
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else None
    if not isinstance(url, str):
        raise SimFailure(400, "Invalid 'image_url': expected an object with a 'url'.", param="messages")
    detail = spec.get("detail") if isinstance(spec, dict) else None  # type: ignore[union-attr]
    if detail not in (None, "low", "high", "auto"):
        raise SimFailure(400, f"Invalid value for 'detail': {detail!r}.", param="messages")
    rule = openai_rule(model)
    if url.startswith("data:"):
        head, _, b64 = url.partition(",")
        if not head.endswith(";base64"):
            raise SimFailure(400, "Invalid image URL: a data URL must be base64.", code="invalid_image_url")
        try:
            data = pybase64.b64decode(b64, validate=True)
        except ValueError:
            raise SimFailure(400, "Invalid image: the base64 data is not valid.", code="invalid_image_format") from None
        image = _decoded(data, "openai", detail)
        return rule.tokens(image), f"a {image.width}x{image.height} {image.mime} image"
    if not url.startswith(("https://", "http://")):
        raise SimFailure(400, "Invalid image URL: expected a URL or a base64 data URL.", code="invalid_image_url")
    return rule.tokens(Image(url=url, detail=detail)), "an image at a URL"


def anthropic_block(block: dict[str, Any]) -> tuple[int, str]:
    """(tokens, a few words about it) of one Messages ``image`` block."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise SimFailure(400, "messages: image.source: Field required")
    rule = claude_rule("")
    if source.get("type") == "url":
        return rule.tokens(Image(url=str(source.get("url")))), "an image at a URL"
    if source.get("type") != "base64":
        raise SimFailure(400, "messages: image.source.type: Input should be 'base64' or 'url'")
    media = source.get("media_type")
    if media not in ("image/jpeg", "image/png", "image/gif", "image/webp"):
        raise SimFailure(400, f"messages: image.source.media_type: Input should be 'image/jpeg', 'image/png', "
                              f"'image/gif' or 'image/webp', got {media!r}")
    try:
        data = pybase64.b64decode(str(source.get("data", "")), validate=True)
    except ValueError:
        raise SimFailure(400, "messages: image.source.data: invalid base64 data") from None
    image = _decoded(data, "anthropic", None)
    if image.mime != media:
        raise SimFailure(400, f"messages: Image does not match the provided media type {media}")
    return rule.tokens(image), f"a {image.width}x{image.height} {image.mime} image"


def _stems(text: str) -> set[str]:
    """The words of a text that carry meaning, cut to five letters ("refunded" meets "refund")."""
    cleaned = "".join(c if c.isalnum() else " " for c in text.lower())
    return {w[:5] for w in cleaned.split() if len(w) >= 4}


def pick_tool(tools: list[dict[str, Any]], prompt: str) -> dict[str, Any]:
    """The tool whose name and description share the most words with the prompt (a stable choice on ties):
    plausible routing, not a model's judgement."""
    words = _stems(prompt)

    def overlap(t: dict[str, Any]) -> int:
        return len(words & _stems(f"{t.get('name', '')} {t.get('description', '')}".replace("_", " ")))

    best = max(overlap(t) for t in tools)
    tied = [t for t in tools if overlap(t) == best]
    return tied[answers._seed(prompt) % len(tied)]


def tool_arguments(schema: dict[str, Any], prompt: str) -> str:
    """Arguments valid for a tool's schema (the SIM_BAD_TOOL_ARGS hook: invalid JSON, as a model can write)."""
    if "SIM_BAD_TOOL_ARGS" in prompt:
        return '{"amount": '
    return orjson.dumps(answers.structured(schema, prompt)).decode()
