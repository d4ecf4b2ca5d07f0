"""Every body the project builds, checked against the official SDKs' own parameter types: a key the type does
not declare fails the test (an allow-list below names the few the providers document and the SDK lags, with why).

The SDKs' types are TypedDicts, which accept any extra key when validated; so the check walks the value and the
type together and reports what is not declared, and what does not fit a declared type at all."""

from __future__ import annotations

import collections.abc
import io
import types
import typing
from typing import Any

import orjson
import polars as pl
import pytest
import typing_extensions as te
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming as AnthropicMessage
from anthropic.types.messages.batch_create_params import Request as AnthropicBatchRequest
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming as OpenAIChat
from openai.types.embedding_create_params import EmbeddingCreateParams as OpenAIEmbedding
from PIL import Image as PILImage

from pipeline.job import Job
from pipeline.providers import provider_for
from pipeline.render import Renderer
from pipeline.source import open_source, read_head

# Keys a provider documents (and accepts with the API version this project sends) that its SDK does not declare.
ALLOWED = {
    # anthropic 2.x targets anthropic-version 2026-10-21, which removed sampling parameters; with 2023-06-01 (what
    # the project sends unless [api].anthropic_version says otherwise) the Messages API takes them per model family.
    ("anthropic", "temperature"), ("anthropic", "top_p"),
}


def _unwrap(tp: Any) -> Any:
    while te.get_origin(tp) in (te.Required, te.NotRequired, te.Annotated, te.ReadOnly):
        tp = te.get_args(tp)[0]
    return tp


def misfits(value: Any, tp: Any, path: str = "$") -> list[str] | None:
    """The undeclared keys of ``value`` under ``tp`` (paths), or None when it does not fit ``tp`` at all."""
    tp = _unwrap(tp)
    if tp is Any or tp is object:
        return []
    origin, args = te.get_origin(tp), te.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        fits = [r for r in (misfits(value, arm, path) for arm in args) if r is not None]
        return min(fits, key=len) if fits else None
    if origin in (typing.Literal, te.Literal):
        return [] if value in args else None
    if te.is_typeddict(tp):
        if not isinstance(value, dict):
            return None
        hints = te.get_type_hints(tp, include_extras=True)
        if not set(getattr(tp, "__required_keys__", ())) <= set(value):
            return None
        out: list[str] = []
        for key, v in value.items():
            if key not in hints:
                out.append(f"{path}.{key}")
                continue
            inner = misfits(v, hints[key], f"{path}.{key}")
            if inner is None:
                return None
            out += inner
        return out
    if tp is type(None):
        return [] if value is None else None
    if tp in (str, int, float, bool):
        ok = isinstance(value, tp) or (tp is float and isinstance(value, int) and not isinstance(value, bool))
        return [] if ok and not (tp is int and isinstance(value, bool)) else None
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return [] if isinstance(value, dict) else None
    if origin is not None and args and isinstance(value, list):  # Iterable, List, SequenceNotStr, ...
        out = []
        for i, item in enumerate(value):
            inner = misfits(item, args[0], f"{path}[{i}]")
            if inner is None:
                return None
            out += inner
        return out
    if origin is not None:
        return None  # a sequence type, and the value is not a list
    return []


def unknown_keys(value: Any, tp: Any, provider: str) -> list[str]:
    found = misfits(value, tp)
    assert found is not None, f"does not fit {getattr(tp, '__name__', tp)}: {value}"
    def allowed(path: str) -> bool:  # the message's own top level, or a batch request's params
        parent, _, key = path.rpartition(".")
        return (provider, key) in ALLOWED and parent in ("$", "$.params")

    return [k for k in found if not allowed(k)]


SCHEMA = ('[request.response_schema]\ntype = "object"\nadditionalProperties = false\nrequired = ["label", "stars"]\n'
          '[request.response_schema.properties.label]\ntype = "string"\nenum = ["positive", "negative"]\n'
          '[request.response_schema.properties.stars]\ntype = "integer"\n')
TOOL = ('[[request.tools]]\nname = "refund"\ndescription = "Refund an order."\nstrict = true\n'
        '[request.tools.parameters]\ntype = "object"\nadditionalProperties = false\nrequired = ["order_id"]\n'
        '[request.tools.parameters.properties.order_id]\ntype = "string"\n')
