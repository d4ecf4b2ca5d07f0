"""The output writer: rows in input order whatever order they arrive in, written while the run goes."""

import random

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.keys import request_key
from pipeline.outcome import Outcome, VectorBlock
from pipeline.sink import COMPACT_ROWS, OutputPaths, PartWriter


def _writer(tmp_path, **kw):
    return PartWriter(OutputPaths(tmp_path / "out.parquet"), {"id": pl.String()}, **kw)


def _add(w, row):
    w.add(row, (f"id{row}",), Outcome(f"k{row}", "ok", content=f"answer {row}", prompt_tokens=row, attempts=1))


def test_rows_arriving_in_order_reach_the_output_file_before_the_run_ends(tmp_path):
    w = _writer(tmp_path)
    for row in range(25_000):
        _add(w, row)
    # Two row groups are in the file already (its footer comes at the end, with the rename).
    assert (tmp_path / "out.parquet.tmp").stat().st_size > 100_000
    assert not (tmp_path / "out.parquet").exists()
    assert w.finish() == 25_000
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"id{i}" for i in range(25_000)]
    assert out["content"][12_345] == "answer 12345"
    groups = pq.ParquetFile(tmp_path / "out.parquet").metadata
    assert [groups.row_group(i).num_rows for i in range(groups.num_row_groups)] == [COMPACT_ROWS] * 2 + [5_000]
    assert not (tmp_path / "out.parts").exists()


def test_rows_out_of_order_after_a_streamed_start_go_through_parts_and_come_out_in_order(tmp_path):
    w = _writer(tmp_path, part_rows=12_000)
    rest = list(range(12_000, 40_000))
    random.Random(5).shuffle(rest)
    for row in [*range(12_000), *rest]:  # 10,000 rows can be streamed; the shuffled rest cannot
        _add(w, row)
    assert (tmp_path / "out.parquet.tmp").exists()  # the in-order start went out
    assert len(list((tmp_path / "out.parts").glob("part-*.parquet"))) >= 2  # the rest waited in parts
    assert w.finish() == 40_000
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"id{i}" for i in range(40_000)]
    assert out["prompt_tokens"].to_list() == list(range(40_000))


def test_embedding_blocks_and_single_rows_interleave_in_order(tmp_path):
    w = _writer(tmp_path, vectors=True, vector_dims=4)
    rng = np.random.default_rng(1)
    order = list(range(0, 30_000, 500))
    random.Random(2).shuffle(order[5:])  # the first blocks in order, then any order
    expected = np.zeros((30_000, 4), np.float32)
    for start in order:
        rows = list(range(start, start + 500))
        single = rows.pop(7)  # one row of each request arrives alone (a duplicate's answer, say)
        vectors = rng.standard_normal((499, 4), dtype=np.float32)
        expected[rows] = vectors
        w.add_block(rows, [(f"id{r}",) for r in rows],
                    VectorBlock(keys=[request_key("embeddings", str(r).encode()) for r in rows], vectors=vectors,
                                prompt_tokens=np.full(499, 3), cost_usd=None, model="m", latency_ms=1.0, attempts=1))
        vec = rng.standard_normal(4, dtype=np.float32)
        expected[single] = vec
        w.add(single, (f"id{single}",), Outcome("k", "ok", embedding=vec.tobytes(), attempts=1), deduplicated=True)
    assert w.finish() == 30_000
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out["id"].to_list() == [f"id{i}" for i in range(30_000)]
    np.testing.assert_array_equal(out["embedding"].to_numpy(), expected)
    assert out["deduplicated"].sum() == 60


def test_no_rows_make_an_empty_table_with_the_output_columns(tmp_path):
    w = _writer(tmp_path)
    assert w.finish() == 0
    out = pl.read_parquet(tmp_path / "out.parquet")
    assert out.height == 0 and out.columns[:3] == ["id", "status", "content"]
