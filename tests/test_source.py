import polars as pl
import pytest

from pipeline.errors import InputError
from pipeline.source import ROW, iter_chunks, open_source
from tests.conftest import reviews, run_cli


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_each_format_streams_all_rows_in_chunks(tmp_path, fmt):
    df = reviews(55)
    path = tmp_path / f"in.{fmt}"
    {"parquet": df.write_parquet, "csv": df.write_csv, "jsonl": df.write_ndjson}[fmt](path)
    src = open_source(str(path))
    assert src.format == fmt and set(src.columns) == set(df.columns)
    chunks = list(iter_chunks(src, ["text", "review_id"], chunk_rows=10))
    assert len(chunks) >= 2  # really chunked
    got = pl.concat(chunks)
    assert got.columns == [ROW, "text", "review_id"]
    assert got[ROW].to_list() == list(range(55))
    assert got["text"].to_list() == df["text"].to_list()


def test_glob_of_files_reads_all_in_order(tmp_path):
    df = reviews(30)
    (tmp_path / "parts").mkdir()
    df[:10].write_parquet(tmp_path / "parts/a.parquet")
    df[10:].write_parquet(tmp_path / "parts/b.parquet")
    src = open_source(str(tmp_path / "parts/*.parquet"))
    assert len(src.files) == 2
    got = pl.concat(iter_chunks(src, ["review_id"]))
    assert got["review_id"].to_list() == df["review_id"].to_list()


@pytest.mark.parametrize("fmt", ["parquet", "parquet-pyarrow", "csv"])
def test_positions_kept_or_dropped_and_a_limit_across_files(tmp_path, fmt, monkeypatch):
    if fmt == "parquet-pyarrow":  # the reader of large Parquet inputs, on a small one
        import pipeline.source

        monkeypatch.setattr(pipeline.source, "PYARROW_FROM_ROWS", 0)
        fmt = "parquet"
    df = reviews(40).with_columns(pl.col("rating").cast(pl.Int16))
    (tmp_path / "parts").mkdir()
    for name, part in (("a", df[:15]), ("b", df[15:])):
        getattr(part, f"write_{fmt}")(tmp_path / f"parts/{name}.{fmt}")
    src = open_source(str(tmp_path / f"parts/*.{fmt}"))
    rows = [3, 14, 15, 16, 39]

    def positions(**kw) -> list[int]:
        return pl.concat(iter_chunks(src, ["review_id", "rating"], chunk_rows=4, **kw))[ROW].to_list()

    assert positions(rows=rows) == rows
    assert positions(except_rows=rows) == [i for i in range(40) if i not in rows]
    assert positions(limit=17) == list(range(17))
    assert positions(rows=rows, limit=16) == [3, 14, 15]
    got = pl.concat(iter_chunks(src, ["review_id", "rating"], chunk_rows=4, rows=rows))
    assert got["review_id"].to_list() == [f"r{i:04d}" for i in rows]
    assert got.schema["rating"] == src.schema["rating"]  # the types the job was checked against


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="input file not found"):
        open_source(str(tmp_path / "x.parquet"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(InputError, match=r"x\*\.csv: no file matches the glob"):
        open_source(str(tmp_path / "x*.csv"))


def test_unsupported_format(tmp_path):
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(InputError, match=r"a.xlsx: unsupported input format '.xlsx'"):
        open_source(str(tmp_path / "a.xlsx"))


def test_corrupt_parquet_names_the_file(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError) as e:
        open_source(str(bad))
    assert str(e.value).startswith(f"{bad}: cannot read parquet input: ")


def test_ragged_csv_names_the_line(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("review_id,text\na,hello\nb,hi,extra\nc,bye\n")
    src = open_source(str(p))
    with pytest.raises(InputError) as e:
        list(iter_chunks(src, ["text"]))
    assert str(e.value) == f"{p}: line 3 has 3 fields but the header has 2"


def test_empty_input(tmp_path):
    p = tmp_path / "e.parquet"
    reviews(0).write_parquet(p)
    with pytest.raises(InputError, match="the input has no rows"):
        list(iter_chunks(open_source(str(p)), ["text"]))


def test_empty_csv_via_cli(make_job, tmp_path):
    job = make_job(fmt="csv", data=reviews(0))
    result = run_cli("estimate", job.name)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'input.csv'}: the input has no rows"


def test_globs_with_different_columns_are_refused(tmp_path):
    reviews(3).write_parquet(tmp_path / "a.parquet")
    reviews(3).drop("rating").write_parquet(tmp_path / "b.parquet")
    with pytest.raises(InputError, match=r"columns differ from .*a\.parquet \(\['rating'\]\)"):
        open_source(str(tmp_path / "*.parquet"))


def test_a_bad_jsonl_record_is_named_by_its_line(tmp_path):
    import pytest

    from pipeline.errors import InputError
    from pipeline.source import iter_chunks, open_source

    path = tmp_path / "in.jsonl"
    path.write_text('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": 3, "text": "c"\n{"id": 4, "text": "d"}\n')
    with pytest.raises(InputError, match=r"in\.jsonl: line 3 is not valid JSON"):
        list(iter_chunks(open_source(str(path)), ["text"]))
