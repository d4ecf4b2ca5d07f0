import json

import polars as pl
import pytest

from pipeline.errors import InputError, TemplateError
from pipeline.job import Job
from pipeline.render import Renderer
from pipeline.source import iter_chunks, open_source
from tests.conftest import reviews, run_cli


def _render(job_path):
    job = Job.load(job_path)
    src = open_source(job.input.path)
    r = Renderer(job, src)
    return r, [req for c in iter_chunks(src, r.columns) for req in r.render_chunk(c).requests]


def test_body_is_the_chat_request(make_job):
    _, reqs = _render(make_job(rows=3))
    body = json.loads(reqs[0].body)
    assert body == {"model": "gpt-4o-mini", "max_completion_tokens": 50, "messages": [
        {"role": "system", "content": "Summarise in one sentence."},
        {"role": "user", "content": "Review of lamp: Review number 0: the product was poor and arrived on day 0."}]}
    assert [q.row_id for q in reqs] == ["r0000", "r0001", "r0002"]
    assert reqs[0].keep == ("lamp",)


def test_missing_column_lists_missing_and_available(make_job, tmp_path):
    job = make_job(request='model = "gpt-4o-mini"\nprompt = "{{ title }} {{ text }} {{ body }}"')
    result = run_cli("validate", job.name)
    assert result.exit_code == 2
    assert result.output.strip() == ("error: job.toml: [request].prompt: template uses column(s) the input lacks: "
                                     "body, title (available: review_id, product, rating, text)")


def test_missing_keep_and_id_columns(make_job):
    with pytest.raises(InputError, match=r"\[input\]\.keep names column\(s\) the input lacks: colour"):
        _render(make_job(input='path = "input.parquet"\nkeep = ["colour"]'))
    with pytest.raises(InputError, match=r"\[input\]\.id names column\(s\) the input lacks: key"):
        _render(make_job(input='path = "input.parquet"\nid = "key"'))


def test_syntax_error_names_template_and_line(make_job):
    result = run_cli("validate", make_job(request='model = "m"\nprompt = "ok\\n{{ text "').name)
    assert result.exit_code == 2
    assert result.output.startswith("error: job.toml: [request].prompt: template syntax error on line 2:")


def test_null_renders_as_empty_string(make_job):
    df = reviews(3).with_columns(pl.when(pl.col("rating") == 2).then(None).otherwise(pl.col("product"))
                                 .alias("product"))
    _, reqs = _render(make_job(data=df))
    assert json.loads(reqs[1].body)["messages"][1]["content"].startswith("Review of : ")


def test_skip_nulls_skips_and_counts(make_job):
    df = reviews(6).with_columns(pl.when(pl.col("rating") == 2).then(None).otherwise(pl.col("text")).alias("text"))
    job = Job.load(make_job(data=df, input='path = "input.parquet"\nid = "review_id"\nskip_nulls = true'))
    src = open_source(job.input.path)
    r = Renderer(job, src)
    chunk = r.render_chunk(next(iter_chunks(src, r.columns)))
    assert [s.row_id for s in chunk.skipped] == ["r0001"]
    assert chunk.skipped[0].reason == "skipped: null in column(s) text"
    assert len(chunk.requests) == 5


def test_strict_undefined_attribute_names_row(make_job):
    with pytest.raises(TemplateError, match=r"\[request\]\.prompt: row r0000: 'str object' has no attribute 'x'"):
        _render(make_job(request='model = "m"\nprompt = "{{ text.x }}"'))


def test_sandbox_blocks_python_internals(make_job):
    with pytest.raises(TemplateError, match="row r0000"):
        _render(make_job(request='model = "m"\nprompt = "{{ text.__class__.__mro__ }}"'))


def test_a_constant_template_touching_python_internals_is_one_clean_error(make_job):
    # No variables: rendered once while the job is checked, where the sandbox's refusal used to escape.
    result = run_cli("validate", make_job(request='model = "m"\nprompt = "{{ \'\'.__class__.__mro__ }}"').name)
    assert result.exit_code == 2
    assert result.output.startswith("error: job.toml: [request].prompt: not allowed in a template:")
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_validate_refuses_a_kept_column_named_like_a_result_column_as_run_does(make_job, sim):
    df = reviews(3).with_columns(status=pl.lit("new"))
    job = make_job(data=df, input='path = "input.parquet"\nid = "review_id"\nkeep = ["status"]')
    checked = run_cli("validate", job.name)
    assert checked.exit_code == 2
    assert "[input].keep column(s) status clash with result columns" in checked.output
    with sim() as s:
        ran = run_cli("run", job.name, "--base-url", s.base_url, "--yes")
    assert ran.exit_code == 2 and ran.output.endswith(checked.output)  # after the one line saying what runs


