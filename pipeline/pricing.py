"""Model prices and cost math.

Prices come from ``genai-prices`` (a maintained, offline price table) unless the job's ``[pricing]`` table
overrides them. A model the table does not know gets no price: cost columns are null and the user is warned;
a made-up price would be worse than none. Rates are resolved once per run so the per-row math is plain
arithmetic (a million rows cannot afford a table lookup each).

The Batch API price is the table's own ``processing = batch`` variant where it has one, else 50% of the
standard rates, as OpenAI documents.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from pipeline.spec import PricingSpec

# Where a model is looked up in genai-prices: provider ids tried in turn (a provider's descriptor says which;
# None: by the model's name alone, for a compatible server's model).
PriceIds = tuple[str | None, ...]


def no_price_warning(model: str, price_ids: PriceIds) -> str:
    """What the user is told when a model has no known price: the nearest names the price table knows, since
    a typo is the most common reason (and a misspelled model would fail every row at the provider)."""
    near = nearest_models(model, price_ids)
    hint = f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""
    return (f"no price known for model {model!r}{hint}: cost columns will be null "
            "(add a [pricing] table with input_per_mtok and output_per_mtok to the job)")


def nearest_models(model: str, price_ids: PriceIds, n: int = 3) -> list[str]:
    """The model names under ``price_ids`` in the bundled price table closest to ``model``."""
    import difflib

    from genai_prices import data_snapshot

    names = [m.id for p in data_snapshot.get_snapshot().providers if p.id in price_ids for m in p.models]
    return difflib.get_close_matches(model, names, n=n, cutoff=0.6)
BATCH_DISCOUNT = 0.5


@dataclass(frozen=True)
class Rate:
    """USD per million tokens, with the provider's cliff tiers: past ``start`` prompt tokens, all tokens pay more."""

    base: float
    tiers: tuple[tuple[int, float], ...] = ()

    def at(self, prompt_tokens: int) -> float:
        """The rate that applies to a request of ``prompt_tokens`` prompt tokens."""
        rate = self.base
        for start, price in self.tiers:
            if prompt_tokens > start:
                rate = price
        return rate

    def scaled(self, factor: float) -> Rate:
        """Every tier times ``factor`` (the Batch API discount)."""
        return Rate(self.base * factor, tuple((s, p * factor) for s, p in self.tiers))


@dataclass(frozen=True)
class Usage:
    """Tokens of one answer, as the response's ``usage`` reports them (details default to 0 when absent)."""

    prompt_tokens: int = 0        # every input token, cached or not (Anthropic's three input fields added up)
    completion_tokens: int = 0
    cached_tokens: int = 0        # of the prompt: read from the provider's prompt cache
    reasoning_tokens: int = 0
    cache_write_tokens: int = 0   # of the prompt: written to the cache (Anthropic bills them at their own rate)
    audio_tokens: int = 0         # of the prompt: audio (a transcription model bills them at their own rate)
    units: float = 0.0            # billed units that are not tokens: seconds of audio (per-minute models)


