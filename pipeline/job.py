"""The job file: TOML in, validated frozen objects out.

Everything a run needs is checked here once, at the edge, so the stages after it trust their inputs. Every
error names the file and the key path, in the form users grep for: ``jobs/x.toml: [limits].concurrency ...``.
Relative paths resolve against the job file's folder, so a job runs the same from any working directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import JobError

ENDPOINTS = ("chat", "embeddings")
MODES = ("online", "batch")
EMBEDDING_FORMATS = ("base64", "float")
ROLES = ("system", "developer", "user", "assistant")
DEFAULT_BASE_URL = "https://api.openai.com/v1"


@dataclass(frozen=True)
class Message:
    """One templated chat message of a few-shot prefix."""

    role: str
    content: str


@dataclass(frozen=True)
class InputSpec:
    """Where the rows come from and which of their columns travel to the output."""

    path: str
    id: str | None = None
    keep: tuple[str, ...] = ()
    skip_nulls: bool = False


@dataclass(frozen=True)
class RequestSpec:
    """How one row becomes one request body."""

    model: str
    endpoint: str = "chat"
    system: str | None = None
    prompt: str = ""
    prompt_source: str = "[request].prompt"
    messages: tuple[Message, ...] = ()
    max_tokens: int = 256
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    reasoning_effort: str | None = None
    response_schema: Mapping[str, Any] | None = None
    schema_retries: int = 1
    # embeddings: `input` is the template (kept in `prompt`); many rows go in one request
    dimensions: int | None = None
    encoding_format: str = "base64"
    batch_size: int = 2048
    batch_tokens: int = 300_000
    max_input_tokens: int = 8192
    mode: str = "online"  # or "batch": the Batch API (half the price, results within 24 h)

    @property
    def is_embeddings(self) -> bool:
        """True for embeddings jobs (many rows per request, vectors out)."""
        return self.endpoint == "embeddings"


@dataclass(frozen=True)
class OutputSpec:
    """Where the result table goes."""

    path: str


@dataclass(frozen=True)
class ApiSpec:
    """Where requests go; the key itself is read from the named environment variable only."""

    base_url: str = DEFAULT_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"


@dataclass(frozen=True)
class LimitsSpec:
    """The provider's limits and how hard to push against them."""

    concurrency: int = 64
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_attempts: int = 6
    timeout_s: float = 120.0


@dataclass(frozen=True)
class BudgetSpec:
    """A spending cap: refuse to start above it, stop cleanly before crossing it."""

    max_cost_usd: float | None = None


@dataclass(frozen=True)
class PricingSpec:
    """Per-job price overrides, USD per million tokens; they win over the price table."""

    input_per_mtok: float | None = None
    cached_input_per_mtok: float | None = None
    output_per_mtok: float | None = None
    context_window: int | None = None


@dataclass(frozen=True)
class BatchSpec:
    """How Batch API mode splits, submits and polls (the defaults are OpenAI's limits)."""

    max_requests_per_file: int = 50_000
    max_bytes_per_file: int = 200_000_000
    poll_interval_s: float = 10.0      # the first wait between polls; it grows while nothing changes
    poll_max_interval_s: float = 120.0


@dataclass(frozen=True)
class EstimateSpec:
    """What the user expects a typical answer to cost, for an estimate below the max_tokens bound."""

    output_tokens: int | None = None