def test_row_mapping_reaches_odd_column_names(make_job):
    df = reviews(2).rename({"text": "review text"})
    _, reqs = _render(make_job(data=df, request='model = "m"\nprompt = "{{ row[\'review text\'] }}"'))
    assert json.loads(reqs[0].body)["messages"][0]["content"].startswith("Review number 0")


def test_few_shot_messages_and_options(make_job):
    request = '''model = "gpt-4o-mini"
system = "Label it."
messages = [{role = "user", content = "great!"}, {role = "assistant", content = "positive"}]
prompt = "{{ text }}"
max_tokens = 5
temperature = 0.2
seed = 7
stop = ["\\n"]'''
    _, reqs = _render(make_job(rows=1, request=request))
    body = json.loads(reqs[0].body)
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]
    assert body["temperature"] == 0.2 and body["seed"] == 7 and body["stop"] == ["\n"]


def test_key_depends_on_exact_body(make_job):
    _, a = _render(make_job(rows=2))
    _, b = _render(make_job(rows=2, request='model = "gpt-4o-mini"\nsystem = "Summarise in one sentence."\n'
                                            'prompt = "Review of {{ product }}: {{ text }}"\nmax_tokens = 51'))
    assert a[0].key != a[1].key
    assert a[0].key != b[0].key
    _, again = _render(make_job(rows=2))
    assert [q.key for q in again] == [q.key for q in a]


def test_validate_shows_first_requests(make_job):
    result = run_cli("validate", make_job().name)
    assert result.exit_code == 0, result.output
    assert result.output.count('"max_completion_tokens": 50') == 3
    assert "row r0002" in result.output and "row r0003" not in result.output


def test_plain_templates_render_in_polars_exactly_as_jinja_would(make_job, tmp_path):
    from pipeline.render import _Part

    df = pl.DataFrame({
        "review_id": ["a", "b", "c", "d"],
        "product": ["lamp", None, "ünïcödé 👍", "{{ not a template }}"],
        "rating": [5, None, -3, 10**12],
        "text": ["line one\nline two\n", "", "tab\there", "{% raw %} and }} {{"],
    })
    (tmp_path / "p.j2").write_text("Product: {{ product }} ({{ rating }} stars)\n\n{{ text }}\n")
    job = Job.load(make_job(data=df, request='model = "gpt-4o-mini"\nsystem = "S {{ product }}"\n'
                                            'prompt_file = "p.j2"'))
    src = open_source(job.input.path)
    fast = Renderer(job, src)
    assert all(p.pieces is not None for p in fast.parts if p.template is not None)
    slow = Renderer(job, src)
    slow.parts = [_Part(p.role, p.source, p.template, p.text, None) for p in slow.parts]
    chunk = next(iter_chunks(src, fast.columns))
    a, b = fast.render_chunk(chunk).requests, slow.render_chunk(chunk).requests
    assert [r.body for r in a] == [r.body for r in b]
    assert [r.prompt_tokens for r in a] == [r.prompt_tokens for r in b]


def test_embeddings_inputs_made_without_jinja_have_the_same_bodies_and_keys(make_job, tmp_path):
    from pipeline.keys import request_key
    from pipeline.render import _Part

    df = pl.DataFrame({"review_id": ["a", "b", "c"], "product": ["lamp", None, 'quote " and \\ ünï 👍'],
                       "text": ["line\none", "", "{{ x }}"]})
    job = Job.load(make_job(data=df, request='endpoint = "embeddings"\nmodel = "text-embedding-3-small"\n'
                                             'input = "{{ product }}: {{ text }}"\ndimensions = 8'))
    src = open_source(job.input.path)
    fast, slow = Renderer(job, src), Renderer(job, src)
    slow.parts = [_Part(p.role, p.source, p.template, p.text, None) for p in slow.parts]
    chunk = next(iter_chunks(src, fast.columns))
    a, b = fast.render_chunk(chunk).requests, slow.render_chunk(chunk).requests
    assert [r.body for r in a] == [r.body for r in b]
    assert [r.key for r in a] == [r.key for r in b] == [request_key("embeddings", r.body) for r in b]
    assert [r.prompt_tokens for r in a] == [r.prompt_tokens for r in b]
    assert json.loads(a[2].body)["input"] == 'quote " and \\ ünï 👍: {{ x }}'


def test_templates_that_do_more_than_substitute_use_jinja(make_job):
    job = Job.load(make_job(request='model = "m"\nprompt = "{{ text | upper }} {% if rating > 3 %}!{% endif %}"'))
    r = Renderer(job, open_source(job.input.path))
    assert all(p.pieces is None for p in r.parts)


