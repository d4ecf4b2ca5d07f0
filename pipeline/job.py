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

from pipeline.endpoints import ENDPOINT_NAMES, endpoint_of
from pipeline.endpoints.base import mode_of
from pipeline.errors import JobError
from pipeline.providers.registry import DEFAULT as DEFAULT_PROVIDER
from pipeline.providers.registry import DESCRIPTORS, descriptor_of_url
from pipeline.spec import (
    ApiSpec,
    BatchSpec,
    BudgetSpec,
    EngineSpec,
    EstimateSpec,
    InputSpec,
    LimitsSpec,
    OutputSpec,
    PricingSpec,
    ReduceSpec,
    RequestSpec,
    StorageSpec,
)
from pipeline.tables import Table, default_of, resolve_path, shown, type_name

ENGINES = ("local", "ray")
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
    reduce: ReduceSpec | None = None  # [reduce]: the map's answers (or the input's rows) folded by group
    maps: bool = True                  # False: a job of [reduce] alone, over the input's rows
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


def _relative(path: Path, folder: str | Path | None) -> str:
    path = path.resolve()
    if folder is None:
        return str(path)
    return os.path.relpath(path, Path(folder).resolve())


def _parse_request(req: Table, base: Path) -> RequestSpec:
    """[request]: the endpoint (``endpoints/``) reads its own keys."""
    name = req.str("endpoint", default_of(RequestSpec, "endpoint"))
    if name not in ENDPOINT_NAMES:
        raise req.fail("endpoint", f"must be one of {', '.join(ENDPOINT_NAMES)}, got {shown(name)}")
    return endpoint_of(name).parse(req, base)


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
    top = Table(file, "", raw)
    name = top.str("name", required=True)
    assert name is not None
    maps = top.has("request") or not top.has("reduce")  # a job of [reduce] alone reduces the input's rows
    for section in ("input", "request", "output") if maps else ("input", "output"):
        if not top.has(section):
            raise JobError(f"{file}: [{section}] is required")

    inp = Table(file, "input", top.get("input"))
    from_job = inp.str("from_job")
    if from_job is not None:
        if inp.has("path"):
            raise inp.fail("from_job", "conflicts with [input].path: give one of them")
        from_job = resolve_path(base, from_job)
        input_path: str | None = _output_of(from_job, inp.where("from_job"))
    else:
        input_path = inp.str("path", required=True)
    assert input_path is not None
    input_spec = InputSpec(
        from_job=from_job,
        path=resolve_path(base, input_path),
        id=inp.str("id"),
        keep=inp.str_list("keep"),
        skip_nulls=inp.bool("skip_nulls"),
    )
    inp.done()

    if maps:
        request_spec = _parse_request(Table(file, "request", top.get("request")), base)
    else:
        red = top.get("reduce")
        model = red.get("model") if isinstance(red, dict) else None
        if not isinstance(model, str):
            raise JobError(f"{file}: [reduce].model is required in a job without [request]")
        request_spec = RequestSpec(model=model, prompt="")

    out = Table(file, "output", top.get("output"))
    out_path = out.str("path", required=True)
    assert out_path is not None
    if not out_path.endswith(".parquet"):
        raise out.fail("path", f"must end in .parquet, got {shown(out_path)}")
    from pipeline.storage import is_url, stage_path

    output_spec = OutputSpec(path=resolve_path(base, out_path),
                             stage=stage_path(out_path, base) if is_url(out_path) else None)
    out.done()

    api_spec = _parse_api(Table(file, "api", top.get("api") or {}), request_spec)

    lim = Table(file, "limits", top.get("limits") or {})
    limits = LimitsSpec(
        concurrency=lim.int("concurrency", default_of(LimitsSpec, "concurrency")),
        requests_per_minute=lim.int("requests_per_minute"),
        tokens_per_minute=lim.int("tokens_per_minute"),
        max_attempts=lim.int("max_attempts", default_of(LimitsSpec, "max_attempts")),
        timeout_s=lim.number("timeout_s", default_of(LimitsSpec, "timeout_s")),
        input_tokens_per_minute=lim.int("input_tokens_per_minute"),
        output_tokens_per_minute=lim.int("output_tokens_per_minute"),
    )
    lim.done()

    bud = Table(file, "budget", top.get("budget") or {})
    budget = BudgetSpec(max_cost_usd=bud.number("max_cost_usd"))
    bud.done()

    pr = Table(file, "pricing", top.get("pricing") or {})
    pricing = PricingSpec(
        input_per_mtok=pr.number("input_per_mtok", low=0.0, strict_low=False),
        cached_input_per_mtok=pr.number("cached_input_per_mtok", low=0.0, strict_low=False),
        output_per_mtok=pr.number("output_per_mtok", low=0.0, strict_low=False),
        context_window=pr.int("context_window"),
        per_audio_minute_usd=pr.number("per_audio_minute_usd", low=0.0, strict_low=False),
    )
    pr.done()
    endpoint = endpoint_of(request_spec.endpoint)
    if (pricing.input_per_mtok is None) != (pricing.output_per_mtok is None) and not (
            not endpoint.bills_output and pricing.input_per_mtok is not None):
        missing = "output_per_mtok" if pricing.output_per_mtok is None else "input_per_mtok"
        raise pr.fail(missing, "is required when the other price is given")

    est = Table(file, "estimate", top.get("estimate") or {})
    estimate = EstimateSpec(output_tokens=est.int("output_tokens"))
    est.done()
    if estimate.output_tokens is not None and not endpoint.bills_output:
        raise est.fail("output_tokens", f'does not apply to endpoint = "{endpoint.name}" (it has no output tokens)')
    if estimate.output_tokens is not None and estimate.output_tokens > request_spec.max_tokens:
        raise est.fail("output_tokens", f"({estimate.output_tokens}) cannot exceed [request].max_tokens "
                                        f"({request_spec.max_tokens})")
    bt = Table(file, "batch", top.get("batch") or {})
    most_requests, most_bytes = DESCRIPTORS[api_spec.provider].batch_limits
    batch = BatchSpec(
        max_requests_per_file=bt.int("max_requests_per_file", most_requests),
        max_bytes_per_file=bt.int("max_bytes_per_file", most_bytes),
        poll_interval_s=bt.number("poll_interval_s", default_of(BatchSpec, "poll_interval_s")),
        poll_max_interval_s=bt.number("poll_max_interval_s", default_of(BatchSpec, "poll_max_interval_s")),
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
    engine = _parse_engine(Table(file, "engine", top.get("engine") or {}))
    if engine.kind == "ray" and not endpoint.ray:
        raise JobError(f'{file}: [engine].kind = "ray": endpoint = "{endpoint.name}" runs on the local engine only')
    st = Table(file, "storage", top.get("storage") or {})
    storage = StorageSpec(endpoint_url=st.str("endpoint_url"))
    st.done()
    reduce = _parse_reduce(Table(file, "reduce", top.get("reduce")), request_spec, output_spec.path, maps, base) \
        if top.has("reduce") else None
    if reduce is not None and engine.kind == "ray":
        raise JobError(f'{file}: [engine].kind = "ray": a job with [reduce] runs on the local engine')
    top.done()
    return Job(name=name, input=input_spec, request=request_spec, output=output_spec, api=api_spec,
               limits=limits, budget=budget, pricing=pricing, estimate=estimate, batch=batch, engine=engine,
               storage=storage, reduce=reduce, maps=maps, source=file, raw=dict(raw), base=base)


_LOADING: list[str] = []  # the job files being read, for a chain of [input].from_job that loops


def _output_of(job_file: str, where: str) -> str:
    """The table another job writes (its reduce's, if it has one): what ``[input].from_job`` reads."""
    key = str(Path(job_file).resolve())
    if key in _LOADING:
        raise JobError(f"{where}: the jobs' [input].from_job loop back to {job_file}")
    _LOADING.append(key)
    try:
        dep = load_job(job_file)
    except JobError as e:
        raise JobError(f"{where}: {e}") from None
    finally:
        _LOADING.pop()
    return dep.reduce.output if dep.reduce is not None else dep.output.path


def _parse_reduce(red: Table, request: RequestSpec, output: str, maps: bool, base: Path) -> ReduceSpec:
    """[reduce]: group_by, prompt (a template of group, items, round, partial), and what defaults to the map's."""
    prompt = red.str("prompt", required=True)
    assert prompt is not None
    model = red.str("model", request.model)
    if maps and not endpoint_of(request.endpoint).text_answers:
        raise red.fail("prompt", f'folds answers that are text; [request].endpoint = "{request.endpoint}" gives '
                       "none")
    schema = red.get("response_schema")
    if schema is not None:
        if not isinstance(schema, dict):
            raise red.fail("response_schema", f"must be a table (a JSON Schema object), got {type_name(schema)}")
        from pipeline.structured import check_schema

        check_schema(schema, red.where("response_schema"))
    out = red.str("output")
    if out is not None and not out.endswith(".parquet"):
        raise red.fail("output", f"must end in .parquet, got {shown(out)}")
    spec = ReduceSpec(
        prompt=prompt, model=model or request.model,
        max_tokens=red.int("max_tokens", request.max_tokens if maps else default_of(RequestSpec, "max_tokens")),
        group_by=red.str_list("group_by"), items=red.str_list("items"), order_by=red.str_list("order_by"),
        system=red.str("system"), max_items_tokens=red.int("max_items_tokens"), response_schema=schema,
        output=resolve_path(base, out) if out is not None else output.removesuffix(".parquet") + ".reduce.parquet",
        mode=mode_of(red) if red.has("mode") else request.mode)
    red.done()
    return spec


def _parse_engine(eng: Table) -> EngineSpec:
    kind = eng.str("kind", default_of(EngineSpec, "kind"))
    if kind not in ENGINES:
        raise eng.fail("kind", f"must be one of {', '.join(ENGINES)}, got {shown(kind)}")
    spec = EngineSpec(kind=kind, address=eng.str("address"),
                      workers=eng.int("workers", default_of(EngineSpec, "workers")),
                      partition_rows=eng.int("partition_rows", default_of(EngineSpec, "partition_rows")),
                      commit_rows=eng.int("commit_rows", default_of(EngineSpec, "commit_rows")))
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


def _parse_api(api: Table, request: RequestSpec) -> ApiSpec:
    """[api]: the provider (said, or known from the base URL), its URL, key variable and dialect settings,
    checked against the provider's descriptor (``providers/``: no provider is named here)."""
    base_url = api.str("base_url")
    if base_url is not None:
        problem = url_problem(base_url)
        if problem:
            raise api.fail("base_url", f"{problem}, got {shown(base_url)}")
    named = api.str("provider")
    d = DESCRIPTORS.get(named) if named else (descriptor_of_url(base_url) if base_url else DEFAULT_PROVIDER)
    if d is None:
        raise api.fail("provider", f"must be one of {', '.join(DESCRIPTORS)}, got {shown(named)}")
    provider = d.name
    if base_url is None:
        # No default address (Azure, a compatible server): --base-url or PIPELINE_BASE_URL may give it at run
        # time, so "" here; resolve_base_url says what is missing if nothing does.
        base_url = d.default_base_url
    for other in DESCRIPTORS.values():
        for key, why in other.own_api_keys.items():
            if api.has(key) and key not in d.own_api_keys:
                raise api.fail(key, f'is for provider = "{other.name}" only' + (f": {why}" if why else ""))
    options = tuple((key, value) for key, default in d.options.items()
                    if (value := api.str(key, default)) is not None)
    if api.has("max_tokens_field") and not d.max_tokens_fields:
        raise api.fail("max_tokens_field", f'does not apply to provider = "{provider}" (it always sends max_tokens)')
    fields = d.max_tokens_fields or MAX_TOKENS_FIELDS  # (unused where fixed: kept as it always was)
    max_tokens_field = api.str("max_tokens_field", fields[0])
    if max_tokens_field not in fields:
        raise api.fail("max_tokens_field", f"must be one of {', '.join(fields)}, got {shown(max_tokens_field)}")
    choices = d.structured_outputs
    structured = api.str("structured_output", choices[0])
    if structured not in choices:
        raise api.fail("structured_output", f'must be one of {", ".join(choices)} for provider = "{provider}", '
                                            f"got {shown(structured)}")
    json_object_schema = api.bool("json_object_schema")
    if json_object_schema and structured != "json_object":
        raise api.fail("json_object_schema", 'applies with structured_output = "json_object" only')
    for key, needed in d.requires.items():
        if api.has(key) and not api.has(needed):
            raise api.fail(needed, f"is required with {key}")
    for name in d.request_keys_refused:
        if getattr(request.chat, name) is not None:
            raise JobError(f"{api.file}: [request].{name} does not apply to provider = \"{provider}\"")
    if not d.image_detail:
        for i, image in enumerate(request.chat.images):
            if image.detail is not None:
                raise JobError(f"{api.file}: [request].images[{i}].detail does not apply to provider = "
                               f"\"{provider}\" (it has no detail setting; it resizes large images itself)")
    if len(request.chat.images) > d.max_images:
        raise JobError(f"{api.file}: [request].images: {len(request.chat.images)} images per request, more than "
                       f"{provider} takes ({d.max_images})")
    if request.endpoint not in d.endpoints:
        serving = ", ".join(f'"{o.name}"' for o in DESCRIPTORS.values() if request.endpoint in o.endpoints)
        raise JobError(f"{api.file}: [request].endpoint = \"{request.endpoint}\": provider = \"{provider}\" has "
                       f"no {request.endpoint} API; use a provider that serves it (provider = {serving})")
    if request.mode == "batch" and request.endpoint not in d.batch_endpoints:
        raise JobError(f"{api.file}: [request].mode = \"batch\": the Batch API of provider = \"{provider}\" does not "
                       f"take {request.endpoint} requests; run online (mode = \"online\")")
    spec = ApiSpec(base_url=base_url.rstrip("/"), provider=provider,
                   api_key_env=api.str("api_key_env", d.key_env),
                   max_tokens_field=max_tokens_field, structured_output=structured,
                   json_object_schema=json_object_schema, options=options)
    api.done()
    return spec