@dataclass(frozen=True)
class Price:
    """Resolved prices of one model, standard and batch, and where they came from."""

    model: str
    input: Rate
    cached_input: Rate
    output: Rate
    batch_input: Rate
    batch_cached_input: Rate
    batch_output: Rate
    source: str
    source_date: str | None
    context_window: int | None = None
    cache_write: Rate | None = None        # None: cache writes cost what plain input does
    batch_cache_write: Rate | None = None
    audio_input: Rate | None = None        # audio prompt tokens (transcription models priced by token)
    per_unit: float = 0.0                  # USD per billed unit that is not a token (a second of audio)

    def cost(self, usage: Usage, *, batch: bool = False) -> float:
        """USD for one answer: uncached prompt, cached prompt, prompt written to the cache, and completion
        (reasoning is inside completion), each at its own rate."""
        p = usage.prompt_tokens
        cached = min(usage.cached_tokens, p)
        written = min(usage.cache_write_tokens, p - cached)
        if batch:
            rates = (self.batch_input, self.batch_cached_input, self.batch_output,
                     self.batch_cache_write or self.batch_input)
        else:
            rates = (self.input, self.cached_input, self.output, self.cache_write or self.input)
        tokens = ((p - cached - written) * rates[0].at(p) + cached * rates[1].at(p) + written * rates[3].at(p)
                  + usage.completion_tokens * rates[2].at(p)) / 1_000_000
        if usage.audio_tokens and self.audio_input is not None:  # at the audio rate instead of the text one
            audio = min(usage.audio_tokens, p - cached - written)
            tokens += audio * (self.audio_input.at(p) - rates[0].at(p)) / 1_000_000
        return tokens + usage.units * self.per_unit * (BATCH_DISCOUNT if batch else 1.0) if usage.units else tokens

    @property
    def flat(self) -> bool:
        """No tiers: cost is linear in tokens, so sums can be priced once instead of per request."""
        return not any(r.tiers for r in (self.input, self.cached_input, self.output, self.batch_input,
                                         self.batch_cached_input, self.batch_output))

    def describe(self) -> dict[str, Any]:
        """For manifests and reports: the rates in USD per 1M tokens and their source."""
        return {"model": self.model, "input_per_mtok": self.input.base, "cached_input_per_mtok": self.cached_input.base,
                "cache_write_per_mtok": (self.cache_write or self.input).base, "output_per_mtok": self.output.base,
                "batch_input_per_mtok": self.batch_input.base,
                "batch_output_per_mtok": self.batch_output.base, "source": self.source,
                "source_date": self.source_date,
                **({"per_audio_minute_usd": round(self.per_unit * 60, 9)} if self.per_unit else {})}


def _rate(value: Any) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, Decimal | int | float):
        return Rate(float(value))
    base = getattr(value, "base", None)
    if base is None:
        return None
    return Rate(float(base), tuple((int(t.start), float(t.price)) for t in getattr(value, "tiers", ())))


def _output_rate(prices: Any, keys: tuple[str, ...]) -> Rate | None:
    """The rate of the first of ``keys`` the table gives."""
    for key in keys:
        rate = _rate(getattr(prices, key, None))
        if rate is not None:
            return rate
    return None


def _table_version() -> str:
    try:
        return importlib.metadata.version("genai-prices")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - it is a dependency
        return "unknown"


def _newest_price_date(model_info: Any) -> str | None:
    """The newest price change the table knows for this model: the 'as of' date users need to judge staleness."""
    dates: list[date] = []
    prices = model_info.prices if isinstance(model_info.prices, list) else []
    for cp in prices:
        if getattr(cp, "constraint", None) is not None and hasattr(cp.constraint, "start_date"):
            dates.append(cp.constraint.start_date)
    for v in model_info.price_variants or ():
        if v.constraint is not None and hasattr(v.constraint, "start_date"):
            dates.append(v.constraint.start_date)
    return max(dates).isoformat() if dates else None


