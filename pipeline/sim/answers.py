"""Deterministic, plausible answers for the simulator: the same question always gets the same answer.

A summary is drawn from the prompt's own text, a JSON answer is valid for whatever schema was asked (labels
come from the schema's enums), and an embedding is a unit vector seeded by its input text.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import numpy as np
import pybase64

_SENTENCE = re.compile(r"(?<=[.!?。])\s+")
_WORDS = ("clear", "brief", "useful", "direct", "balanced", "concise", "specific", "helpful")


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def summary(prompt: str) -> str:
    """One sentence drawn from the material the prompt is about (after its instruction line, if any)."""
    body = prompt.split("\n\n", 1)[1] if "\n\n" in prompt else prompt
    body = " ".join(body.split())
    if not body:
        return "There is nothing to summarise."
    first = _SENTENCE.split(body, 1)[0]
    words = first.split()
    if len(words) > 30:
        first = " ".join(words[:30]) + "..."
    return f"In short: {first}"


_POSITIVE = {"love", "great", "best", "excellent", "happy", "recommend", "premium", "good", "solid", "fast",
             "exceeded", "strong", "gut", "buena", "empfehlung", "👍", "😊"}
_NEGATIVE = {"terrible", "broke", "disappointed", "not", "cheap", "never", "returned", "returning", "scratch",
             "stopped", "confusing", "hot", "disconnecting", "smaller", "don't", "tardó", "lenta"}


def _pick(options: list[Any], prompt: str, seed: int) -> Any:
    """An enum value that fits the prompt when the simulator can tell (sentiment words, a value named in
    the text), else a stable choice: plausible labels, not a model's judgement."""
    words = set(prompt.lower().replace(",", " ").replace(".", " ").replace("!", " ").split())
    named = [o for o in options if isinstance(o, str) and o.lower() in words]
    if named:
        return named[seed % len(named)]
    lowered = {str(o).lower(): o for o in options}
    if {"positive", "negative"} <= set(lowered):
        score = len(words & _POSITIVE) - len(words & _NEGATIVE)
        if score > 0:
            return lowered["positive"]
        if score < 0:
            return lowered["negative"]
        return lowered.get("neutral", lowered["positive"])
    return options[seed % len(options)]


def _value(schema: Any, seed: int, depth: int = 0, prompt: str = "") -> Any:
    if not isinstance(schema, dict):
        return None
    if schema.get("enum"):
        return _pick(schema["enum"], prompt, seed)
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            options = [o for o in schema[key] if isinstance(o, dict) and o.get("type") != "null"] or schema[key]
            return _value(options[seed % len(options)], seed >> 3, depth, prompt)
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or kind
        kind = kinds[seed % len(kinds)]
    if kind == "object":
        props = schema.get("properties", {})
        return {k: _value(v, _seed(f"{seed}:{k}"), depth + 1, prompt) for k, v in props.items()}
    if kind == "array":
        n = 1 + seed % 3 if depth < 4 else 0
        n = max(n, int(schema.get("minItems", 0)))
        if "maxItems" in schema:
            n = min(n, int(schema["maxItems"]))
        return [_value(schema.get("items", {"type": "string"}), _seed(f"{seed}:{i}"), depth + 1, prompt)
                for i in range(n)]
    if kind == "string":
        return f"{_WORDS[seed % len(_WORDS)]} answer"
    if kind == "integer":
        lo, hi = int(schema.get("minimum", 0)), int(schema.get("maximum", 100))
        return lo + seed % max(1, hi - lo + 1)
    if kind == "number":
        low, high = float(schema.get("minimum", 0.0)), float(schema.get("maximum", 1.0))
        return round(low + (seed % 1000) / 999 * (high - low), 3)
    if kind == "boolean":
        return bool(seed & 1)
    return None


def structured(schema: dict[str, Any], prompt: str) -> Any:
    """A JSON value valid for ``schema``, chosen deterministically from the prompt."""
    return _value(schema, _seed(prompt), 0, prompt)


def embeddings(texts: list[str], dimensions: int) -> np.ndarray:
    """Unit vectors of ``dimensions`` float32, one per text and seeded by it: same text, same vector.

    Drawn from SHAKE-256 of the text rather than a seeded RNG per text, so a batch of thousands is one
    numpy operation (the simulator must not be what a benchmark measures).
    """
    raw = b"".join(hashlib.shake_256(t.encode()).digest(2 * dimensions) for t in texts)
    v = (np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0).reshape(len(texts), dimensions)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return v / norms


def embedding(text: str, dimensions: int) -> np.ndarray:
    """The vector of one text (what ``embeddings`` gives for it in any batch)."""
    return embeddings([text], dimensions)[0]


def encode_embedding(v: np.ndarray, encoding_format: str) -> Any:
    """As the API sends it: a list of floats, or base64 of little-endian float32 bytes."""
    if encoding_format == "base64":
        return pybase64.b64encode(v.astype("<f4").tobytes()).decode()
    return v.tolist()


def schema_in_prompt(messages: Any) -> dict[str, Any] | None:
    """The JSON Schema a prompt states ("... valid for this JSON Schema: {...}"), the last one given; None if
    none. What a model answering in JSON mode follows, since the request itself carries no schema."""
    import json

    texts = [m.get("content") for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    for text in reversed([t for t in texts if isinstance(t, str)]):
        at = text.rfind("JSON Schema")
        start = text.find("{", at) if at >= 0 else -1
        if start < 0:
            continue
        try:
            schema, _ = json.JSONDecoder().raw_decode(text[start:])
        except ValueError:
            continue
        if isinstance(schema, dict):
            return schema
    return None
