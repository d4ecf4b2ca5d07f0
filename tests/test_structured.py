import json

import polars as pl
import pytest

from pipeline.errors import JobError
from pipeline.job import Job
from pipeline.run import run
from pipeline.structured import AnswerChecker, check_schema, columns_of
from pipeline.tokens import ChatTokenCounter
from tests.conftest import reviews, run_cli

EVERY_TYPE = {
    "type": "object", "additionalProperties": False,
    "required": ["label", "confidence", "stars", "spam", "tags", "meta", "note"],
    "properties": {
        "label": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "spam": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "meta": {"type": "object", "additionalProperties": False, "required": ["lang", "words"],
                 "properties": {"lang": {"type": "string"}, "words": {"type": "integer"}}},
        "note": {"type": ["string", "null"]},
    },
}


def _job(make_job, schema=EVERY_TYPE, **kw):
    request = ('model = "gpt-4o-mini"\nprompt = "Label: {{ text }}"\nmax_tokens = 200\n'
               'response_schema_file = "schema.json"')
    from pathlib import Path

    Path("schema.json").write_text(json.dumps(schema))
    return make_job(request=request, **kw)


def test_strict_mode_needs_additional_properties_false():
    bad = {"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}
    with pytest.raises(JobError, match=r"^S: strict mode needs additionalProperties = false$"):
        check_schema(bad, "S")


def test_strict_mode_needs_every_property_required_and_says_where():
    bad = json.loads(json.dumps(EVERY_TYPE))
    bad["properties"]["meta"]["required"] = ["lang"]
    with pytest.raises(JobError, match=r"^S\.properties\.meta: strict mode needs every property in required; "
                                       r"missing: words$"):
        check_schema(bad, "S")


def test_invalid_json_schema_is_refused():
    with pytest.raises(JobError, match=r"^S\.properties\.a\.type is not valid JSON Schema: 'strin' is not valid"):
        check_schema({"type": "object", "additionalProperties": False, "required": ["a"],
                      "properties": {"a": {"type": "strin"}}}, "S")


def test_job_with_incompatible_schema_fails_validation_before_any_request(make_job, sim):
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    job = _job(make_job, schema=schema)
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url)
        assert s.stats.requests == 0
    assert result.exit_code == 2
    assert "schema.json: strict mode needs additionalProperties = false" in result.output


def test_inline_schema_in_toml(make_job):
    job = make_job(request='model = "m"\nprompt = "{{ text }}"\n'
                           '[request.response_schema]\ntype = "object"\nadditionalProperties = false\n'
                           'required = ["x"]\n[request.response_schema.properties.x]\ntype = "integer"\n')
    assert Job.load(job).request.chat.response_schema["properties"] == {"x": {"type": "integer"}}


def test_dtypes_for_every_json_type():
    assert columns_of(EVERY_TYPE) == {
        "label": pl.String(), "confidence": pl.Float64(), "stars": pl.Int64(), "spam": pl.Boolean(),
        "tags": pl.List(pl.String()), "meta": pl.Struct({"lang": pl.String(), "words": pl.Int64()}),
        "note": pl.String()}


def test_checker_reasons():
    c = AnswerChecker(EVERY_TYPE)
    assert c.problem('{"label": "unterminated').startswith("the answer is not valid JSON")
    assert c.problem('{"label": "great"}').startswith("the answer does not match the schema at")
    assert c.problem(None) == "the answer has no content"


def test_typed_columns_over_the_simulator(make_job, sim):
    job = _job(make_job, rows=30)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
    assert result.exit_code == 0
    out = pl.read_parquet(Job.load(job).output.path)
    for name, dtype in columns_of(EVERY_TYPE).items():
        assert out.schema[name] == dtype, name
    assert set(out["label"]) <= {"positive", "neutral", "negative"}
    assert out["stars"].is_between(1, 5).all() and out["confidence"].is_between(0, 1).all()
    assert out["meta"].struct.field("words").dtype == pl.Int64
    checker = AnswerChecker(EVERY_TYPE)
    assert all(checker.problem(c) is None for c in out["content"])


def test_invalid_json_is_retried_once_then_fails_with_the_reason(make_job, sim):
    df = reviews(6).with_columns(pl.when(pl.col("review_id") == "r0003").then(pl.lit("SIM_BAD_JSON"))
                                 .otherwise(pl.col("text")).alias("text"))
    job = _job(make_job, data=df)
    with sim() as s:
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 6 + 1  # the bad one was asked twice
    out = pl.read_parquet(Job.load(job).output.path)
    bad = out.filter(pl.col("review_id") == "r0003").row(0, named=True)
    assert bad["status"] == "error" and bad["error_type"] == "invalid_answer"
    assert bad["error"].startswith("the answer is not valid JSON")
    assert bad["label"] is None and bad["attempts"] == 2
    one = ChatTokenCounter("gpt-4o-mini").count_messages([{"role": "user", "content": "Label: SIM_BAD_JSON"}])
    assert bad["prompt_tokens"] == 2 * one  # both answers were paid for, so both count
    assert bad["cost_usd"] == pytest.approx((2 * one * 0.15 + bad["completion_tokens"] * 0.6) / 1e6)
    assert result.stats.failed == 1


def test_refusal_is_recorded_in_its_own_column(make_job, sim):
    df = reviews(3).with_columns(pl.when(pl.col("review_id") == "r0001").then(pl.lit("SIM_REFUSE"))
                                 .otherwise(pl.col("text")).alias("text"))
    job = _job(make_job, data=df)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 3  # a refusal is not retried
    out = pl.read_parquet(Job.load(job).output.path)
    row = out.filter(pl.col("review_id") == "r0001").row(0, named=True)
    assert row["refusal"] == "I'm sorry, I can't help with that request." and row["error_type"] == "refusal"


def test_report_shows_label_distribution(make_job, sim):
    job = _job(make_job, rows=40)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    rep = json.loads(run_cli("report", "out/result.parquet", "--json").output)
    assert sum(rep["distributions"]["label"].values()) == 40
    assert set(rep["distributions"]["label"]) <= {"positive", "neutral", "negative"}