def test_token_counts_from_the_estimate_pass_are_reused_not_recounted(make_job, monkeypatch):
    from array import array

    from pipeline.endpoints import price_for
    from pipeline.planning import PassOptions, planning_pass

    job = Job.load(make_job(rows=30))
    src = open_source(job.input.path)
    r = Renderer(job, src)
    counted: array[int] = array("i")
    planning_pass(job, src, r, price_for(job), PassOptions(counted=counted))
    fresh = [q.prompt_tokens for c in iter_chunks(src, r.columns, chunk_rows=7) for q in r.render_chunk(c).requests]
    assert list(counted) == fresh and all(fresh)

    def no_counting(texts):
        assert not texts, "rows with a count from the estimate pass were tokenized again"
        return []

    monkeypatch.setattr(r.counter, "count_texts", no_counting)
    reused = [q.prompt_tokens for c in iter_chunks(src, r.columns, chunk_rows=7)
              for q in r.render_chunk(c, counted=counted).requests]
    assert reused == fresh


SCHEMA = ('[request.response_schema]\ntype = "object"\nadditionalProperties = false\nrequired = ["label"]\n'
          '[request.response_schema.properties.label]\ntype = "string"\n')


@pytest.mark.parametrize(("api", "request_extra"), [
    ("", ""),
    ('base_url = "http://localhost:8080/v1"\nstructured_output = "json_object"', SCHEMA),  # the schema in system
    ('provider = "anthropic"', ""),  # system and developer messages joined into the top-level system
    ('provider = "anthropic"', SCHEMA),
    ('provider = "azure"\nbase_url = "https://r.openai.azure.com/openai/v1"\ndeployment = "d"', ""),
])
def test_framed_bodies_are_the_body_builders_bytes_for_every_dialect(make_job, api, request_extra):
    """The frame (the body cut around its templated texts) must give the builder's exact bytes: keys hash them."""
    from pipeline.render import _Part

    df = pl.DataFrame({
        "review_id": ["a", "b", "c", "d", "e"],
        "product": ["lamp", None, 'quote " back \\ slash', "\x00\x1f\x7f\u2028 ctl", "ünïcödé 👍"],
        "text": ["line one\nline two\n", "", "\t", '{"json": [1]}', "</script> & <b>"],
    })
    model = "claude-haiku-4-5" if "anthropic" in api else "gpt-4o-mini"
    request = (f'model = "{model}"\nsystem = "About {{{{ product }}}}."\nmax_tokens = 20\n'
               'prompt = "{{ text }}"\n'
               '[[request.messages]]\nrole = "developer"\ncontent = "Be brief about {{ product }}: {{ text }}"\n'
               '[[request.messages]]\nrole = "assistant"\ncontent = "OK."\n' + request_extra)
    job = Job.load(make_job(data=df, request=request, extra=f"[api]\n{api}"))
    src = open_source(job.input.path)
    framed = Renderer(job, src)
    assert framed._body_frame is not None
    builder = Renderer(job, src)
    builder.parts = [_Part(p.role, p.source, p.template, p.text, None) for p in builder.parts]
    chunk = next(iter_chunks(src, framed.columns))
    a, b = framed.render_chunk(chunk).requests, builder.render_chunk(chunk).requests
    assert [r.body for r in a] == [r.body for r in b]
    assert [(r.key, r.prompt_tokens) for r in a] == [(r.key, r.prompt_tokens) for r in b]


def test_a_body_builder_that_changes_a_text_gets_no_frame(make_job):
    """A builder that does more than place a text (here: strips it) cannot be framed, and is not."""
    job = Job.load(make_job(rows=3))
    src = open_source(job.input.path)
    r = Renderer(job, src)
    chat = r.codec.chat
    r.codec.chat = lambda messages, images=(): chat([{**m, "content": m["content"].upper()} for m in messages])
    assert r.builder.frame([(p.role, None if p.template is not None else p.text) for p in r.parts]) is None


def test_row_subscripts_name_exactly_the_columns_read_so_skip_nulls_skips_only_those(make_job):
    import polars as pl

    from pipeline.job import Job
    from pipeline.render import Renderer
    from pipeline.source import iter_chunks, open_source

    df = pl.DataFrame({"id": ["a", "b", "c"], "product name": ["lamp", None, "tent"],
                       "text": ["ok", "fine", "good"], "unused": [None, None, "x"]})
    job = Job.load(make_job(data=df, input='path = "input.parquet"\nid = "id"\nskip_nulls = true',
                            request='model = "gpt-4o-mini"\nprompt = "{{ row[\\"product name\\"] }}: {{ text }}"\n'
                                    "max_tokens = 20"))
    source = open_source(job.input.path)
    renderer = Renderer(job, source)
    assert set(renderer.template_columns) == {"product name", "text"}
    chunk = renderer.render_chunk(next(iter_chunks(source, renderer.columns)))
    assert [s.row_id for s in chunk.skipped] == ["b"] and len(chunk.requests) == 2
    assert "product name" in chunk.skipped[0].reason and "unused" not in chunk.skipped[0].reason