FEW_SHOT = ('messages = [{role = "user", content = "great!"}, {role = "assistant", content = "positive"}]\n')
IMAGE = 'images = ["{{ file }}"]\n'
APIS = {
    "openai": "",
    "azure": 'base_url = "https://r.openai.azure.com/openai/v1/"\ndeployment = "prod-mini"',
    "azure-deployments": 'base_url = "https://r.openai.azure.com"\ndeployment = "prod"\napi_version = "2024-10-21"',
    "compatible": 'base_url = "http://127.0.0.1:9/v1"',
    "compatible-json": 'base_url = "http://127.0.0.1:9/v1"\nstructured_output = "json_object"',
    "anthropic": 'provider = "anthropic"',
}
FEATURES = {
    "plain": "",
    "system": 'system = "Classify the review."\n',
    "sampling": "temperature = 0.2\nseed = 7\nstop = [\"###\"]\n",
    "schema": SCHEMA,
    "tools": TOOL + 'tool_choice = "required"\n',
    "few-shot": FEW_SHOT,
    "image": IMAGE,
}
MATRIX = [(api, feature) for api in APIS for feature in FEATURES
          if not (api.startswith("anthropic") and feature == "sampling")] + [
    ("anthropic", "anthropic-sampling"), ("anthropic-old", "schema"), ("openai", "reasoning"),
    ("openai", "json-object"), ("azure", "json-object")]


def _job(make_job, tmp_path, api: str, feature: str) -> Job:
    model = {"anthropic": "claude-sonnet-4-5", "anthropic-old": "claude-3-5-haiku-latest"}.get(api, "gpt-4o-mini")
    lines = {"anthropic-sampling": "temperature = 0.2\nstop = [\"###\"]\n",
             "reasoning": 'reasoning_effort = "low"\n', "json-object": SCHEMA}.get(feature, FEATURES.get(feature, ""))
    if feature == "reasoning":
        model = "o4-mini"
    api_text = APIS.get(api, 'provider = "anthropic"')
    if feature == "json-object":
        api_text += '\nstructured_output = "json_object"'
    buf = io.BytesIO()
    PILImage.new("RGB", (40, 30), (200, 30, 30)).save(buf, "PNG")
    (tmp_path / "pic.png").write_bytes(buf.getvalue())
    data = pl.DataFrame({"review_id": ["r1", "r2"], "product": ["lamp", "tent"],
                         "text": ["it was great", "it was poor"], "file": ["pic.png", "pic.png"]})
    request = f'model = "{model}"\nprompt = "Review of {{{{ product }}}}: {{{{ text }}}}"\nmax_tokens = 40\n{lines}'
    return Job.load(make_job(data=data, request=request, extra=f"[api]\n{api_text}\n"))


def _bodies(job: Job) -> list[bytes]:
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    return [r.body for r in renderer.render_chunk(read_head(source, renderer.columns, 2)).requests]


@pytest.mark.parametrize(("api", "feature"), MATRIX)
def test_every_body_and_batch_line_fits_the_official_sdk_types(make_job, tmp_path, api, feature):
    job = _job(make_job, tmp_path, api, feature)
    provider = provider_for(job)
    anthropic = job.api.provider == "anthropic"
    kind = "anthropic" if anthropic else "openai"
    for body in _bodies(job):
        value = orjson.loads(body)
        assert unknown_keys(value, AnthropicMessage if anthropic else OpenAIChat, kind) == []
        line = orjson.loads(provider.codec(job.request, job.name).batch_line("k" * 32, body))
        if anthropic:
            assert unknown_keys(line, AnthropicBatchRequest, kind) == []
        else:  # the Batch API's JSONL line: no SDK type, the documented four keys
            assert set(line) == {"custom_id", "method", "url", "body"} and line["method"] == "POST"
            assert unknown_keys(line["body"], OpenAIChat, kind) == []


@pytest.mark.parametrize("api", ["openai", "azure", "compatible"])
def test_every_embeddings_body_fits_the_official_sdk_type(make_job, api):
    job = Job.load(make_job(request='endpoint = "embeddings"\nmodel = "text-embedding-3-small"\n'
                                    'input = "{{ text }}"\ndimensions = 256', extra=f"[api]\n{APIS[api]}\n"))
    for body in _bodies(job):
        assert unknown_keys(orjson.loads(body), OpenAIEmbedding, "openai") == []


def test_the_walker_reports_an_undeclared_key_and_a_misfit():
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object", "schema": {}}}
    assert unknown_keys(body, OpenAIChat, "openai") == ["$.response_format.schema"]
    assert misfits({"model": "m", "messages": "not a list"}, OpenAIChat) is None
    assert len(MATRIX) + 3 >= 30  # the job variations this file checks
