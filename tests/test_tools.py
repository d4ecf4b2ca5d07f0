import orjson
import polars as pl
import pytest

from pipeline.errors import JobError
from pipeline.job import Job
from pipeline.plan import check
from pipeline.run import run
from pipeline.source import read_head
from pipeline.tools import TOOL_CALL, ToolChecker, tool_columns
from tests.conftest import reviews, run_cli

REFUND = '''
[[request.tools]]
name = "refund"
description = "Refund an order the customer wants their money back for."
strict = true
[request.tools.parameters]
type = "object"
additionalProperties = false
required = ["order_id", "amount"]
[request.tools.parameters.properties.order_id]
type = "string"
[request.tools.parameters.properties.amount]
type = "number"
'''
ESCALATE = '''
[[request.tools]]
name = "escalate"
description = "Escalate to a human team."
[request.tools.parameters]
type = "object"
additionalProperties = false
required = ["team", "urgent"]
[request.tools.parameters.properties.team]
type = "string"
enum = ["security", "billing"]
[request.tools.parameters.properties.urgent]
type = "boolean"
'''


def _request(tools: str, choice: str | None = '"required"', model: str = "gpt-4o-mini") -> str:
    head = f'model = "{model}"\nprompt = "Ticket: {{{{ text }}}}"\nmax_tokens = 100\n'
    return head + (f"tool_choice = {choice}\n" if choice else "") + tools


def _body(job: Job) -> dict:
    checked = check(job)
    head = read_head(checked.source, checked.renderer.columns, 1)
    return orjson.loads(checked.renderer.render_chunk(head).requests[0].body)


def test_openai_body_has_the_tools_and_the_choice(make_job):
    body = _body(Job.load(make_job(request=_request(REFUND + ESCALATE, '"escalate"'))))
    assert body["tools"][0] == {"type": "function", "function": {
        "name": "refund", "description": "Refund an order the customer wants their money back for.",
        "parameters": {"type": "object", "additionalProperties": False, "required": ["order_id", "amount"],
                       "properties": {"order_id": {"type": "string"}, "amount": {"type": "number"}}},
        "strict": True}}
    assert "strict" not in body["tools"][1]["function"]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "escalate"}}
    assert _body(Job.load(make_job(request=_request(REFUND))))["tool_choice"] == "required"


def test_anthropic_body_has_the_tools_and_the_choice(make_job):
    extra = '[api]\nprovider = "anthropic"'
    body = _body(Job.load(make_job(request=_request(REFUND + ESCALATE, '"required"', "claude-sonnet-4-5"),
                                   extra=extra)))
    assert body["tools"][1] == {"name": "escalate", "description": "Escalate to a human team.", "input_schema": {
        "type": "object", "additionalProperties": False, "required": ["team", "urgent"],
        "properties": {"team": {"type": "string", "enum": ["security", "billing"]}, "urgent": {"type": "boolean"}}}}
    assert body["tool_choice"] == {"type": "any"}
    body = _body(Job.load(make_job(request=_request(REFUND, '"refund"', "claude-sonnet-4-5"), extra=extra)))
    assert body["tool_choice"] == {"type": "tool", "name": "refund"}


def test_columns_one_tool_unprefixed_several_prefixed():
    from pipeline.spec import ToolSpec

    refund = ToolSpec("refund", None, {"type": "object", "properties": {"order_id": {"type": "string"},
                                                                         "amount": {"type": "number"}}})
    route = ToolSpec("route", None, {"type": "object", "properties": {"team": {"type": "string"}}})
    assert tool_columns([refund]) == {"tool_name": pl.String(), "order_id": pl.String(), "amount": pl.Float64(),
                                      "tool_calls": pl.List(TOOL_CALL)}
    assert list(tool_columns([refund, route])) == ["tool_name", "refund_order_id", "refund_amount", "route_team",
                                                   "tool_calls"]


