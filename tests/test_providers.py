"""The provider seam without a server: which provider a job talks to, and each dialect's bodies, answers,
errors, rate readings and prices."""

import json
from datetime import UTC, datetime, timedelta

import orjson
import pytest

from pipeline.errors import AbortError, JobError, RateLimited, RowError, TransientError
from pipeline.job import Job
from pipeline.pricing import Usage, lookup_price
from pipeline.providers import DESCRIPTORS, provider_for
from pipeline.providers.anthropic import has_json_output
from pipeline.providers.anthropic_batch import batch_result, batch_state
from pipeline.providers.anthropic_wire import message_answer, parse_message, parse_rate
from pipeline.render import Renderer
from pipeline.source import open_source

SCHEMA = ('[request.response_schema]\ntype = "object"\nadditionalProperties = false\nrequired = ["label"]\n'
          '[request.response_schema.properties.label]\ntype = "string"\nenum = ["positive", "negative"]\n')


def job_with(make_job, api: str, *, model: str = "gpt-4o-mini", schema: bool = False, extra_request: str = ""):
    request = (f'model = "{model}"\nsystem = "Classify."\nprompt = "{{{{ text }}}}"\nmax_tokens = 20\n'
               f'stop = ["###"]\ntemperature = 0.2\n{extra_request}' + (SCHEMA if schema else ""))
    return Job.load(make_job(request=request, extra=f"[api]\n{api}"))


@pytest.mark.parametrize(("base_url", "provider", "key_env"), [
    ("https://api.openai.com/v1", "openai", "OPENAI_API_KEY"),
    ("https://myres.openai.azure.com/openai/v1", "azure", "AZURE_OPENAI_API_KEY"),
    ("https://api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY"),
    ("http://localhost:8080/v1", "openai-compatible", "OPENAI_API_KEY"),
])
def test_the_provider_and_its_key_variable_follow_the_base_url(make_job, base_url, provider, key_env):
    job = job_with(make_job, f'base_url = "{base_url}"')
    assert job.api.provider == provider and job.api.api_key_env == key_env
    expected_field = "max_tokens" if provider == "openai-compatible" else "max_completion_tokens"
    assert job.api.max_tokens_field == expected_field


def test_a_job_without_base_url_is_openai_and_anthropic_gets_its_own_default(make_job):
    assert job_with(make_job, "").api.provider == "openai"
    job = job_with(make_job, 'provider = "anthropic"', model="claude-haiku-4-5")
    assert job.api.base_url == "https://api.anthropic.com/v1"


@pytest.mark.parametrize(("api", "request_extra", "message"), [
    ('provider = "anthropic"\nmax_tokens_field = "max_tokens"', "", "does not apply to provider"),
    ('provider = "openai"\nstructured_output = "tool"', "", "must be one of json_schema, json_object, none"),
    ('provider = "bedrock"', "", "must be one of openai, azure, anthropic, openai-compatible"),
    ('provider = "anthropic"', "seed = 3\n", '[request].seed does not apply to provider = "anthropic"'),
    ('provider = "openai"\ndeployment = "x"', "", '[api].deployment is for provider = "azure" only'),
])
def test_api_settings_are_checked_with_the_key_named(make_job, api, request_extra, message):
    with pytest.raises(JobError, match=r"job\.toml: ") as e:
        job_with(make_job, api, extra_request=request_extra)
    assert message in str(e.value)


def test_an_embeddings_job_for_anthropic_is_refused_before_anything_is_sent(make_job):
    path = make_job(request='endpoint = "embeddings"\nmodel = "voyage-3"\ninput = "{{ text }}"',
                    extra='[api]\nprovider = "anthropic"')
    with pytest.raises(JobError, match=r"provider = \"anthropic\" has no embeddings API"):
        Job.load(path)


def first_body(job):
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    from pipeline.source import read_head

    req = renderer.render_chunk(read_head(source, renderer.columns, 1)).requests[0]
    return orjson.loads(req.body), req


def test_anthropic_bodies_put_the_system_prompt_on_top_and_always_send_max_tokens(make_job):
    job = job_with(make_job, 'provider = "anthropic"', model="claude-haiku-4-5", schema=True)
    body, _ = first_body(job)
    assert body["system"].startswith("Classify.") and all(m["role"] != "system" for m in body["messages"])
    assert body["max_tokens"] == 20 and body["stop_sequences"] == ["###"] and body["temperature"] == 0.2
    assert body["output_config"]["format"]["type"] == "json_schema" and "response_format" not in body
    assert "max_completion_tokens" not in body and "stop" not in body


