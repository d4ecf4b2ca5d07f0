"""The SQL door: ``SELECT id, llm(text) FROM t`` in DuckDB through the same engine and journal as ``map``."""

import duckdb
import polars as pl

import pipeline
import pipeline.sql


def test_a_duckdb_query_answers_every_row_once_as_map_does_and_a_rerun_sends_nothing(sim, tmp_path):
    n, distinct = 5000, 4000  # more than two of DuckDB's 2,048-row vectors; 1,000 repeated questions
    with sim() as s:
        con = duckdb.connect()
        pipeline.sql.register(con, model="gpt-4o-mini", prompt="Summarise: {{ text }}", max_tokens=30,
                              base_url=s.base_url, workdir=tmp_path / "sql")
        con.execute(f"CREATE TABLE reviews AS SELECT i AS id, 'review number ' || (i % {distinct})::VARCHAR AS text "
                    f"FROM range({n}) r(i)")
        rows = con.execute("SELECT id, llm(text) AS summary FROM reviews ORDER BY id").fetchall()
        assert s.stats.requests == distinct  # each distinct question once, across the vectors
        again = con.execute("SELECT id, llm(text) AS summary FROM reviews ORDER BY id").fetchall()
        assert s.stats.requests == distinct  # the journal answered the second query
        frame = pl.DataFrame({"text": [f"review number {i % distinct}" for i in range(n)]})
        mapped = pipeline.map(frame, model="gpt-4o-mini", prompt="Summarise: {{ text }}", max_tokens=30,
                              base_url=s.base_url, workdir=tmp_path / "map")
    assert [r[0] for r in rows] == list(range(n)) and again == rows
    assert [r[1] for r in rows] == mapped["content"].to_list()  # the answers the local engine gives


def test_map_query_answers_a_whole_query_as_one_map_and_gives_a_relation(sim, tmp_path):
    n = 3000
    with sim() as s:
        con = duckdb.connect()
        con.execute(f"CREATE TABLE reviews AS SELECT i AS id, 'review number ' || i::VARCHAR AS text, i % 3 AS shop "
                    f"FROM range({n}) r(i)")
        rel = pipeline.sql.map_query(  # noqa: F841 (the SQL below reads it by its name)
            con, "SELECT id, text FROM reviews WHERE shop = 1", model="gpt-4o-mini", prompt="Summarise: {{ text }}",
            max_tokens=30, base_url=s.base_url, workdir=tmp_path)
        rows = con.sql("SELECT id, content, status FROM rel ORDER BY id").fetchall()
        assert s.stats.requests == n // 3
    assert [r[0] for r in rows] == list(range(1, n, 3)) and all(r[2] == "ok" and r[1] for r in rows)
