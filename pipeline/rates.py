"""The server's view of our rate limits on one response: a plain value the providers read from their headers,
the limits and the errors carry, and nothing else needs to know the provider for."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RateInfo:
    """The server's view of our rate limits on one response; any of it may be absent (compatible servers)."""

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests_s: float | None = None
    reset_tokens_s: float | None = None
    # Anthropic limits input and output tokens apart (its "tokens" readings are the tightest of the two)
    limit_input_tokens: int | None = None
    remaining_input_tokens: int | None = None
    reset_input_tokens_s: float | None = None
    limit_output_tokens: int | None = None
    remaining_output_tokens: int | None = None
    reset_output_tokens_s: float | None = None


NO_RATE = RateInfo()
