"""Model-family rules: what a model refuses is refused by ``validate`` before the run, and by the simulator
(its own copy of the rules) if sent anyway; the official SDKs talk to the simulator as to the real APIs."""

import anthropic  # the official SDKs are the oracle: [dev] dependencies
import httpx
import openai
import pytest

from tests.conftest import SECRET, run_cli

OPENAI_BASE = 'model = "{model}"\nprompt = "{{{{ text }}}}"\nmax_tokens = 50\n'
CASES = [
    # (provider table, model, request lines, the one line validate prints, the body the simulator must refuse)
    ("", "o4-mini", "temperature = 0",
     "job.toml: [request].temperature is not accepted by o4-mini (o-series reasoning): remove it",
     {"temperature": 0}),
    ("", "gpt-4o-mini", 'reasoning_effort = "low"',
     "job.toml: [request].reasoning_effort is not accepted by gpt-4o-mini, which does not reason (GPT-4o): remove it",
     {"reasoning_effort": "low"}),
    ('provider = "anthropic"', "claude-sonnet-4-5", "temperature = 1.5",
     "job.toml: [request].temperature = 1.5 is outside claude-sonnet-4-5's range (Claude 4.5): use a value from 0 "
     "to 1", {"temperature": 1.5}),
    ('provider = "anthropic"', "claude-sonnet-4-5", "temperature = 0.5\ntop_p = 0.9",
     "job.toml: [request].top_p cannot be set together with temperature for claude-sonnet-4-5 (Claude 4.5): keep "
     "one of the two", {"temperature": 0.5, "top_p": 0.9}),
]


@pytest.mark.parametrize(("api", "model", "lines", "message", "sent"), CASES)
def test_validate_refuses_what_the_model_refuses_and_so_does_the_simulator(make_job, sim, api, model, lines,
                                                                          message, sent):
    job = make_job(request=OPENAI_BASE.format(model=model) + lines, input='path = "input.parquet"',
                   extra=f"[api]\n{api}" if api else "")
    result = run_cli("validate", job.name)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"
    with sim() as s:
        refused = run_cli("run", job.name, "--base-url", s.base_url, "--yes")
        assert refused.exit_code == 2 and s.stats.requests == 0
        # Sent anyway (by hand), the simulator refuses it as the provider does; --lenient lets it through.
        code, text = _send(s.base_url, api, model, sent)
    assert code == 400, text
    with sim(lenient=True) as s:
        assert _send(s.base_url, api, model, sent)[0] == 200


def _send(base_url: str, api: str, model: str, extra: dict) -> tuple[int, str]:
    if "anthropic" in api:
        body = {"model": model, "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}], **extra}
        r = httpx.post(f"{base_url.removesuffix('/v1')}/v1/messages", json=body,
                       headers={"anthropic-version": "2023-06-01", "x-api-key": "k"})
    else:
        body = {"model": model, "max_completion_tokens": 50, "messages": [{"role": "user", "content": "hi"}], **extra}
        r = httpx.post(f"{base_url}/chat/completions", json=body)
    return r.status_code, r.text


def test_a_reasoning_model_job_without_sampling_parameters_is_valid_and_runs(make_job, sim):
    job = make_job(rows=3, request=OPENAI_BASE.format(model="o4-mini") + 'reasoning_effort = "low"')
    assert run_cli("validate", job.name).exit_code == 0
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 3
    assert result.exit_code == 0, result.output


def test_max_tokens_beyond_the_models_output_cap_is_refused(make_job):
    job = make_job(request='model = "gpt-4o-mini"\nprompt = "{{ text }}"\nmax_tokens = 10_000_000')
    result = run_cli("validate", job.name)
    assert result.exit_code == 2
    assert "[request].max_tokens = 10,000,000 is above the most gpt-4o-mini can write (16,384)" in result.output


def test_an_unknown_model_is_sent_unchecked_with_a_note(make_job):
    job = make_job(request='model = "gpt-9-turbo"\nprompt = "{{ text }}"\nmax_tokens = 20\ntemperature = 0',
                   extra="[pricing]\ninput_per_mtok = 1.0\noutput_per_mtok = 2.0\n")
    result = run_cli("validate", job.name)
    assert result.exit_code == 0, result.output
    assert "model 'gpt-9-turbo' is not in the table of model families" in result.output


def test_the_simulator_refuses_what_openai_refuses_in_a_chat_body(sim):
    base = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hi."}]}
    with sim() as s:
        url = f"{s.base_url}/chat/completions"
        unknown = httpx.post(url, json={**base, "temprature": 0})
        schema = httpx.post(url, json={**base, "response_format": {"type": "json_object", "schema": {}}})
        no_json = httpx.post(url, json={**base, "response_format": {"type": "json_object"}})
        hot = httpx.post(url, json={**base, "temperature": 2.5})
        old_cap = httpx.post(url, json={**base, "model": "o3-mini", "max_tokens": 10})
        fine = httpx.post(url, json={**base, "messages": [{"role": "user", "content": "Answer in JSON."}],
                                     "response_format": {"type": "json_object"}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "temprature"
    assert schema.status_code == 400 and "response_format.schema" in schema.json()["error"]["message"]
    assert no_json.status_code == 400 and "must contain the word 'json'" in no_json.json()["error"]["message"]
    assert hot.status_code == 400 and hot.json()["error"]["param"] == "temperature"
    assert old_cap.status_code == 400 and "max_completion_tokens" in old_cap.json()["error"]["message"]
    assert fine.status_code == 200


def test_the_current_anthropic_sdk_talks_to_the_simulator(sim):
    with sim(api_key=SECRET) as s:
        client = anthropic.Anthropic(api_key=SECRET, base_url=s.base_url.removesuffix("/v1"), max_retries=0)
        raw = client.messages.with_raw_response.create(
            model="claude-sonnet-4-5", max_tokens=50, messages=[{"role": "user", "content": "Say hi."}])
        message = raw.parse()
        assert raw.headers.get("request-id") and message.usage.input_tokens > 0 and message.content
        counted = client.messages.count_tokens(model="claude-sonnet-4-5",
                                               messages=[{"role": "user", "content": "Say hi."}])
        assert counted.input_tokens > 0
        with pytest.raises(anthropic.BadRequestError):  # version 2026-10-21 has no sampling parameters
            client.messages.create(model="claude-sonnet-4-5", max_tokens=50, extra_body={"temperature": 0.5},
                                   messages=[{"role": "user", "content": "Say hi."}])
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(api_key="wrong", base_url=s.base_url.removesuffix("/v1"), max_retries=0) \
                .messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=[{"role": "user", "content": "x"}])


def test_the_openai_sdk_talks_to_the_simulator(sim):
    with sim(api_key=SECRET) as s:
        client = openai.OpenAI(api_key=SECRET, base_url=s.base_url, max_retries=0)
        chat = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hi."}],
                                              max_completion_tokens=20, temperature=0)
        assert chat.choices[0].message.content and chat.usage and chat.usage.prompt_tokens > 0
        emb = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert len(emb.data) == 2 and len(emb.data[0].embedding) == 1536
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="o4-mini", messages=[{"role": "user", "content": "x"}],
                                           temperature=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="wrong", base_url=s.base_url, max_retries=0).chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
