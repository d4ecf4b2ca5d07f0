"""Rendered rows -> request bodies and their keys: the request builder beside the renderer (``render.py`` turns
templates into messages; this module owns what goes on the wire for them and the key each is journaled under).

A request's key is a hash of the endpoint and its exact body (``keys.py``), or, for a body that carries a file
as a multipart form, of the logical request (the form's boundary is random): the journal and the dedup rest on it.

The fast path: when every templated part of a chat body is a plain substitution of a column, the body is built
once with a marker in each templated place (a ``BodyFrame``), and each row's body is the frame's bytes with the
row's texts, JSON-escaped, in its holes: no message list and no JSON encoding per row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import orjson

from pipeline.keys import request_key, request_keys

if TYPE_CHECKING:
    from pipeline.endpoints.base import Endpoint, Media
    from pipeline.images import Image, ImageRule
    from pipeline.providers.base import ChatCodec, Codec


@dataclass(frozen=True)
class BodyFrame:
    """A chat body cut around its templated texts (``BodyBuilder.frame``)."""

    segments: tuple[bytes, ...]  # the bytes between the holes, one more than the holes
    order: tuple[int, ...]  # which templated part fills each hole, in body order
    quoted: tuple[bool, ...]  # the hole is a whole JSON string (its quotes included), or part of one


class BodyBuilder:
    """Builds one job's request bodies and keys through its endpoint and its provider's codec."""

    def __init__(self, endpoint: Endpoint, codec: Codec, image_rule: ImageRule, media: Media | None,
                 plain_input: bool) -> None:
        self.endpoint, self.codec, self.image_rule, self.media = endpoint, codec, image_rule, media
        # Plain-text rows (embeddings) whose input is a plain substitution go straight from the column to their
        # bodies, without a dict and a message list per row.
        self.text_body: Callable[[str], bytes] | None = endpoint.text_body(codec) if plain_input else None

    def body(self, messages: list[dict[str, str]]) -> bytes:
        """The exact JSON body; its bytes are hashed into the request key, so field order is fixed."""
        return self.endpoint.body(self.codec, messages)

    def key(self, body: bytes) -> str:
        """The request key of a body."""
        return request_key(self.endpoint.name, body)

    def keys(self, bodies: Sequence[bytes]) -> list[str]:
        """The request keys of a chunk's bodies."""
        return request_keys(self.endpoint.name, bodies)

    def with_images(self, messages: list[dict[str, str]], images: list[Image]) -> tuple[bytes, int, int]:
        """A chat body carrying the row's images: (body, image tokens by the provider's rule, URL images)."""
        body = cast("ChatCodec", self.codec).body(messages, images)
        return body, sum(self.image_rule.tokens(i) for i in images), sum(i.url is not None for i in images)

    def with_media(self, messages: list[dict[str, str]], value: object) -> tuple[bytes, str]:
        """A body carrying the row's file (``MediaProblem`` when it cannot be sent), and its key: the logical
        request's, since the form's bytes differ at every build."""
        assert self.media is not None
        body, logical = self.media.body(messages, value)
        return body, self.key(logical)

    def frame(self, parts: Sequence[tuple[str, str | None]]) -> BodyFrame | None:
        """The chat body with a hole for each templated part (``parts``: each message's role, and its fixed text or
        None where a plain substitution goes), or None when the endpoint's body cannot be framed.

        Why this is exact: JSON escapes a string character by character, so a text's escaped form in place of a
        marker's is what orjson writes for the whole body with the text in place of the marker. A body builder
        that does more with a text than place it (strip, measure, split) would not show each marker once,
        verbatim, and the frame is refused; ``check_frame`` still checks it against the builder on the first row
        of every chunk.
        """
        if not self.endpoint.chat_messages:
            return None
        variable = [i for i, (_, text) in enumerate(parts) if text is None]
        marks = {i: f"\x00pipeline-hole-{n}\x00" for n, i in enumerate(variable)}
        body = self.body([{"role": role, "content": marks[i] if text is None else text}
                          for i, (role, text) in enumerate(parts)])
        holes: list[tuple[int, int, int, bool]] = []  # (where in the body, length, which variable part, quoted)
        for n, i in enumerate(variable):
            quoted = orjson.dumps(marks[i])
            inner = quoted[1:-1]
            if body.count(inner) != 1:
                return None
            whole = body.find(quoted)
            holes.append((whole, len(quoted), n, True) if whole >= 0 else (body.find(inner), len(inner), n, False))
        holes.sort()
        segments, at = [], 0
        for start, length, _, _ in holes:
            segments.append(body[at:start])
            at = start + length
        segments.append(body[at:])
        return BodyFrame(tuple(segments), tuple(n for _, _, n, _ in holes), tuple(q for *_, q in holes))

    @staticmethod
    def framed(frame: BodyFrame, texts_of: Sequence[Sequence[str]]) -> list[bytes]:
        """The bodies of rows from the frame, given each row's templated texts."""
        dumps = orjson.dumps
        if len(frame.segments) == 2 and frame.quoted[0]:  # one text, a whole JSON string: the common case, lean
            head, tail = frame.segments
            return [head + dumps(texts[0]) + tail for texts in texts_of]
        bodies = []
        for texts in texts_of:
            out = [frame.segments[0]]
            for seg, n, quoted in zip(frame.segments[1:], frame.order, frame.quoted, strict=True):
                escaped = dumps(texts[n])
                out.append(escaped if quoted else escaped[1:-1])
                out.append(seg)
            bodies.append(b"".join(out))
        return bodies

    def check_frame(self, frame: BodyFrame, texts: Sequence[str], messages: list[dict[str, str]]) -> None:
        """The frame must build what the builder builds (``messages``: the same row's, built the slow way)."""
        if self.framed(frame, [texts])[0] != self.body(messages):  # a frame that does not fit: a bug, said loudly
            raise AssertionError("the framed request body differs from the body builder's")
