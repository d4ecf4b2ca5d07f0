from pathlib import Path

import pytest

from pipeline.errors import JobError
from pipeline.job import Job
from tests.conftest import run_cli


def _bad(job: Path, expected: str) -> None:
    if job.is_absolute():
        job = job.relative_to(Path.cwd())  # users type relative paths, and the message echoes theirs
    result = run_cli("validate", job)
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: {expected}"
    assert "Traceback" not in result.output


def test_valid_job_loads_with_defaults_and_resolves_paths_against_job_folder(make_job, tmp_path):
    job = Job.load(make_job())
    assert job.name == "t"
    assert job.input.path == str(tmp_path / "input.parquet")
    assert job.output.path == str(tmp_path / "out/result.parquet")
    assert job.input.keep == ("product",)
    assert job.limits.concurrency == 64 and job.limits.max_attempts == 6
    assert job.api.api_key_env == "OPENAI_API_KEY"
    assert job.request.max_tokens == 50


def test_relative_paths_do_not_depend_on_working_directory(make_job, tmp_path, monkeypatch):
    job_path = make_job()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Job.load(job_path).input.path == str(tmp_path / "input.parquet")


def test_wrong_type_names_file_and_key(make_job):
    _bad(make_job(limits='requests_per_minute = "fast"'),
         'job.toml: [limits].requests_per_minute must be a positive integer, got "fast"')


def test_negative_number(make_job):
    _bad(make_job(limits="concurrency = -3"), "job.toml: [limits].concurrency must be a positive integer, got -3")


def test_unknown_key(make_job):
    _bad(make_job(limits="concurency = 3"), "job.toml: [limits].concurency is not a known key; did you mean "
                                            "'concurrency'?")
    _bad(make_job(limits="parallelism = 3"),
         "job.toml: [limits].parallelism is not a known key (known keys: concurrency, input_tokens_per_minute, "
         "max_attempts, output_tokens_per_minute, requests_per_minute, timeout_s, tokens_per_minute)")


def test_unknown_top_level_table(make_job):
    _bad(make_job(extra="[retries]\nx = 1"),
         "job.toml: retries is not a known key (known keys: api, batch, budget, engine, estimate, input, limits, name, "
         "output, pricing, request, storage)")


def test_missing_required_key(make_job):
    _bad(make_job(request='prompt = "{{ text }}"'), "job.toml: [request].model is required")


