"""The job file: TOML in, validated frozen objects out.

Everything a run needs is checked here once, at the edge, so the stages after it trust their inputs. Every
error names the file and the key path, in the form users grep for: ``jobs/x.toml: [limits].concurrency ...``.
Relative paths resolve against the job file's folder, so a job runs the same from any working directory.
"""

from __future__ import annotations

import builtins
import dataclasses
import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

from pipeline.errors import JobError
from pipeline.providers.registry import DEFAULT as DEFAULT_PROVIDER
from pipeline.providers.registry import DESCRIPTORS, descriptor_of_url
from pipeline.spec import (
    ApiSpec,
    BatchSpec,
    BudgetSpec,
    EngineSpec,
    EstimateSpec,
    ImageSpec,
    InputSpec,
    LimitsSpec,
    Message,
    OutputSpec,
    PricingSpec,
    RequestSpec,
    StorageSpec,
    ToolSpec,
)

ENDPOINTS = ("chat", "embeddings")
MODES = ("online", "batch")
EMBEDDING_FORMATS = ("base64", "float")
ROLES = ("system", "developer", "user", "assistant")
IMAGE_DETAILS = ("low", "high", "auto")
IMAGE_POSITIONS = ("after", "before")
TOOL_CHOICES = ("auto", "required")
ENGINES = ("local", "ray")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
MAX_TOKENS_FIELDS = ("max_completion_tokens", "max_tokens")


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
    engine: EngineSpec = field(default_factory=EngineSpec)
    storage: StorageSpec = field(default_factory=StorageSpec)
    source: str = field(default="<job>", compare=False)  # where it was read from: for messages only
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the keys as given
    base: Path = field(default_factory=Path.cwd, compare=False, repr=False)  # what relative paths were resolved by

    @classmethod
    def load(cls, path: str | Path) -> Job:
        """Read and validate a job file; raises JobError naming the file and key on any problem."""
        return load_job(path)

    @classmethod
    def from_dict(cls, keys: Mapping[str, Any], *, base: str | Path | None = None, source: str = "<code>") -> Job:
        """A job built in code from the same keys as a job file, with the same checks and messages (relative paths
        resolve against ``base``, default the working folder): ``Job.from_dict(tomllib.load(f))`` equals
        ``Job.load(path)`` for a file in that folder."""
        return parse_job(keys, file=source, base=Path(base) if base is not None else None)

    def to_toml(self, folder: str | Path | None = None) -> str:
        """The job file of this job (a notebook experiment becoming the nightly run): loading it gives an equal
        job. Paths are written relative to ``folder`` (where the file will live), or absolute without one."""
        import tomli_w

        from pipeline.storage import is_url

        keys = json.loads(json.dumps(self.raw))  # a deep copy of plain TOML values
        for table, key, value in (("input", "path", self.input.path), ("output", "path", self.output.path)):
            if not is_url(value):
                keys[table][key] = _relative(Path(value), folder)
        request = keys.get("request", {})
        for key in ("prompt_file", "response_schema_file"):
            if key in request:
                request[key] = _relative(self.base / request[key], folder)
        return tomli_w.dumps(keys, multiline_strings=True)

    def fingerprint(self) -> str:
        """A hash of what decides the answers, so an output folder is never mixed between jobs."""
        spec: dict[str, str] = {"name": self.name, "endpoint": self.request.endpoint, "model": self.request.model}
        if self.api.provider != DEFAULT_PROVIDER.name:  # another dialect gives other answers (OpenAI jobs keep theirs)
            spec["provider"] = self.api.provider
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _default(spec: type, name: str) -> Any:
    """A field's default as its spec class declares it: each default is written once, in ``spec.py``."""
    return next(f.default for f in dataclasses.fields(spec) if f.name == name)