@dataclass(frozen=True)
class Job:
    """A validated job: everything needed to estimate or run it."""

    name: str
    input: InputSpec
    request: RequestSpec
    output: OutputSpec
    api: ApiSpec = field(default_factory=ApiSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    budget: BudgetSpec = field(default_factory=BudgetSpec)
    pricing: PricingSpec = field(default_factory=PricingSpec)
    estimate: EstimateSpec = field(default_factory=EstimateSpec)
    batch: BatchSpec = field(default_factory=BatchSpec)
    source: str = "<job>"

    @classmethod
    def load(cls, path: str | Path) -> Job:
        """Read and validate a job file; raises JobError naming the file and key on any problem."""
        return load_job(path)

    def fingerprint(self) -> str:
        """A hash of what decides the answers, so an output folder is never mixed between jobs."""
        spec = {"name": self.name, "endpoint": self.request.endpoint, "model": self.request.model}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _type_name(value: object) -> str:
    return {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _shown(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


class _Table:
    """Reads one TOML table key by key, so each error can name its exact key path; leftovers are unknown keys."""

    def __init__(self, file: str, name: str, raw: object) -> None:
        self.file, self.name = file, name
        if not isinstance(raw, dict):
            raise JobError(f"{file}: [{name}] must be a table, got {_type_name(raw)}")
        self.raw: dict[str, Any] = dict(raw)
        self.seen: set[str] = set()

    def where(self, key: str) -> str:
        return f"{self.file}: [{self.name}].{key}" if self.name else f"{self.file}: {key}"

    def fail(self, key: str, what: str) -> JobError:
        return JobError(f"{self.where(key)} {what}")

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str) -> Any:
        self.seen.add(key)
        return self.raw.get(key)

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                raise self.fail(key, "is required")
            return default
        if not isinstance(value, str) or (required and not value.strip()):
            raise self.fail(key, f"must be a non-empty string, got {_shown(value)}")
        return value

    def int(self, key: str, default: int | None = None, *, minimum: int = 1) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(key, f"must be {kind}, got {_shown(value)}")
        return value

    def number(self, key: str, default: float | None = None, *, low: float = 0.0,
               high: float | None = None, strict_low: bool = True) -> float | None:
        value = self.get(key)
        if value is None:
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        ok = ok and (value > low if strict_low else value >= low) and (high is None or value <= high)
        if not ok:
            bound = f"> {low:g}" if strict_low else f">= {low:g}"
            rng = f"a number {bound}" + (f" and <= {high:g}" if high is not None else "")
            raise self.fail(key, f"must be {rng}, got {_shown(value)}")
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_shown(value)}")
        return value

    def str_list(self, key: str) -> tuple[str, ...]:
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of strings, got {_shown(value)}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise self.fail(unknown[0], "is not a known key" + _known_hint(self))


def _known_hint(table: _Table) -> str:
    known = sorted(table.seen)
    return f" (known keys: {', '.join(known)})" if known else ""


def _resolve(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base / p))


def load_job(path: str | Path) -> Job:
    """Read a job file; every problem becomes one JobError naming the file and key path."""
    file = str(path)
    p = Path(path)
    if not p.is_file():
        raise JobError(f"{file}: job file not found")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise JobError(f"{file}: not UTF-8 text ({e.reason})") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"{file}: invalid TOML: {e}") from None
    return parse_job(raw, file=file, base=p.resolve().parent)


