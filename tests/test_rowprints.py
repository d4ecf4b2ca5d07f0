"""Row prints: a resume recognises answered rows without rendering them, and never where it should not."""

import polars as pl

from pipeline.job import Job
from pipeline.journal import Journal
from pipeline.outcome import Outcome
from pipeline.plan import prepare
from pipeline.run import run
from tests.conftest import reviews
from tests.test_run import _count_renders

PROBE = 1  # each online run renders the input's first row once more, for the basis of the prints


def _journal(job_path) -> Journal:
    from pathlib import Path

    from pipeline.sink import OutputPaths

    return Journal(OutputPaths(Path(Job.load(job_path).output.path)).journal)


def test_a_resume_renders_only_the_rows_still_to_do(make_job, sim, monkeypatch):
    job = make_job(rows=300)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url, limit=200)
        rendered = _count_renders(monkeypatch)
        plan = prepare(Job.load(job), base_url=s.base_url)
        plan.close()
        assert plan.estimate.rows_already_done == 200 and plan.estimate.requests == 100
        assert sum(rendered) == PROBE + 100  # the 200 answered rows were known by their print
        assert plan.todo is not None and list(plan.todo) == list(range(200, 300))
        result = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 200 + 100
    assert result.stats.resumed == 200 and result.stats.ok == 300
    out = pl.read_parquet(Job.load(job).output.path)
    assert out["review_id"].to_list() == reviews(300)["review_id"].to_list()


def test_a_changed_row_is_sent_again_and_the_others_are_not(make_job, sim, tmp_path):
    job = make_job(rows=20)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        changed = reviews(20).with_columns(
            pl.when(pl.col("review_id") == "r0007").then(pl.lit("A different text.")).otherwise("text").alias("text"))
        changed.write_parquet(tmp_path / "input.parquet")
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 20 + 1
    assert again.stats.resumed == 19
    out = pl.read_parquet(Job.load(job).output.path)
    assert out.filter(pl.col("review_id") == "r0007")["content"].item() != ""


def test_another_template_or_polars_version_drops_the_prints_and_rows_are_found_by_key(make_job, sim, monkeypatch):
    job = make_job(rows=30)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        monkeypatch.setattr(pl, "__version__", "0.0.0-another")  # its row hash may differ: prints mean nothing
        rendered = _count_renders(monkeypatch)
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 30  # nothing paid twice: each row's key was found in the journal
        assert again.stats.resumed == 30 and sum(rendered) >= 30 + 30  # recognised the exact way, rendered
    text = job.read_text().replace("Review of", "A review of")
    job.write_text(text)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 30  # a new prompt is a new question for every row


def test_a_row_whose_answer_is_not_settled_is_sent_again(make_job, sim):
    job = make_job(rows=10)
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
    j = _journal(job)
    keys = [k for (k,) in j.db.execute("SELECT key FROM outcomes ORDER BY key LIMIT 2")]
    j.add(Outcome(keys[0], "error", error_type="server_error", error="500", retryable=True))
    j.add(Outcome(keys[1], "error", error_type="invalid_request", error="400", retryable=False))
    j.close()
    with sim() as s:
        again = run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 1  # the transient failure; the permanent one stays settled
        assert again.stats.resumed == 9
        third = run(Job.load(job), base_url=s.base_url, retry_failed=True)
        assert s.stats.requests == 1 + 1 and third.stats.ok == 10


def test_prints_are_not_used_for_embeddings_jobs(make_job, sim):
    job = make_job(rows=5, request='endpoint = "embeddings"\nmodel = "text-embedding-3-small"\n'
                                   'input = "{{ text }}"')
    with sim() as s:
        run(Job.load(job), base_url=s.base_url)
        run(Job.load(job), base_url=s.base_url)
        assert s.stats.requests == 1
    j = _journal(job)
    assert j.db.execute("SELECT name FROM sqlite_master WHERE name = 'row_prints'").fetchone() is None
    j.close()


def test_a_rows_print_does_not_depend_on_its_chunk(make_job, sim):
    from pipeline.plan import check
    from pipeline.rowprints import RowPrints
    from pipeline.source import iter_chunks

    job = make_job(rows=50)
    checked = check(Job.load(job))
    j = _journal(job)
    prints = RowPrints(j.db, "journal", checked.renderer, checked.source, retry_failed=False)
    whole = next(iter_chunks(checked.source, checked.renderer.columns))
    parts = list(iter_chunks(checked.source, checked.renderer.columns, chunk_rows=7))
    hi, lo = prints.of(whole)
    assert len(set(zip(hi.tolist(), lo.tolist(), strict=True))) == 50  # 50 different rows, 50 prints
    by_parts = [p for part in parts for p in zip(*(a.tolist() for a in prints.of(part)), strict=True)]
    assert by_parts == list(zip(hi.tolist(), lo.tolist(), strict=True))
    j.close()