def test_older_claude_models_get_the_schema_as_one_forced_tool(make_job):
    assert has_json_output("claude-sonnet-4-5-20250929") and has_json_output("claude-opus-4-7")
    assert not has_json_output("claude-3-5-haiku-latest") and not has_json_output("claude-opus-4-1")
    job = job_with(make_job, 'provider = "anthropic"', model="claude-3-5-haiku-latest", schema=True)
    body, _ = first_body(job)
    assert body["tool_choice"] == {"type": "tool", "name": "answer"}
    assert body["tools"][0]["input_schema"]["required"] == ["label"] and "output_config" not in body


def test_compatible_json_object_sends_the_schema_beside_it_when_asked_and_in_the_system_prompt(make_job):
    job = job_with(make_job, 'base_url = "http://127.0.0.1:9/v1"\nstructured_output = "json_object"\n'
                             'json_object_schema = true', schema=True)
    body, req = first_body(job)
    assert body["response_format"]["type"] == "json_object" and body["response_format"]["schema"]["required"]
    assert body["max_tokens"] == 20 and "max_completion_tokens" not in body
    system = body["messages"][0]
    assert system["role"] == "system" and '"enum":["positive","negative"]' in system["content"]
    counter = provider_for(job).counter(job.request.model)
    assert not counter.exact
    # the instruction is counted too (apart from the system text: a token more at the seam, never fewer)
    assert 0 <= req.prompt_tokens - counter.count_messages(body["messages"]) <= 1


def test_azure_v1_and_deployment_urls_and_its_key_header(make_job):
    v1 = provider_for(job_with(make_job, 'base_url = "https://r.openai.azure.com/openai/v1/"\ndeployment = "prod"'))
    assert v1.base_url("https://r.openai.azure.com/openai/v1/") == "https://r.openai.azure.com/openai/v1"
    assert v1.codec(job_with(make_job, "").request, "t").path == "/chat/completions"
    assert v1.headers("k")["api-key"] == "k" and "Authorization" not in v1.headers("k")
    old_job = job_with(make_job, 'base_url = "https://r.openai.azure.com"\ndeployment = "prod"\n'
                                 'api_version = "2024-10-21"')
    old, codec = provider_for(old_job), provider_for(old_job).codec(old_job.request, "t")
    assert old.base_url("https://r.openai.azure.com") + codec.path == (
        "https://r.openai.azure.com/openai/deployments/prod/chat/completions?api-version=2024-10-21")
    assert codec.batch_line("k" * 32, b"{}").startswith(b'{"custom_id":"' + b"k" * 32 + b'","method":"POST",'
                                                               b'"url":"/chat/completions"')


def test_the_azure_deployment_is_sent_as_the_model_while_the_model_is_priced(make_job):
    job = job_with(make_job, 'base_url = "https://r.openai.azure.com/openai/v1"\ndeployment = "prod-4o"')
    body, _ = first_body(job)
    assert body["model"] == "prod-4o"
    price = lookup_price(job.request.model, price_ids=DESCRIPTORS["azure"].price_ids)
    assert price is not None and price.input.base == 0.15


def test_anthropic_base_url_with_or_without_v1():
    from pipeline.job import ApiSpec
    from pipeline.providers.anthropic import AnthropicProvider
    from pipeline.spec import RequestSpec

    p = AnthropicProvider(ApiSpec(provider="anthropic"))
    assert p.base_url("https://api.anthropic.com/v1/") == p.base_url("https://api.anthropic.com")
    path = p.codec(RequestSpec(model="claude-sonnet-4-5"), "t").path
    assert p.base_url("https://api.anthropic.com") + path == "https://api.anthropic.com/v1/messages"
    headers = p.headers("sk-ant-x")
    assert headers["x-api-key"] == "sk-ant-x" and headers["anthropic-version"] == "2023-06-01"


def message(**overrides):
    m = {"id": "msg_1", "type": "message", "model": "claude-haiku-4-5", "stop_reason": "end_turn",
         "content": [{"type": "text", "text": "Hello"}],
         "usage": {"input_tokens": 100, "output_tokens": 7, "cache_read_input_tokens": 1000,
                   "cache_creation_input_tokens": 50}}
    m.update(overrides)
    return m


def test_anthropic_usage_adds_the_cache_parts_back_and_stop_reasons_are_mapped():
    a = message_answer(message())
    assert a.content == "Hello" and a.finish_reason == "stop"
    assert a.usage == Usage(prompt_tokens=1150, completion_tokens=7, cached_tokens=1000, cache_write_tokens=50)
    assert message_answer(message(stop_reason="max_tokens")).finish_reason == "length"
    refused = message_answer(message(stop_reason="refusal", content=[]))
    assert refused.content is None and refused.refusal
    tool = message_answer(message(stop_reason="tool_use", content=[
        {"type": "tool_use", "id": "t", "name": "answer", "input": {"label": "positive"}}]))
    assert json.loads(tool.content) == {"label": "positive"} and tool.finish_reason == "stop"