def parse_job(raw: Mapping[str, Any], *, file: str = "<job>", base: Path | None = None) -> Job:
    """Validate an already-parsed job mapping (the Python API builds jobs this way too)."""
    base = base or Path.cwd()
    top = _Table(file, "", raw)
    name = top.str("name", required=True)
    assert name is not None
    for section in ("input", "request", "output"):
        if not top.has(section):
            raise JobError(f"{file}: [{section}] is required")

    inp = _Table(file, "input", top.get("input"))
    input_path = inp.str("path", required=True)
    assert input_path is not None
    input_spec = InputSpec(
        path=_resolve(base, input_path),
        id=inp.str("id"),
        keep=inp.str_list("keep"),
        skip_nulls=inp.bool("skip_nulls"),
    )
    inp.done()

    request_spec = _parse_request(_Table(file, "request", top.get("request")), base)

    out = _Table(file, "output", top.get("output"))
    out_path = out.str("path", required=True)
    assert out_path is not None
    if not out_path.endswith(".parquet"):
        raise out.fail("path", f"must end in .parquet, got {_shown(out_path)}")
    output_spec = OutputSpec(path=_resolve(base, out_path))
    out.done()

    api = _Table(file, "api", top.get("api") or {})
    base_url = api.str("base_url", DEFAULT_BASE_URL) or DEFAULT_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise api.fail("base_url", f"must start with http:// or https://, got {_shown(base_url)}")
    api_spec = ApiSpec(base_url=base_url.rstrip("/"), api_key_env=api.str("api_key_env", "OPENAI_API_KEY")
                       or "OPENAI_API_KEY")
    api.done()

    lim = _Table(file, "limits", top.get("limits") or {})
    limits = LimitsSpec(
        concurrency=lim.int("concurrency", 64) or 64,
        requests_per_minute=lim.int("requests_per_minute"),
        tokens_per_minute=lim.int("tokens_per_minute"),
        max_attempts=lim.int("max_attempts", 6) or 6,
        timeout_s=lim.number("timeout_s", 120.0) or 120.0,
    )
    lim.done()

    bud = _Table(file, "budget", top.get("budget") or {})
    budget = BudgetSpec(max_cost_usd=bud.number("max_cost_usd"))
    bud.done()

    pr = _Table(file, "pricing", top.get("pricing") or {})
    pricing = PricingSpec(
        input_per_mtok=pr.number("input_per_mtok", low=0.0, strict_low=False),
        cached_input_per_mtok=pr.number("cached_input_per_mtok", low=0.0, strict_low=False),
        output_per_mtok=pr.number("output_per_mtok", low=0.0, strict_low=False),
        context_window=pr.int("context_window"),
    )
    pr.done()
    if (pricing.input_per_mtok is None) != (pricing.output_per_mtok is None) and not (
            request_spec.is_embeddings and pricing.input_per_mtok is not None):
        missing = "output_per_mtok" if pricing.output_per_mtok is None else "input_per_mtok"
        raise pr.fail(missing, "is required when the other price is given")

    est = _Table(file, "estimate", top.get("estimate") or {})
    estimate = EstimateSpec(output_tokens=est.int("output_tokens"))
    est.done()
    if estimate.output_tokens is not None and request_spec.is_embeddings:
        raise est.fail("output_tokens", 'does not apply to endpoint = "embeddings" (it has no output tokens)')
    if estimate.output_tokens is not None and estimate.output_tokens > request_spec.max_tokens:
        raise est.fail("output_tokens", f"({estimate.output_tokens}) cannot exceed [request].max_tokens "
                                        f"({request_spec.max_tokens})")
    bt = _Table(file, "batch", top.get("batch") or {})
    batch = BatchSpec(
        max_requests_per_file=bt.int("max_requests_per_file", 50_000) or 50_000,
        max_bytes_per_file=bt.int("max_bytes_per_file", 200_000_000) or 200_000_000,
        poll_interval_s=bt.number("poll_interval_s", 10.0) or 10.0,
        poll_max_interval_s=bt.number("poll_max_interval_s", 120.0) or 120.0,
    )
    if batch.max_requests_per_file > 50_000:
        raise bt.fail("max_requests_per_file", f"can be at most 50000 (the Batch API's limit), got "
                                               f"{batch.max_requests_per_file}")
    if batch.poll_max_interval_s < batch.poll_interval_s:
        raise bt.fail("poll_max_interval_s", f"({batch.poll_max_interval_s:g}) cannot be below poll_interval_s "
                                             f"({batch.poll_interval_s:g})")
    bt.done()
    top.done()
    return Job(name=name, input=input_spec, request=request_spec, output=output_spec, api=api_spec,
               limits=limits, budget=budget, pricing=pricing, estimate=estimate, batch=batch, source=file)


def _mode(req: _Table) -> str:
    mode = req.str("mode", "online") or "online"
    if mode not in MODES:
        raise req.fail("mode", f"must be one of {', '.join(MODES)}, got {_shown(mode)}")
    return mode