def _relative(path: Path, folder: str | Path | None) -> str:
    path = path.resolve()
    if folder is None:
        return str(path)
    return os.path.relpath(path, Path(folder).resolve())


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

    @overload
    def str(self, key: str, default: str, *, required: bool = False) -> str: ...

    @overload
    def str(self, key: str, default: None = None, *, required: bool = False) -> str | None: ...

    def str(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.get(key)
        if value is None:
            if required:
                typo = difflib.get_close_matches(key, [k for k in self.raw if k not in self.seen], n=1, cutoff=0.75)
                if typo:  # `promt = ...`: the key the user meant is there, misspelled
                    raise self.fail(typo[0], f"is not a known key; did you mean {key!r}?")
                raise self.fail(key, "is required")
            return default
        if value == "" and default is not None:  # an empty setting means the default
            return default
        if not isinstance(value, builtins.str) or (required and not value.strip()):
            raise self.fail(key, f"must be a non-empty string, got {_shown(value)}")
        return value

    @overload
    def int(self, key: builtins.str, default: int, *, minimum: int = 1) -> int: ...

    @overload
    def int(self, key: builtins.str, default: None = None, *, minimum: int = 1) -> int | None: ...

    def int(self, key: builtins.str, default: int | None = None, *, minimum: int = 1) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise self.fail(key, f"must be {kind}, got {_shown(value)}")
        return value

    @overload
    def number(self, key: builtins.str, default: float, *, low: float = 0.0, high: float | None = None,
               strict_low: bool = True) -> float: ...

    @overload
    def number(self, key: builtins.str, default: None = None, *, low: float = 0.0, high: float | None = None,
               strict_low: bool = True) -> float | None: ...

    def number(self, key: builtins.str, default: float | None = None, *, low: float = 0.0,
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

    def bool(self, key: builtins.str, default: bool = False) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_shown(value)}")
        return value

    def str_list(self, key: builtins.str) -> tuple[builtins.str, ...]:
        value = self.get(key)
        if value is None:
            return ()
        if isinstance(value, builtins.str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, builtins.str) and v for v in value):
            raise self.fail(key, f"must be a list of strings, got {_shown(value)}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            near = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.75)
            if near:
                raise self.fail(unknown[0], f"is not a known key; did you mean {near[0]!r}?")
            raise self.fail(unknown[0], "is not a known key" + _known_hint(self))


def _known_hint(table: _Table) -> str:
    known = sorted(table.seen)
    return f" (known keys: {', '.join(known)})" if known else ""


def _resolve(base: Path, value: str) -> str:
    from pipeline.storage import is_url

    if is_url(value):
        return value
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
    from pipeline.storage import is_url, stage_path

    output_spec = OutputSpec(path=_resolve(base, out_path),
                             stage=stage_path(out_path, base) if is_url(out_path) else None)
    out.done()

    api_spec = _parse_api(_Table(file, "api", top.get("api") or {}), request_spec)

    lim = _Table(file, "limits", top.get("limits") or {})
    limits = LimitsSpec(
        concurrency=lim.int("concurrency", _default(LimitsSpec, "concurrency")),
        requests_per_minute=lim.int("requests_per_minute"),
        tokens_per_minute=lim.int("tokens_per_minute"),
        max_attempts=lim.int("max_attempts", _default(LimitsSpec, "max_attempts")),
        timeout_s=lim.number("timeout_s", _default(LimitsSpec, "timeout_s")),
        input_tokens_per_minute=lim.int("input_tokens_per_minute"),
        output_tokens_per_minute=lim.int("output_tokens_per_minute"),
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
    most_requests, most_bytes = DESCRIPTORS[api_spec.provider].batch_limits
    batch = BatchSpec(
        max_requests_per_file=bt.int("max_requests_per_file", most_requests),
        max_bytes_per_file=bt.int("max_bytes_per_file", most_bytes),
        poll_interval_s=bt.number("poll_interval_s", _default(BatchSpec, "poll_interval_s")),
        poll_max_interval_s=bt.number("poll_max_interval_s", _default(BatchSpec, "poll_max_interval_s")),
    )
    if batch.max_requests_per_file > most_requests:
        raise bt.fail("max_requests_per_file", f"can be at most {most_requests} (the {api_spec.provider} Batch "
                                               f"API's limit), got {batch.max_requests_per_file}")
    if batch.max_bytes_per_file > most_bytes:
        raise bt.fail("max_bytes_per_file", f"can be at most {most_bytes} (the {api_spec.provider} Batch API's "
                                            f"limit), got {batch.max_bytes_per_file}")
    if batch.poll_max_interval_s < batch.poll_interval_s:
        raise bt.fail("poll_max_interval_s", f"({batch.poll_max_interval_s:g}) cannot be below poll_interval_s "
                                             f"({batch.poll_interval_s:g})")
    bt.done()
    engine = _parse_engine(_Table(file, "engine", top.get("engine") or {}))
    st = _Table(file, "storage", top.get("storage") or {})
    storage = StorageSpec(endpoint_url=st.str("endpoint_url"))
    st.done()
    top.done()
    return Job(name=name, input=input_spec, request=request_spec, output=output_spec, api=api_spec,
               limits=limits, budget=budget, pricing=pricing, estimate=estimate, batch=batch, engine=engine,
               storage=storage, source=file, raw=dict(raw), base=base)


def _parse_engine(eng: _Table) -> EngineSpec:
    kind = eng.str("kind", _default(EngineSpec, "kind"))
    if kind not in ENGINES:
        raise eng.fail("kind", f"must be one of {', '.join(ENGINES)}, got {_shown(kind)}")
    spec = EngineSpec(kind=kind, address=eng.str("address"),
                      workers=eng.int("workers", _default(EngineSpec, "workers")),
                      partition_rows=eng.int("partition_rows", _default(EngineSpec, "partition_rows")),
                      commit_rows=eng.int("commit_rows", _default(EngineSpec, "commit_rows")))
    eng.done()
    return spec


def provider_of_url(url: str) -> str:
    """The provider a base URL belongs to, for jobs that do not say: the API's own hosts, else a compatible server."""
    return descriptor_of_url(url).name


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot be a base URL (None: it can): checked when the job is read, so ``validate`` refuses
    what the run's HTTP client would trip on."""
    from urllib.parse import urlsplit

    if not url.startswith(("http://", "https://")):
        return "must start with http:// or https://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError as e:
        return f"is not a valid URL ({e})"
    if not parts.hostname:
        return "names no host"
    return None


def _parse_api(api: _Table, request: RequestSpec) -> ApiSpec:
    """[api]: the provider (said, or known from the base URL), its URL, key variable and dialect settings,
    checked against the provider's descriptor (``providers/``: no provider is named here)."""
    base_url = api.str("base_url")
    if base_url is not None:
        problem = url_problem(base_url)
        if problem:
            raise api.fail("base_url", f"{problem}, got {_shown(base_url)}")
    named = api.str("provider")
    d = DESCRIPTORS.get(named) if named else (descriptor_of_url(base_url) if base_url else DEFAULT_PROVIDER)
    if d is None:
        raise api.fail("provider", f"must be one of {', '.join(DESCRIPTORS)}, got {_shown(named)}")
    provider = d.name
    if base_url is None:
        # No default address (Azure, a compatible server): --base-url or PIPELINE_BASE_URL may give it at run
        # time, so "" here; resolve_base_url says what is missing if nothing does.
        base_url = d.default_base_url
    for other in DESCRIPTORS.values():
        for key in other.own_keys:
            if api.has(key) and key not in d.own_keys:
                raise api.fail(key, f'is for provider = "{other.name}" only'
                               + (": OpenAI's and Azure's json_object takes no schema (it goes in the prompt)"
                                  if key == "json_object_schema" else ""))
    if api.has("max_tokens_field") and not d.max_tokens_fields:
        raise api.fail("max_tokens_field", f'does not apply to provider = "{provider}" (it always sends max_tokens)')
    fields = d.max_tokens_fields or MAX_TOKENS_FIELDS  # (unused where fixed: kept as it always was)
    max_tokens_field = api.str("max_tokens_field", fields[0])
    if max_tokens_field not in fields:
        raise api.fail("max_tokens_field", f"must be one of {', '.join(fields)}, got {_shown(max_tokens_field)}")
    choices = d.structured_outputs
    structured = api.str("structured_output", choices[0])
    if structured not in choices:
        raise api.fail("structured_output", f'must be one of {", ".join(choices)} for provider = "{provider}", '
                                            f"got {_shown(structured)}")
    json_object_schema = api.bool("json_object_schema")
    if json_object_schema and structured != "json_object":
        raise api.fail("json_object_schema", 'applies with structured_output = "json_object" only')
    for key, needed in d.requires.items():
        if api.has(key) and not api.has(needed):
            raise api.fail(needed, f"is required with {key}")
    for name in d.request_keys_refused:
        if getattr(request, name) is not None:
            raise JobError(f"{api.file}: [request].{name} does not apply to provider = \"{provider}\"")
    if not d.image_detail:
        for i, image in enumerate(request.images):
            if image.detail is not None:
                raise JobError(f"{api.file}: [request].images[{i}].detail does not apply to provider = "
                               f"\"{provider}\" (it has no detail setting; it resizes large images itself)")
    if len(request.images) > d.max_images:
        raise JobError(f"{api.file}: [request].images: {len(request.images)} images per request, more than "
                       f"{provider} takes ({d.max_images})")
    if request.endpoint not in d.endpoints:
        serving = ", ".join(f'"{o.name}"' for o in DESCRIPTORS.values() if request.endpoint in o.endpoints)
        raise JobError(f"{api.file}: [request].endpoint = \"{request.endpoint}\": provider = \"{provider}\" has "
                       f"no {request.endpoint} API; use a provider that serves it (provider = {serving})")
    spec = ApiSpec(base_url=base_url.rstrip("/"), provider=provider,
                   api_key_env=api.str("api_key_env", d.key_env),
                   deployment=api.str("deployment"), api_version=api.str("api_version"),
                   max_tokens_field=max_tokens_field, structured_output=structured,
                   json_object_schema=json_object_schema,
                   anthropic_version=api.str("anthropic_version", _default(ApiSpec, "anthropic_version")))
    api.done()
    return spec


def _mode(req: _Table) -> str:
    mode = req.str("mode", _default(RequestSpec, "mode"))
    if mode not in MODES:
        raise req.fail("mode", f"must be one of {', '.join(MODES)}, got {_shown(mode)}")
    return mode


def _parse_request(req: _Table, base: Path) -> RequestSpec:
    endpoint = req.str("endpoint", _default(RequestSpec, "endpoint"))
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
    tools = _parse_tools(req)
    if tools and schema is not None:
        raise req.fail("tools", "conflicts with [request].response_schema: give one of them (tool arguments are "
                                "already typed columns)")
    tool_choice = _parse_tool_choice(req, tools)
    position = req.str("image_position", _default(RequestSpec, "image_position"))
    if position not in IMAGE_POSITIONS:
        raise req.fail("image_position", f"must be one of {', '.join(IMAGE_POSITIONS)}, got {_shown(position)}")
    spec = RequestSpec(
        endpoint=endpoint,
        model=model,
        system=req.str("system"),
        prompt=prompt,
        prompt_source=prompt_source,
        messages=messages,
        max_tokens=req.int("max_tokens", _default(RequestSpec, "max_tokens")),
        temperature=req.number("temperature", low=0.0, high=2.0, strict_low=False),
        top_p=req.number("top_p", low=0.0, high=1.0, strict_low=False),
        seed=req.int("seed", minimum=0),
        stop=stop,
        reasoning_effort=req.str("reasoning_effort"),
        response_schema=schema,
        schema_retries=req.int("schema_retries", _default(RequestSpec, "schema_retries"), minimum=0),
        mode=_mode(req),
        images=_parse_images(req),
        image_position=position,
        tools=tools,
        tool_choice=tool_choice,
    )
    req.done()
    return spec


def _parse_images(req: _Table) -> tuple[ImageSpec, ...]:
    """[request].images: each entry a template string, or a table {source = template, detail = ...}."""
    raw = req.get("images")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise req.fail("images", f"must be a non-empty list of templates or {{source, detail}} tables, got "
                                 f"{_type_name(raw)}")
    out = []
    for i, item in enumerate(raw):
        key = f"images[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or not set(item) <= {"source", "detail"} or "source" not in item:
            raise req.fail(key, "must be a template string or a table with the keys source and (optionally) detail")
        if not isinstance(item["source"], str) or not item["source"].strip():
            raise req.fail(f"{key}.source", f"must be a non-empty template string, got {_shown(item['source'])}")
        detail = item.get("detail")
        if detail is not None and detail not in IMAGE_DETAILS:
            raise req.fail(f"{key}.detail", f"must be one of {', '.join(IMAGE_DETAILS)}, got {_shown(detail)}")
        out.append(ImageSpec(template=item["source"], detail=detail, where=req.where(key)))
    return tuple(out)


def _parse_tools(req: _Table) -> tuple[ToolSpec, ...]:
    """[[request.tools]]: name, description, JSON Schema parameters, strict; checked like a response schema."""
    raw = req.get("tools")
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise req.fail("tools", f"must be a non-empty list of tables ([[request.tools]]), got {_type_name(raw)}")
    from pipeline.structured import check_schema, check_valid_schema

    out: list[ToolSpec] = []
    for i, item in enumerate(raw):
        key = f"tools[{i}]"
        if not isinstance(item, dict):
            raise req.fail(key, f"must be a table with name, description and parameters, got {_type_name(item)}")
        unknown = sorted(set(item) - {"name", "description", "parameters", "strict"})
        if unknown:
            raise req.fail(f"{key}.{unknown[0]}", "is not a known key (known keys: description, name, parameters, "
                                                  "strict)")
        name = item.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise req.fail(f"{key}.name", f"must be 1-64 letters, digits, _ or -, got {_shown(name)}")
        if name in {t.name for t in out}:
            raise req.fail(f"{key}.name", f"repeats the tool name {_shown(name)}")
        description = item.get("description")
        if description is not None and not isinstance(description, str):
            raise req.fail(f"{key}.description", f"must be a string, got {_type_name(description)}")
        params = item.get("parameters", {"type": "object", "properties": {}, "required": [],
                                          "additionalProperties": False})
        if not isinstance(params, dict):
            raise req.fail(f"{key}.parameters", f"must be a table (a JSON Schema object), got {_type_name(params)}")
        strict = item.get("strict", False)
        if not isinstance(strict, bool):
            raise req.fail(f"{key}.strict", f"must be true or false, got {_shown(strict)}")
        where = req.where(f"{key}.parameters")
        (check_schema if strict else check_valid_schema)(params, where)
        out.append(ToolSpec(name=name, description=description, parameters=params, strict=strict))
    return tuple(out)


def _parse_tool_choice(req: _Table, tools: tuple[ToolSpec, ...]) -> str:
    choice = req.str("tool_choice")
    if choice is None:
        return "auto"
    if not tools:
        raise req.fail("tool_choice", "needs [[request.tools]]")
    names = [t.name for t in tools]
    if choice not in TOOL_CHOICES and choice not in names:
        raise req.fail("tool_choice", f"must be auto, required or a tool's name ({', '.join(names)}), got "
                                      f"{_shown(choice)}")
    return choice


def _parse_embeddings_request(req: _Table) -> RequestSpec:
    for key in ("prompt", "prompt_file", "system", "messages", "max_tokens", "temperature", "top_p", "seed", "stop",
                "reasoning_effort", "response_schema", "response_schema_file", "schema_retries", "images",
                "image_position", "tools", "tool_choice"):
        if req.has(key):
            raise req.fail(key, 'does not apply to endpoint = "embeddings" (its template is [request].input)')
    model = req.str("model", required=True)
    template = req.str("input", required=True)
    assert model is not None and template is not None
    fmt = req.str("encoding_format", _default(RequestSpec, "encoding_format"))
    if fmt not in EMBEDDING_FORMATS:
        raise req.fail("encoding_format", f"must be one of {', '.join(EMBEDDING_FORMATS)}, got {_shown(fmt)}")
    batch_size = req.int("batch_size", _default(RequestSpec, "batch_size"))
    if batch_size > 2048:
        raise req.fail("batch_size", f"can be at most 2048 (the API's limit of inputs per request), got {batch_size}")
    spec = RequestSpec(endpoint="embeddings", model=model, prompt=template, prompt_source=req.where("input"),
                       max_tokens=0, dimensions=req.int("dimensions"), encoding_format=fmt, batch_size=batch_size,
                       batch_tokens=req.int("batch_tokens", _default(RequestSpec, "batch_tokens")),
                       max_input_tokens=req.int("max_input_tokens", _default(RequestSpec, "max_input_tokens")),
                       mode=_mode(req))
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