def test_missing_required_table(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('name = "x"\n[input]\npath = "a.csv"\n[output]\npath = "o.parquet"\n')
    _bad(p, "job.toml: [request] is required")


def test_conflicting_prompt_and_prompt_file(make_job):
    _bad(make_job(request='model = "gpt-4o-mini"\nprompt = "x"\nprompt_file = "p.j2"'),
         "job.toml: [request].prompt_file conflicts with [request].prompt: give one of them")


def test_prompt_file_missing(make_job, tmp_path):
    _bad(make_job(request='model = "gpt-4o-mini"\nprompt_file = "prompts/p.j2"'),
         f"job.toml: [request].prompt_file file not found: {tmp_path / 'prompts/p.j2'}")


def test_prompt_file_is_read_relative_to_job(make_job, tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/p.j2").write_text("About {{ product }}: {{ text }}")
    job = Job.load(make_job(request='model = "gpt-4o-mini"\nprompt_file = "prompts/p.j2"'))
    assert job.request.prompt == "About {{ product }}: {{ text }}"


def test_bad_input_path(make_job, tmp_path):
    _bad(make_job(input='path = "nope.parquet"'), f"{tmp_path / 'nope.parquet'}: input file not found")


def test_bad_output_suffix(make_job):
    _bad(make_job(output='path = "out.csv"'), 'job.toml: [output].path must end in .parquet, got "out.csv"')


def test_invalid_toml(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('name = "x"\n[input\n')
    result = run_cli("validate", "job.toml")
    assert result.exit_code == 2
    assert result.output.startswith("error: job.toml: invalid TOML: Expected ']'")


def test_missing_job_file():
    _bad(Path("nope.toml"), "nope.toml: job file not found")


def test_temperature_range(make_job):
    _bad(make_job(request='model = "m"\nprompt = "x"\ntemperature = 3'),
         "job.toml: [request].temperature must be a number >= 0 and <= 2, got 3")


def test_messages_role_checked(make_job):
    _bad(make_job(request='model = "m"\nprompt = "x"\nmessages = [{role = "bot", content = "hi"}]'),
         'job.toml: [request].messages[0].role must be one of system, developer, user, assistant, got "bot"')


def test_unknown_endpoint_is_refused_clearly(make_job):
    _bad(make_job(request='endpoint = "responses"\nmodel = "m"\nprompt = "x"'),
         'job.toml: [request].endpoint must be one of chat, embeddings, images, transcriptions, got "responses"')


def test_pricing_needs_both_prices(make_job):
    _bad(make_job(extra="[pricing]\ninput_per_mtok = 1.0"),
         "job.toml: [pricing].output_per_mtok is required when the other price is given")


def test_expected_output_cannot_exceed_max_tokens(make_job):
    _bad(make_job(extra="[estimate]\noutput_tokens = 500"),
         "job.toml: [estimate].output_tokens (500) cannot exceed [request].max_tokens (50)")


def test_api_base_url_scheme(make_job):
    _bad(make_job(extra='[api]\nbase_url = "ftp://x"'),
         'job.toml: [api].base_url must start with http:// or https://, got "ftp://x"')


def test_library_raises_job_error(make_job):
    with pytest.raises(JobError, match=r"\[limits\]\.timeout_s must be a number > 0"):
        Job.load(make_job(limits="timeout_s = 0"))


def _engine_job(tmp_path: Path, extra: str, output: str = "out/x.parquet", input_path: str = "in.csv") -> Path:
    p = tmp_path / "job.toml"
    p.write_text(f'name = "e"\n[input]\npath = "{input_path}"\n[request]\nmodel = "gpt-4o-mini"\n'
                 f'prompt = "{{{{ a }}}}"\n[output]\npath = "{output}"\n{extra}')
    return p


def test_engine_and_storage_tables_are_validated_with_their_key_named(tmp_path: Path) -> None:
    job = Job.load(_engine_job(tmp_path, '[engine]\nkind = "ray"\nworkers = 8\npartition_rows = 1000\n'
                                         '[storage]\nendpoint_url = "http://127.0.0.1:9000"\n'))
    assert (job.engine.kind, job.engine.workers, job.engine.partition_rows) == ("ray", 8, 1000)
    assert job.storage.endpoint_url == "http://127.0.0.1:9000"
    with pytest.raises(JobError, match=r"job.toml: \[engine\].kind must be one of local, ray, got \"spark\""):
        Job.load(_engine_job(tmp_path, '[engine]\nkind = "spark"\n'))
    with pytest.raises(JobError, match=r"\[engine\].workers must be a positive integer"):
        Job.load(_engine_job(tmp_path, '[engine]\nworkers = 0\n'))
    with pytest.raises(JobError, match=r"\[storage\].bucket is not a known key"):
        Job.load(_engine_job(tmp_path, '[storage]\nbucket = "b"\n'))


def test_object_storage_paths_stay_urls_and_the_output_is_staged_beside_the_job(tmp_path: Path) -> None:
    job = Job.load(_engine_job(tmp_path, "", output="s3://bucket/out/x.parquet", input_path="s3://bucket/in/*.csv"))
    assert job.input.path == "s3://bucket/in/*.csv" and job.output.path == "s3://bucket/out/x.parquet"
    assert job.output.local == str(tmp_path / ".pipeline" / "s3" / "bucket" / "out" / "x.parquet")


def test_a_base_url_with_a_port_out_of_range_is_refused_by_validate(make_job):
    job = make_job(extra='[api]\nbase_url = "http://127.0.0.1:99999/v1"')
    _bad(job, 'job.toml: [api].base_url is not a valid URL (Port out of range 0-65535), got '
              '"http://127.0.0.1:99999/v1"')


def test_a_budget_on_a_model_without_a_price_is_refused_before_anything_is_sent(make_job, sim):
    request = 'model = "house-model-7"\nprompt = "{{ text }}"\nmax_tokens = 20'
    job = make_job(request=request, extra='[api]\nprovider = "openai-compatible"\nbase_url = "http://127.0.0.1:1/v1"'
                                          '\n\n[budget]\nmax_cost_usd = 0.000001')
    expected = ("job.toml: [budget].max_cost_usd is set, but no price is known for model 'house-model-7', so the "
                "budget could not be kept; add a [pricing] table (input_per_mtok and output_per_mtok) or remove "
                "[budget]")
    _bad(job, expected)
    with sim() as s:
        result = run_cli("run", job.name, "--base-url", s.base_url, "--yes")
        assert s.stats.requests == 0
    assert result.exit_code == 2 and expected in result.output


def test_without_a_price_the_run_says_cost_unknown_not_zero(make_job, sim):
    request = 'model = "house-model-7"\nprompt = "{{ text }}"\nmax_tokens = 20'
    job = make_job(rows=3, request=request, extra='[api]\nprovider = "openai-compatible"\n'
                                                  'base_url = "http://127.0.0.1:1/v1"')
    with sim(models=["house-model-7"]) as s:
        result = run_cli("run", job.name, "--base-url", s.base_url)
    assert result.exit_code == 0, result.output
    assert "cost unknown: no price for 'house-model-7'" in result.output and "$0.0000 spent" not in result.output


def test_an_output_path_that_is_the_input_file_is_refused_by_validate(make_job):
    job = make_job(output='path = "input.parquet"')
    _bad(job, f"job.toml: [output].path '{job.parent / 'input.parquet'}' is the input file itself; the run would "
              "replace its own input with its results: choose another [output].path")


def test_validate_warns_on_duplicate_or_null_ids_and_repeated_csv_header_names(make_job, tmp_path):
    import polars as pl

    make_job(rows=5)  # the job file; its CSV input is written below with a repeated header
    (tmp_path / "input.csv").write_text("review_id,text,text\nr1,a,b\nr1,c,d\n,e,f\n")
    job = tmp_path / "job.toml"
    job.write_text(job.read_text().replace('path = "input.parquet"', 'path = "input.csv"')
                   .replace('keep = ["product"]', "").replace("Review of {{ product }}: ", ""))
    result = run_cli("validate", "job.toml")
    assert result.exit_code == 0, result.output
    assert "the header repeats column name(s) 'text'" in result.output
    assert "1 row(s) have a null [input].id ('review_id')" in result.output
    assert "[input].id ('review_id') repeats: 2 ids, 1 distinct" in result.output
    assert pl.read_csv(tmp_path / "input.csv").height == 3


def test_a_misspelled_key_is_named_with_the_key_it_resembles(make_job):
    job = make_job(request='model = "gpt-4o-mini"\npromt = "{{ text }}"\nmax_tokens = 20')
    _bad(job, "job.toml: [request].promt is not a known key; did you mean 'prompt'?")
    job = make_job(request='model = "gpt-4o-mini"\nprompt = "{{ text }}"\nmax_token = 20')
    _bad(job, "job.toml: [request].max_token is not a known key; did you mean 'max_tokens'?")


def test_a_misspelled_model_is_warned_with_the_nearest_known_ones(make_job):
    job = make_job(request='model = "gpt-4o-mnii"\nprompt = "{{ text }}"\nmax_tokens = 20')
    result = run_cli("validate", job.name)
    assert result.exit_code == 0
    assert "no price known for model 'gpt-4o-mnii' (did you mean 'gpt-4o-mini'" in result.output


def test_init_writes_a_job_that_validates_for_a_table_with_odd_column_names(tmp_path):
    import polars as pl

    pl.DataFrame({"ticket_id": ["t1", "t2"], "customer name": ["Ann", "Bo"], "body": ["It broke", "Thanks"],
                  "n": [1, 2]}).write_csv(tmp_path / "tickets.csv")
    made = run_cli("init", "tickets.csv")
    assert made.exit_code == 0, made.output
    text = (tmp_path / "tickets.toml").read_text()
    assert 'id = "ticket_id"' in text and "{{ row['customer name'] }}" in text and "{{ body }}" in text
    assert "#   n (Int64): 1" in text
    checked = run_cli("validate", "tickets.toml")
    assert checked.exit_code == 0, checked.output
    again = run_cli("init", "tickets.csv")
    assert again.exit_code == 2 and "exists" in again.output
