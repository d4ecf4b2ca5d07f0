import sqlite3

import numpy as np

from pipeline.journal import Journal
from pipeline.keys import request_key
from pipeline.outcome import Outcome, VectorBlock


def test_outcomes_round_trip_and_settled_rules(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    j.add(Outcome("a", "ok", content="x", prompt_tokens=3, cost_usd=0.5, attempts=1))
    j.add(Outcome("b", "error", error="HTTP 400", error_type="http_400"))
    j.add(Outcome("c", "error", error="HTTP 503", error_type="server_error", retryable=True))
    assert j.lookup(["a"]) == {}  # not committed yet
    j.flush()
    found = j.lookup(["a", "b", "c", "zz"])
    assert set(found) == {"a", "b"}  # a transient failure is never settled
    assert found["a"] == Outcome("a", "ok", content="x", prompt_tokens=3, cost_usd=0.5, attempts=1)
    assert set(j.lookup(["a", "b", "c"], retry_failed=True)) == {"a"}
    assert j.get("c") is not None and j.get("c").retryable is True
    assert j.count() == {"ok": 1, "error": 2}
    j.close()


def test_reader_sees_commits_from_another_connection(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    read = j.reader()
    assert read(["a"]) == {}
    j.add(Outcome("a", "ok"))
    j.flush()
    assert set(read(["a"])) == {"a"}
    j.close()


def test_many_keys_are_looked_up_in_batches(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    for i in range(5000):
        j.add(Outcome(f"k{i}", "ok"))
    j.flush()
    assert len(j.lookup([f"k{i}" for i in range(0, 10000, 2)])) == 2500
    j.close()


def test_uncommitted_answers_are_lost_but_committed_ones_survive_a_crash(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    j.add(Outcome("kept", "ok"))
    j.flush()
    j.add(Outcome("lost", "ok"))
    # no flush, no close: the process "dies" here
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert [r[0] for r in check.execute("SELECT key FROM outcomes")] == ["kept"]


# -- embeddings blocks ------------------------------------------------------------------------------------------


def _block(texts, dims=4, model="text-embedding-3-small", attempts=1):
    keys = [request_key("embeddings", t.encode()) for t in texts]
    vectors = np.arange(len(texts) * dims, dtype=np.float32).reshape(len(texts), dims) + len(texts[0])
    tokens = np.array([len(t) for t in texts], dtype=np.int64)
    return VectorBlock(keys=keys, vectors=vectors, prompt_tokens=tokens, cost_usd=tokens * 2e-8, model=model,
                       latency_ms=12.5, attempts=attempts)


def test_a_block_is_found_row_by_row_by_every_reader_and_after_reopening(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    read = j.reader()
    block = _block([f"text {i}" for i in range(5)])
    j.add_block(block)
    assert j.lookup(block.keys) == {} and read(block.keys) == {}  # nothing before the commit
    j.flush()
    for found in (j.lookup([*block.keys, "feed" * 8]), read(block.keys), Journal(path).lookup(block.keys)):
        assert set(found) == set(block.keys)
        for i, k in enumerate(block.keys):
            assert found[k] == block.outcome(i)
            assert np.frombuffer(found[k].embedding, "<f4").tolist() == block.vectors[i].tolist()
    assert j.get(block.keys[3]) == block.outcome(3)
    assert j.count() == {"ok": 5}
    read.close()
    j.close()


def test_rows_read_back_from_disk_match_the_ones_kept_in_memory(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path)
    blocks = [_block([f"b{b} text {i}" for i in range(300)], dims=8) for b in range(30)]
    for b in blocks:
        j.add_block(b)
    j.flush()
    cold = Journal(path)  # nothing in memory: the index is loaded and rows read from the stored blocks
    keys = [k for b in blocks for k in b.keys]
    assert cold.lookup(keys) == j.lookup(keys)
    assert cold.get(blocks[7].keys[299]) == blocks[7].outcome(299)
    cold.close()
    j.close()


def test_an_answer_in_a_block_wins_over_an_earlier_failure_of_the_same_key(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    block = _block(["a", "b"])
    j.add(Outcome(block.keys[0], "error", error="HTTP 400", error_type="http_400"))
    j.flush()
    j.add_block(block)
    j.flush()
    assert j.lookup([block.keys[0]])[block.keys[0]].status == "ok"
    assert j.get(block.keys[0]).status == "ok"
    j.close()


def test_a_key_sharing_the_index_prefix_of_a_stored_key_is_not_mistaken_for_it(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    block = _block(["a", "b"])
    j.add_block(block)
    j.flush()
    impostor = block.keys[1][:16] + ("0" if block.keys[1][16] != "0" else "1") + block.keys[1][17:]
    assert j.lookup([impostor]) == {} and j.get(impostor) is None
    assert Journal(tmp_path / "j.sqlite").lookup([impostor]) == {}
    j.close()


def test_keys_that_are_not_request_keys_are_kept_row_by_row(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    block = VectorBlock(keys=["x", "y"], vectors=np.ones((2, 3), np.float32), prompt_tokens=np.array([1, 2]),
                        cost_usd=None, model="m", latency_ms=1.0, attempts=1)
    j.add_block(block)
    j.flush()
    assert j.lookup(["x", "y"]) == {"x": block.outcome(0), "y": block.outcome(1)}
    j.close()


def test_a_journal_made_before_an_outcome_field_existed_gets_its_column(tmp_path):
    import sqlite3

    from pipeline.outcome import OUTCOME_FIELDS

    path = tmp_path / "old.sqlite"
    older = [c for c in OUTCOME_FIELDS if c != "refusal"]  # as if refusal were added since
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE outcomes ({', '.join(older)}, recorded_at REAL)")
    db.execute("INSERT INTO outcomes (key, status, content, attempts, retryable) VALUES ('old', 'ok', 'x', 1, 0)")
    db.commit()
    db.close()
    with Journal(path) as j:
        assert j.get("old") == Outcome("old", "ok", content="x", attempts=1)
        j.add(Outcome("new", "error", refusal="no", error="refused", error_type="refusal"))
        j.flush()
        assert j.get("new").refusal == "no"


def test_a_transaction_interrupted_by_any_exception_is_rolled_back(tmp_path):
    import pytest

    from pipeline.journal import Journal
    from pipeline.outcome import Outcome

    j = Journal(tmp_path / "j.sqlite")
    with pytest.raises(KeyboardInterrupt), j.transaction():
        j.insert([Outcome("a" * 32, "ok", content="x")])
        raise KeyboardInterrupt
    assert not j.db.in_transaction and j.get("a" * 32) is None
    with j.transaction():  # usable again at once
        j.insert([Outcome("b" * 32, "ok", content="y")])
    assert j.get("b" * 32) is not None
    j.close()