def test_cache_reads_and_writes_are_each_priced_at_their_own_rate():
    price = lookup_price("claude-3-5-haiku-latest", price_ids=DESCRIPTORS["anthropic"].price_ids)
    assert price is not None
    usage = Usage(prompt_tokens=1150, completion_tokens=7, cached_tokens=1000, cache_write_tokens=50)
    expected = (100 * 0.80 + 1000 * 0.08 + 50 * 1.00 + 7 * 4.00) / 1e6
    assert price.cost(usage) == pytest.approx(expected)
    assert price.cost(usage, batch=True) == pytest.approx(expected / 2)


def test_anthropic_errors_are_classed_by_what_to_do():
    def err(status, type_, headers=None):
        body = orjson.dumps({"type": "error", "error": {"type": type_, "message": f"{type_} happened"}})
        with pytest.raises(Exception) as e:
            parse_message(status, headers or {}, body)
        return e.value

    assert type(err(529, "overloaded_error")) is TransientError
    limited = err(429, "rate_limit_error", {"retry-after": "7"})
    assert isinstance(limited, RateLimited) and limited.retry_after == 7.0
    assert isinstance(err(401, "authentication_error"), AbortError)
    assert isinstance(err(400, "invalid_request_error"), RowError)
    assert err(413, "request_too_large").kind == "request_too_large"
    assert "overloaded_error happened" in str(err(529, "overloaded_error"))


def test_anthropic_rate_headers_keep_input_and_output_apart_with_rfc3339_resets():
    soon = (datetime.now(tz=UTC) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    rate = parse_rate({"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
                       "anthropic-ratelimit-requests-reset": soon,
                       "anthropic-ratelimit-input-tokens-limit": "40000",
                       "anthropic-ratelimit-input-tokens-remaining": "1000",
                       "anthropic-ratelimit-output-tokens-limit": "8000",
                       "anthropic-ratelimit-output-tokens-remaining": "8000"})
    assert rate.limit_requests == 50 and rate.remaining_requests == 49 and 28 < rate.reset_requests_s <= 30
    assert rate.limit_input_tokens == 40000 and rate.remaining_input_tokens == 1000
    assert rate.limit_output_tokens == 8000 and rate.limit_tokens is None


def test_message_batch_objects_and_result_lines_in_the_batch_runners_terms():
    b = batch_state({"id": "msgbatch_1", "processing_status": "ended", "created_at": "2026-12-01T10:00:00Z",
                    "cancel_initiated_at": None,
                    "request_counts": {"processing": 0, "succeeded": 8, "errored": 1, "canceled": 0, "expired": 1}})
    assert b.status == "expired" and b.counts == {"total": 10, "completed": 8, "failed": 2}
    assert b.output_file_id == "msgbatch_1"
    ok = batch_result(orjson.dumps({"custom_id": "k1", "result": {"type": "succeeded", "message": message()}}))
    assert ok.key == "k1" and ok.answer.content == "Hello"
    bad = batch_result(orjson.dumps({"custom_id": "k2", "result": {"type": "errored", "error": {
        "type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}}}))
    assert isinstance(bad.error, RowError) and "bad" in str(bad.error)
    gone = batch_result(orjson.dumps({"custom_id": "k3", "result": {"type": "expired"}}))
    assert isinstance(gone.error, TransientError) and gone.attempts == 0
    cancelled = batch_result(orjson.dumps({"custom_id": "k4", "result": {"type": "canceled"}}))
    assert cancelled.error.kind == "batch_cancelled"


@pytest.mark.parametrize("provider", ['provider = "openai"', 'base_url = "https://r.openai.azure.com/openai/v1/"\n'
                                      'deployment = "prod"', 'base_url = "http://127.0.0.1:9/v1"'])
def test_json_object_is_the_type_alone_unless_a_compatible_server_is_told_otherwise(make_job, provider):
    job = job_with(make_job, f'{provider}\nstructured_output = "json_object"', schema=True)
    body, _ = first_body(job)
    assert body["response_format"] == {"type": "json_object"}
    assert "JSON" in body["messages"][0]["content"]  # OpenAI's json_object needs the word in the messages


def test_base_url_on_the_command_line_or_in_the_environment_gives_a_compatible_job_its_address(make_job, sim,
                                                                                              monkeypatch):
    from tests.conftest import run_cli

    job = make_job(rows=3, extra='[api]\nprovider = "openai-compatible"')
    missing = run_cli("run", job.name)
    assert missing.exit_code == 2
    assert '[api].base_url is required for provider = "openai-compatible"' in missing.output
    assert "unless --base-url or PIPELINE_BASE_URL gives the address" in missing.output
    with sim() as s:
        assert run_cli("run", job.name, "--base-url", s.base_url).exit_code == 0
        monkeypatch.setenv("PIPELINE_BASE_URL", s.base_url)
        assert run_cli("validate", job.name).exit_code == 0
        assert run_cli("run", job.name).exit_code == 0
        assert s.stats.requests == 3