def _table_model(model: str, price_ids: PriceIds) -> Any:
    """The bundled table's entry of ``model`` under the first of ``price_ids`` that lists it (Azure sells OpenAI's
    models); None when none does."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    for price_id in price_ids:
        try:
            return snapshot.find_provider_model(model, None, price_id, None)[1]
        except LookupError:
            continue
    return None


def lookup_price(model: str, overrides: PricingSpec | None = None, *, now: datetime | None = None,
                 input_only: bool = False, price_ids: PriceIds,
                 output_keys: tuple[str, ...] = ("output_mtok",)) -> Price | None:
    """The price of ``model``, or None when neither the job nor the price table knows it.

    Models that bill input tokens only (``input_only``: embeddings) take a missing output price as 0, and only they do.
    ``output_keys``: the table's fields that price the answer's tokens, the first the model has (image generation
    answers in image tokens: ``output_image_mtok``, which image-only models leave to ``output_mtok``).
    """
    overrides = overrides or PricingSpec()
    inp: Rate | None
    out: Rate | None
    if overrides.input_per_mtok is not None and (overrides.output_per_mtok is not None or input_only):
        inp = Rate(overrides.input_per_mtok)
        cached = Rate(overrides.cached_input_per_mtok if overrides.cached_input_per_mtok is not None
                      else overrides.input_per_mtok)
        out = Rate(overrides.output_per_mtok or 0.0)
        return Price(model, inp, cached, out, inp.scaled(BATCH_DISCOUNT), cached.scaled(BATCH_DISCOUNT),
                     out.scaled(BATCH_DISCOUNT), source="job [pricing] table", source_date=None,
                     context_window=overrides.context_window)
    info = _table_model(model, price_ids)
    if info is None:
        return None
    when = now or datetime.now(tz=UTC)
    std = info.get_prices(when)
    inp, out = _rate(std.input_mtok), _output_rate(std, output_keys)
    if input_only and out is None:
        out = Rate(0.0)  # embedding models bill input tokens only
    if inp is None or out is None:
        return None
    cached = _rate(std.cache_read_mtok) or inp
    write = _rate(std.cache_write_mtok)
    batch = info.get_prices(when, {"processing": "batch"})
    has_batch = any(v.when.get("processing") == "batch" for v in info.price_variants or ())
    if has_batch:
        b_in = _rate(batch.input_mtok) or inp.scaled(BATCH_DISCOUNT)
        b_cached = _rate(batch.cache_read_mtok) or cached
        b_out = _output_rate(batch, output_keys) or out.scaled(BATCH_DISCOUNT)
        b_write = _rate(batch.cache_write_mtok) or (write.scaled(BATCH_DISCOUNT) if write else None)
    else:
        b_in, b_cached, b_out = (r.scaled(BATCH_DISCOUNT) for r in (inp, cached, out))
        b_write = write.scaled(BATCH_DISCOUNT) if write else None
    return Price(model, inp, cached, out, b_in, b_cached, b_out, cache_write=write, batch_cache_write=b_write,
                 source=f"genai-prices {_table_version()} (bundled table, model {info.id})",
                 source_date=_newest_price_date(info),
                 context_window=overrides.context_window or info.context_window)


# OpenAI's published "estimated cost" per minute of the token-priced transcription models (pricing page, speech to
# text, read 2026-12-06): what the estimate prices a minute of audio at before the run (the run's cost is the usage
# the API reports, at the bundled table's token rates).
TRANSCRIPTION_PER_MINUTE = {"gpt-4o-transcribe": 0.006, "gpt-4o-mini-transcribe": 0.003,
                            "gpt-4o-transcribe-diarize": 0.006}


def lookup_audio_price(model: str, overrides: PricingSpec | None = None, *, now: datetime | None = None,
                       price_ids: PriceIds) -> Price | None:
    """The price of a transcription model: per second of audio (whisper-1's table price per hour), or its token
    rates (text in, audio in, text out) with the published per-minute figure for the estimate; None when unknown.
    A job's ``[pricing].per_audio_minute_usd`` overrides both."""
    overrides = overrides or PricingSpec()
    if overrides.per_audio_minute_usd is not None:
        zero = Rate(0.0)
        return Price(model, zero, zero, zero, zero, zero, zero, source="job [pricing] table", source_date=None,
                     per_unit=overrides.per_audio_minute_usd / 60)
    info = _table_model(model, price_ids)
    if info is None:
        return None
    std = info.get_prices(now or datetime.now(tz=UTC))
    hours = getattr(std, "input_audio_hours", None) or getattr(std, "audio_hours", None)
    inp, out, audio = _rate(std.input_mtok) or Rate(0.0), _rate(std.output_mtok) or Rate(0.0), _rate(
        getattr(std, "input_audio_mtok", None))
    base = next((m for m in TRANSCRIPTION_PER_MINUTE if model == m or model.startswith(m + "-")), None)
    if hours is not None:
        per_second = float(hours) / 3600
    elif base is not None and audio is not None:
        per_second = TRANSCRIPTION_PER_MINUTE[base] / 60
    else:
        return None
    source = f"genai-prices {_table_version()} (bundled table, model {info.id})"
    if hours is None:
        source += "; per minute before the run: OpenAI's published estimate"
    return Price(model, inp, inp, out, inp.scaled(BATCH_DISCOUNT), inp.scaled(BATCH_DISCOUNT),
                 out.scaled(BATCH_DISCOUNT), source=source, source_date=_newest_price_date(info), audio_input=audio,
                 per_unit=per_second)