def _parse_request(req: _Table, base: Path) -> RequestSpec:
    endpoint = req.str("endpoint", "chat") or "chat"
    if endpoint not in ENDPOINTS:
        raise req.fail("endpoint", f"must be one of {', '.join(ENDPOINTS)}, got {_shown(endpoint)}")
    if endpoint == "embeddings":
        return _parse_embeddings_request(req)
    for key in ("input", "dimensions", "encoding_format", "batch_size", "batch_tokens", "max_input_tokens"):
        if req.has(key):
            raise req.fail(key, 'is for endpoint = "embeddings" only')
    model = req.str("model", required=True)
    assert model is not None
    if req.has("prompt") and req.has("prompt_file"):
        raise req.fail("prompt_file", "conflicts with [request].prompt: give one of them")
    prompt, prompt_source = "", f"{req.where('prompt')}"
    if req.has("prompt_file"):
        rel = req.str("prompt_file", required=True)
        assert rel is not None
        path = Path(_resolve(base, rel))
        if not path.is_file():
            raise req.fail("prompt_file", f"file not found: {path}")
        try:
            prompt = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise req.fail("prompt_file", f"cannot be read: {path}: {e}") from None
        prompt_source = str(path)
    else:
        prompt = req.str("prompt", required=True) or ""
    messages = _parse_messages(req)
    stop = req.str_list("stop")
    if len(stop) > 4:
        raise req.fail("stop", f"takes at most 4 strings, got {len(stop)}")
    if req.has("response_schema") and req.has("response_schema_file"):
        raise req.fail("response_schema_file", "conflicts with [request].response_schema: give one of them")
    schema = req.get("response_schema")
    if schema is not None and not isinstance(schema, dict):
        raise req.fail("response_schema", f"must be a table (a JSON Schema object), got {_type_name(schema)}")
    schema_where = req.where("response_schema")
    if req.has("response_schema_file"):
        rel = req.str("response_schema_file", required=True)
        assert rel is not None
        path = Path(_resolve(base, rel))
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise req.fail("response_schema_file", f"file not found: {path}") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise req.fail("response_schema_file", f"is not a readable JSON file: {path}: {e}") from None
        if not isinstance(schema, dict):
            raise req.fail("response_schema_file", f"must hold a JSON object: {path}")
        schema_where = str(path)
    if schema is not None:
        from pipeline.structured import check_schema

        check_schema(schema, schema_where)
    spec = RequestSpec(
        endpoint=endpoint,
        model=model,
        system=req.str("system"),
        prompt=prompt,
        prompt_source=prompt_source,
        messages=messages,
        max_tokens=req.int("max_tokens", 256) or 256,
        temperature=req.number("temperature", low=0.0, high=2.0, strict_low=False),
        top_p=req.number("top_p", low=0.0, high=1.0, strict_low=False),
        seed=req.int("seed", minimum=0),
        stop=stop,
        reasoning_effort=req.str("reasoning_effort"),
        response_schema=schema,
        schema_retries=req.int("schema_retries", 1, minimum=0) or 0,
        mode=_mode(req),
    )
    req.done()
    return spec


def _parse_embeddings_request(req: _Table) -> RequestSpec:
    for key in ("prompt", "prompt_file", "system", "messages", "max_tokens", "temperature", "top_p", "seed", "stop",
                "reasoning_effort", "response_schema", "response_schema_file", "schema_retries"):
        if req.has(key):
            raise req.fail(key, 'does not apply to endpoint = "embeddings" (its template is [request].input)')
    model = req.str("model", required=True)
    template = req.str("input", required=True)
    assert model is not None and template is not None
    fmt = req.str("encoding_format", "base64") or "base64"
    if fmt not in EMBEDDING_FORMATS:
        raise req.fail("encoding_format", f"must be one of {', '.join(EMBEDDING_FORMATS)}, got {_shown(fmt)}")
    batch_size = req.int("batch_size", 2048) or 2048
    if batch_size > 2048:
        raise req.fail("batch_size", f"can be at most 2048 (the API's limit of inputs per request), got {batch_size}")
    spec = RequestSpec(endpoint="embeddings", model=model, prompt=template, prompt_source=req.where("input"),
                       max_tokens=0, dimensions=req.int("dimensions"), encoding_format=fmt, batch_size=batch_size,
                       batch_tokens=req.int("batch_tokens", 300_000) or 300_000,
                       max_input_tokens=req.int("max_input_tokens", 8192) or 8192, mode=_mode(req))
    req.done()
    return spec


def _parse_messages(req: _Table) -> tuple[Message, ...]:
    raw = req.get("messages")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise req.fail("messages", f"must be a list of {{role, content}} tables, got {_type_name(raw)}")
    out = []
    for i, m in enumerate(raw):
        key = f"messages[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise req.fail(key, "must be a table with exactly the keys role and content")
        if m["role"] not in ROLES:
            raise req.fail(f"{key}.role", f"must be one of {', '.join(ROLES)}, got {_shown(m['role'])}")
        if not isinstance(m["content"], str):
            raise req.fail(f"{key}.content", f"must be a string, got {_type_name(m['content'])}")
        out.append(Message(role=m["role"], content=m["content"]))
    return tuple(out)
