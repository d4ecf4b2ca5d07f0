"""What rendering produces, and what the scheduler, the senders and the endpoints hold: one row's request
ready to send, a row not sent, and one input chunk's worth of both. Plain objects apart from the renderer, so
the stages after it depend on these and not on Jinja2 or the templates."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Request:
    """One row's request, ready to send: its body bytes, its key and its token cost.

    Not frozen, though nothing changes a request once built: a frozen dataclass sets each field through
    ``object.__setattr__``, 1.4 µs a request against 0.2, and an estimate builds one per row (bench/estimate.py).
    """

    row: int
    row_id: Any
    key: str
    body: bytes
    prompt_tokens: int
    max_output_tokens: int
    keep: tuple[Any, ...]
    image_tokens: int = 0  # of prompt_tokens, what its images count for

    @property
    def budget_tokens(self) -> int:
        """What the provider charges against tokens-per-minute when it admits this request."""
        return self.prompt_tokens + self.max_output_tokens


@dataclass(frozen=True, slots=True)
class Skipped:
    """A row not sent: a column its templates use is null and the job says ``skip_nulls``, or (with
    ``error_type``) its image cannot be sent, which fails the row alone, before the run."""

    row: int
    row_id: Any
    reason: str
    keep: tuple[Any, ...]
    error_type: str | None = None  # set: the row fails before sending (a bad image), it is not skipped


@dataclass(frozen=True)
class RenderedChunk:
    """What one input chunk became."""

    requests: list[Request]
    skipped: list[Skipped]
    settled: Mapping[str, Any] = field(default_factory=dict)  # key -> answer on record (not to be sent)
    url_images: int = 0  # images sent as URLs: their dimensions, so their tokens, are unknown offline
