import sqlite3

from pipeline.journal import Journal, Outcome


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
