"""What each model family accepts, so a job is refused before the run rather than failing every row there.

A job that sets ``temperature`` for a reasoning model, ``reasoning_effort`` for a model without reasoning, or a
Claude ``temperature`` above 1 is valid TOML and renders fine; the provider answers every row with a 400. These
tables say, per provider, which request parameters a family takes, their ranges, which exclude each other and
the largest output cap, and ``check_family`` turns a mismatch into one line naming the key, the model and what to
do. A model no table knows (an OpenAI-compatible server's, a new release) gets what the job says, unchecked, and
``validate`` says so.

Sources (read 2026-12):
- OpenAI reasoning models refuse non-default sampling: "Unsupported parameter: 'temperature' is not supported
  with this model" (o1, o3, o3-mini, o4-mini; openai-python issue 2104; the community's parameter matrix,
  community.openai.com/t/1110750); GPT-5 family the same (community.openai.com/t/1371738, "reasoning models
  generally allow no sampling parameters"); gpt-5.1 and later take sampling only with ``reasoning_effort = "none"``.
- reasoning_effort values per model: Azure's ReasoningEffort reference (learn.microsoft.com, @azure/ai-projects
  reasoningeffort): gpt-5.1 takes none/low/medium/high and defaults to none, models before it do not take none,
  gpt-5-pro takes high only, xhigh from gpt-5.1-codex-max on; gpt-5 / -mini / -nano also take minimal.
- OpenAI temperature range 0-2, top_p 0-1 (API reference, ``chat/completion_create_params.py`` in openai-python).
- Claude: temperature 0-1 (Messages API reference); Claude Sonnet 4.5 / Haiku 4.5 / Opus 4.1 and later take
  temperature OR top_p, not both ("temperature and top_p cannot both be specified for this model",
  platform.claude.com/docs/en/about-claude/models/migrating-to-claude-4); Claude Opus 4.7 refuses sampling
  parameters ("`temperature` is deprecated for this model", migration guide for Opus 4.7); anthropic-version
  2026-10-21 removes temperature, top_p and top_k from the Messages API for every model.
- Output caps (max output tokens): OpenAI model pages (gpt-4o 16,384; gpt-4.1 32,768; o-series 100,000; GPT-5
  128,000); Anthropic models overview (Claude 3 Haiku 4,096; 3.5 8,192; 3.7 Sonnet and Sonnet 4 64,000; Opus 4 /
  4.1 32,000; the 4.5 family 64,000; Opus 4.6 and 4.7 128,000).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pipeline.errors import JobError


@dataclass(frozen=True)
class Family:
    """What the models whose names start with one of ``prefixes`` accept."""

    name: str
    prefixes: tuple[str, ...]
    max_output: int
    sampling: bool = True                  # temperature and top_p accepted at all
    sampling_with_effort: tuple[str, ...] = ()  # sampling only when reasoning_effort is one of these (or unset)
    temperature_max: float = 2.0
    one_sampler: bool = False              # temperature and top_p exclude each other
    efforts: tuple[str, ...] = ()          # reasoning_effort values taken; () = the parameter is refused
    stop: bool = True                      # stop sequences accepted


_O_SERIES = ("low", "medium", "high")
OPENAI: tuple[Family, ...] = (
    Family("GPT-5 chat", ("gpt-5-chat",), 16_384),
    Family("GPT-5.x chat (fixed reasoning)", ("gpt-5.1-chat", "gpt-5.2-chat"), 16_384, sampling=False,
           efforts=("medium",)),
    Family("GPT-5 pro", ("gpt-5-pro",), 272_000, sampling=False, efforts=("high",)),
    Family("GPT-5.2 pro", ("gpt-5.2-pro",), 128_000, sampling=False, efforts=("medium", "high", "xhigh")),
    Family("GPT-5 codex with xhigh", ("gpt-5.1-codex-max", "gpt-5.2-codex"), 128_000, sampling=False,
           efforts=("low", "medium", "high", "xhigh")),
    Family("GPT-5 codex", ("gpt-5-codex", "gpt-5.1-codex"), 128_000, sampling=False, efforts=_O_SERIES),
    Family("GPT-5.1 and later", ("gpt-5.1", "gpt-5.2", "gpt-5.3", "gpt-5.4", "gpt-5.5"), 128_000,
           sampling=False, sampling_with_effort=("none",), efforts=("none", "low", "medium", "high", "xhigh")),
    Family("GPT-5", ("gpt-5",), 128_000, sampling=False, efforts=("minimal", "low", "medium", "high")),
    Family("o1-mini / o1-preview", ("o1-mini", "o1-preview"), 65_536, sampling=False, stop=False),
    Family("o-series reasoning", ("o1", "o3", "o4-mini"), 100_000, sampling=False, efforts=_O_SERIES, stop=False),
    Family("GPT-4.1", ("gpt-4.1",), 32_768),
    Family("GPT-4o", ("gpt-4o", "chatgpt-4o"), 16_384),
    Family("GPT-4 turbo", ("gpt-4-turbo",), 4_096),
    Family("GPT-4", ("gpt-4-", "gpt-4"), 8_192),
    Family("GPT-3.5", ("gpt-3.5",), 4_096),
)

ANTHROPIC: tuple[Family, ...] = (
    Family("Claude Opus 4.7", ("claude-opus-4-7",), 128_000, sampling=False),
    Family("Claude Opus 4.6 / Sonnet 4.6", ("claude-opus-4-6", "claude-sonnet-4-6"), 128_000, temperature_max=1.0,
           one_sampler=True),
    Family("Claude 4.5", ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-5"), 64_000, temperature_max=1.0,
           one_sampler=True),
    Family("Claude Opus 4.1", ("claude-opus-4-1",), 32_000, temperature_max=1.0, one_sampler=True),
    Family("Claude Opus 4", ("claude-opus-4",), 32_000, temperature_max=1.0),
    Family("Claude Sonnet 4 / 3.7", ("claude-sonnet-4", "claude-3-7-sonnet"), 64_000, temperature_max=1.0),
    Family("Claude 3.5", ("claude-3-5-",), 8_192, temperature_max=1.0),
    Family("Claude 3", ("claude-3-",), 4_096, temperature_max=1.0),
)

SAMPLING_REMOVED_FROM = "2026-10-21"  # anthropic-version from which no model takes temperature, top_p or top_k


def family_of(provider: str, model: str) -> Family | None:
    """The family of ``model`` at ``provider`` (None: no table knows it)."""
    table = ANTHROPIC if provider == "anthropic" else OPENAI if provider in ("openai", "azure") else ()
    name = model.lower()
    for family in table:
        if name.startswith(family.prefixes):
            return family
    return None


def check_family(job_source: str, provider: str, model: str, *, temperature: float | None, top_p: float | None,
                 reasoning_effort: str | None, max_tokens: int, stop: bool,
                 options: Mapping[str, str] | None = None) -> list[str]:
    """Raise JobError for a parameter ``model`` refuses; returns notes for a model no table knows (Azure's
    ``model`` is the priced model, not the deployment, so it names the family there too)."""
    family = family_of(provider, model)
    if family is None:
        if provider in ("openai", "azure", "anthropic"):
            return [f"model {model!r} is not in the table of model families, so its parameters are sent unchecked"]
        return []
    where = f"{job_source}: [request]"

    def refuse(key: str, why: str, fix: str) -> JobError:
        return JobError(f"{where}.{key} {why} ({family.name}): {fix}")

    anthropic_version = (options or {}).get("anthropic_version", "")  # the provider's own [api] key
    sampling_removed = provider == "anthropic" and anthropic_version >= SAMPLING_REMOVED_FROM
    sampling_ok = family.sampling or (family.sampling_with_effort and (reasoning_effort or "none")
                                      in family.sampling_with_effort)
    for key, value in (("temperature", temperature), ("top_p", top_p)):
        if value is None:
            continue
        if sampling_removed:
            raise JobError(f"{where}.{key} is not accepted with anthropic-version {anthropic_version} (it removed "
                           "sampling parameters): remove it, or set [api].anthropic_version = \"2023-06-01\"")
        if not sampling_ok:
            fix = ('remove it, or set reasoning_effort = "none"' if family.sampling_with_effort else "remove it")
            raise refuse(key, f"is not accepted by {model}", fix)
    if temperature is not None and not 0 <= temperature <= family.temperature_max:
        raise refuse("temperature", f"= {temperature:g} is outside {model}'s range",
                     f"use a value from 0 to {family.temperature_max:g}")
    if top_p is not None and not 0 <= top_p <= 1:
        raise refuse("top_p", f"= {top_p:g} is outside {model}'s range", "use a value from 0 to 1")
    if family.one_sampler and temperature is not None and top_p is not None:
        raise refuse("top_p", f"cannot be set together with temperature for {model}", "keep one of the two")
    if reasoning_effort is not None and reasoning_effort not in family.efforts:
        if not family.efforts:
            raise refuse("reasoning_effort", f"is not accepted by {model}, which does not reason", "remove it")
        raise refuse("reasoning_effort", f"= {reasoning_effort!r} is not accepted by {model}",
                     f"use one of {', '.join(family.efforts)}")
    if stop and not family.stop:
        raise refuse("stop", f"is not accepted by {model}", "remove it")
    if max_tokens > family.max_output:
        raise refuse("max_tokens", f"= {max_tokens:,} is above the most {model} can write ({family.max_output:,})",
                     f"use at most {family.max_output:,}")
    return []