def test_checker_reasons():
    from pipeline.spec import ToolSpec

    t = ToolSpec("refund", None, {"type": "object", "properties": {"amount": {"type": "number"}},
                                  "required": ["amount"]})
    c = ToolChecker([t], "required")
    call = lambda name, args: orjson.dumps([{"id": "1", "name": name, "arguments": args}]).decode()  # noqa: E731
    assert c.problem(None, call("refund", '{"amount": 3.5}')) is None
    assert c.problem("just text", None) == "the model called no tool (tool_choice = 'required')"
    assert ToolChecker([t], "auto").problem("just text", None) is None
    assert c.problem(None, call("delete_everything", "{}")).startswith("the model called 'delete_everything', "
                                                                        "which is not one of the job's tools")
    assert c.problem(None, call("refund", '{"amount": ')).startswith("the arguments of 'refund' are not valid JSON")
    assert c.problem(None, call("refund", '{"amount": "lots"}')) == \
        "the arguments of 'refund' do not match its parameters at amount: 'lots' is not of type 'number'"
    assert c.values(None, call("refund", '{"amount": 3.5}')) == [
        "refund", 3.5, [{"id": "1", "name": "refund", "arguments": '{"amount": 3.5}'}]]
    assert c.values(None, None) == [None, None, None]


def test_one_tool_gives_typed_columns_over_the_simulator(make_job, sim):
    job = Job.load(make_job(rows=12, request=_request(REFUND)))
    with sim() as s:
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 12
    assert result.exit_code == 0
    out = pl.read_parquet(job.output.path)
    assert out.schema["order_id"] == pl.String and out.schema["amount"] == pl.Float64
    assert out.schema["tool_calls"] == pl.List(TOOL_CALL)
    assert out["tool_name"].to_list() == ["refund"] * 12
    assert out["amount"].is_not_null().all() and out["content"].is_null().all()
    calls = out["tool_calls"][0].to_list()
    assert len(calls) == 1 and calls[0]["name"] == "refund"
    assert orjson.loads(calls[0]["arguments"])["amount"] == out["amount"][0]
    assert (out["finish_reason"] == "tool_calls").all()


def test_two_tools_route_and_fill_their_own_columns(make_job, sim):
    df = reviews(10).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("please escalate to a human team"))
        .otherwise(pl.lit("refund my order, I want my money back")).alias("text"))
    job = Job.load(make_job(data=df, request=_request(REFUND + ESCALATE)))
    with sim() as s:
        run(job, base_url=s.base_url)
    out = pl.read_parquet(job.output.path).sort("review_id")
    assert out["tool_name"].to_list() == ["escalate", "refund"] * 5
    escalated = out.filter(pl.col("tool_name") == "escalate")
    assert escalated["escalate_team"].is_in(["security", "billing"]).all()
    assert escalated["escalate_urgent"].dtype == pl.Boolean and escalated["escalate_urgent"].is_not_null().all()
    assert escalated["refund_amount"].is_null().all()  # the other tool's columns stay empty
    refunded = out.filter(pl.col("tool_name") == "refund")
    assert refunded["refund_amount"].is_not_null().all() and refunded["escalate_team"].is_null().all()


def test_invalid_arguments_are_retried_once_then_fail_the_row(make_job, sim):
    df = reviews(4).with_columns(pl.when(pl.col("review_id") == "r0002").then(pl.lit("SIM_BAD_TOOL_ARGS"))
                                 .otherwise(pl.col("text")).alias("text"))
    job = Job.load(make_job(data=df, request=_request(REFUND)))
    with sim() as s:
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 4 + 1
    bad = pl.read_parquet(job.output.path).filter(pl.col("review_id") == "r0002").row(0, named=True)
    assert bad["status"] == "error" and bad["error_type"] == "invalid_answer" and bad["attempts"] == 2
    assert bad["error"].startswith("the arguments of 'refund' are not valid JSON")
    assert bad["amount"] is None
    assert result.stats.failed == 1


def test_no_call_under_auto_is_an_answer_and_under_required_a_failure(make_job, sim):
    df = reviews(2).with_columns(pl.lit("SIM_NO_TOOL just chatting").alias("text"))
    job = Job.load(make_job(data=df, request=_request(REFUND, '"auto"')))
    with sim() as s:
        assert run(job, base_url=s.base_url).exit_code == 0
    out = pl.read_parquet(job.output.path)
    assert out["tool_name"].is_null().all() and out["content"].is_not_null().all()
    assert out["tool_calls"].is_null().all()


