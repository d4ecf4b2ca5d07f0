"""Partitions planned from footers, read back; committed chunks and what a task skips."""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

from pipeline.engines.commit import ChunkSink, chunk_name, committed, covered
from pipeline.engines.partitions import iter_partition, plan_partitions
from pipeline.job import load_job
from pipeline.outcome import Outcome
from pipeline.plan import check, output_writer
from pipeline.sink import OutputPaths
from pipeline.source import ROW, open_source
from tests.conftest import reviews


def test_parquet_is_cut_at_row_groups_with_rows_numbered_across_files(tmp_path: Path) -> None:
    reviews(250).write_parquet(tmp_path / "a.parquet", row_group_size=100)   # groups of 100, 100, 50
    reviews(120).write_parquet(tmp_path / "b.parquet", row_group_size=60)
    source = open_source(str(tmp_path / "*.parquet"))
    parts = plan_partitions(source, "fp", partition_rows=150)
    assert [(Path(p.file).name, p.row_start, p.rows, p.row_groups) for p in parts] == [
        ("a.parquet", 0, 200, (0, 1)), ("a.parquet", 200, 50, (2,)), ("b.parquet", 250, 120, (0, 1))]
    assert plan_partitions(source, "fp", 150) == parts                  # the same input, the same ids
    assert {p.id for p in plan_partitions(source, "other-job", 150)}.isdisjoint({p.id for p in parts})
    rows = pl.concat(list(iter_partition(source, parts[2], ["text"], chunk_rows=64)))
    assert rows.get_column(ROW).to_list() == list(range(250, 370))
    assert rows.get_column("text").to_list() == reviews(120).get_column("text").to_list()
    skipped = pl.concat(list(iter_partition(source, parts[0], ["text"], chunk_rows=64, skip=[(0, 150)])))
    assert skipped.get_column(ROW).to_list() == list(range(150, 200))


def test_a_changed_file_gets_new_partition_ids(tmp_path: Path) -> None:
    path = tmp_path / "in.parquet"
    reviews(50).write_parquet(path)
    before = plan_partitions(open_source(str(path)), "fp", 100)
    reviews(51).write_parquet(path)
    os.utime(path, ns=(1, 1))
    assert plan_partitions(open_source(str(path)), "fp", 100)[0].id != before[0].id


def test_csv_files_are_one_partition_each_numbered_as_the_local_engine_does(tmp_path: Path) -> None:
    reviews(30).write_csv(tmp_path / "a.csv")
    reviews(20).write_csv(tmp_path / "b.csv")
    source = open_source(str(tmp_path / "*.csv"))
    parts = plan_partitions(source, "fp", 10)
    assert [(p.row_start, p.rows, p.row_groups) for p in parts] == [(0, 30, None), (30, 20, None)]
    rows = pl.concat(list(iter_partition(source, parts[1], ["text"], chunk_rows=7)))
    assert rows.get_column(ROW).to_list() == list(range(30, 50))


def _sink(tmp_path: Path, make_job, *, done: list[tuple[int, int]] | None = None) -> ChunkSink:  # type: ignore[no-untyped-def]
    job = load_job(make_job(rows=10))
    frame = output_writer(check(job), OutputPaths(tmp_path / "scratch.parquet"), stage=False)
    (tmp_path / "ds").mkdir(exist_ok=True)
    return ChunkSink(frame, dataset=str(tmp_path / "ds"), partition="0123456789abcdef", row_start=100, rows=10,
                     done=done or [], commit_rows=3)


def test_rows_are_committed_in_gap_free_runs_of_commit_rows(tmp_path: Path, make_job) -> None:  # type: ignore[no-untyped-def]
    sink = _sink(tmp_path, make_job)
    ok = Outcome("key", "ok", content="fine")
    for row in (101, 102, 104):           # 100 missing: nothing can be committed yet
        sink.add(row, (f"r{row}", "lamp"), ok)
    assert committed(str(tmp_path / "ds")) == {}
    sink.add(100, ("r100", "lamp"), ok)   # 100-102 are gap-free: committed; 104 waits for 103
    assert committed(str(tmp_path / "ds")) == {"0123456789abcdef": [(100, 103)]}
    sink.add(103, ("r103", "lamp"), ok)
    sink.add(109, ("r109", "lamp"), ok)
    sink.finish()                         # at the end, every held row, one chunk per run
    found = committed(str(tmp_path / "ds"))["0123456789abcdef"]
    assert sorted(found) == [(100, 103), (103, 105), (109, 110)] and covered(found) == 6
    df = pl.read_parquet(tmp_path / "ds" / chunk_name("0123456789abcdef", 103, 105))
    assert df.get_column("review_id").to_list() == ["r103", "r104"] and "content" in df.columns
    assert not list((tmp_path / "ds").glob("*.tmp"))


def test_rows_committed_before_count_as_done_for_the_next_commit(tmp_path: Path, make_job) -> None:  # type: ignore[no-untyped-def]
    sink = _sink(tmp_path, make_job, done=[(100, 105)])
    ok = Outcome("key", "ok", content="fine")
    for row in (105, 106, 107):
        sink.add(row, (f"r{row}", "lamp"), ok)
    assert committed(str(tmp_path / "ds")) == {"0123456789abcdef": [(105, 108)]}