def test_anthropic_two_tools_online_and_batch(make_job, sim):
    df = reviews(6).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("please escalate to a human team"))
        .otherwise(pl.lit("refund my order, I want my money back")).alias("text"))
    with sim() as s:
        extra = f'[api]\nprovider = "anthropic"\nbase_url = "{s.base_url}"\n[batch]\npoll_interval_s = 0.05'
        request = _request(REFUND + ESCALATE, '"required"', "claude-sonnet-4-5")
        job = Job.load(make_job(data=df, request=request, extra=extra))
        assert run(job).exit_code == 0
        online = pl.read_parquet(job.output.path).sort("review_id")
        job = Job.load(make_job(data=df, request=request, extra=extra, output='path = "out/batch.parquet"'))
        assert run(job, mode="batch").exit_code == 0
        batch = pl.read_parquet(job.output.path).sort("review_id")
    assert online["tool_name"].to_list() == ["escalate", "refund"] * 3
    assert online["tool_calls"][0].to_list()[0]["id"].startswith("toolu_")
    cols = ["review_id", "tool_name", "refund_amount", "escalate_team", "escalate_urgent"]
    assert batch.select(cols).equals(online.select(cols))


def test_openai_batch_mode_gives_the_same_tool_columns(make_job, sim):
    with sim() as s:
        job = Job.load(make_job(rows=6, request=_request(REFUND), extra="[batch]\npoll_interval_s = 0.05"))
        run(job, base_url=s.base_url)
        online = pl.read_parquet(job.output.path).sort("review_id")
        job = Job.load(make_job(rows=6, request=_request(REFUND), extra="[batch]\npoll_interval_s = 0.05",
                                output='path = "out/batch.parquet"'))
        assert run(job, base_url=s.base_url, mode="batch").exit_code == 0
        batch = pl.read_parquet(job.output.path).sort("review_id")
    assert batch.select("review_id", "tool_name", "order_id", "amount").equals(
        online.select("review_id", "tool_name", "order_id", "amount"))


def test_resume_of_a_tool_job_sends_nothing_again(make_job, sim):
    job = Job.load(make_job(rows=5, request=_request(REFUND)))
    with sim() as s:
        run(job, base_url=s.base_url)
        first = pl.read_parquet(job.output.path)
        result = run(job, base_url=s.base_url)
        assert s.stats.requests == 5
    assert result.stats.resumed == 5
    assert pl.read_parquet(job.output.path).select("tool_name", "amount", "tool_calls").equals(
        first.select("tool_name", "amount", "tool_calls"))


def test_job_errors_for_tools(make_job):
    def bad(request: str) -> str:
        with pytest.raises(JobError) as e:
            Job.load(make_job(request=request))
        return str(e.value)

    base = 'model = "gpt-4o-mini"\nprompt = "x"\n'
    assert "[request].tools[0].name must be 1-64 letters, digits, _ or -" in bad(
        base + '[[request.tools]]\nname = "no spaces"\n')
    assert 'repeats the tool name "refund"' in bad(base + REFUND + REFUND)
    assert "[request].tool_choice must be auto, required or a tool's name (refund)" in bad(
        base + 'tool_choice = "cancel"\n' + REFUND)
    assert "[request].tool_choice needs [[request.tools]]" in bad(base + 'tool_choice = "auto"\n')
    assert "[request].tools[0].parameters: strict mode needs additionalProperties = false" in bad(
        base + '[[request.tools]]\nname = "t"\nstrict = true\n[request.tools.parameters]\ntype = "object"\n'
               '[request.tools.parameters.properties.a]\ntype = "string"\n')
    assert "[request].tools conflicts with [request].response_schema" in bad(
        base + '[request.response_schema]\ntype = "object"\nadditionalProperties = false\nrequired = []\n'
               '[request.response_schema.properties]\n' + REFUND)
    assert "[request].tools[0].colour is not a known key" in bad(base + '[[request.tools]]\nname = "t"\ncolour = 1\n')


def test_argument_column_clashing_with_an_output_column_is_refused(make_job):
    tool = ('[[request.tools]]\nname = "t"\n[request.tools.parameters]\ntype = "object"\n'
            '[request.tools.parameters.properties.status]\ntype = "string"\n')
    result = run_cli("validate", make_job(request='model = "gpt-4o-mini"\nprompt = "x"\n' + tool))
    assert result.exit_code == 2
    assert "argument column(s) status would clash with output columns" in result.output
