"""The progress line: the ETA follows the recent rate, not the whole run's."""

from dataclasses import dataclass

from pipeline.progress import RecentRate, summary_line


@dataclass
class Stats:  # the fields of RunStats the display reads
    elapsed_s: float = 0.0
    rows_done: int = 0
    rows_total: int = 1000
    requests_sent: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    failed: int = 0
    retries: int = 0
    rate_limited: int = 0
    in_flight: int = 0


def test_the_eta_follows_the_last_seconds_rate():
    rate, s = RecentRate(), Stats()
    # a slow first minute (1 row/s), then 10 rows/s: the ETA is the fast rate's, not the average's
    for t in range(0, 61):
        s.elapsed_s, s.rows_done = float(t), t
        rate.eta_s(s)
    eta = None
    for t in range(61, 81):
        s.elapsed_s, s.rows_done = float(t), 60 + (t - 60) * 10
        eta = rate.eta_s(s)
    assert eta is not None and abs(eta - (1000 - 260) / 10) < 1
    line = summary_line(s, eta)  # type: ignore[arg-type]
    assert "rows 260/1,000 (26%) | elapsed 1:20 | ETA 1:14" in line


def test_no_eta_before_a_rate_or_after_the_end():
    rate, s = RecentRate(), Stats(rows_done=0)
    assert rate.eta_s(s) is None  # type: ignore[arg-type]
    s.elapsed_s, s.rows_done = 5.0, 1000
    assert rate.eta_s(s) is None  # type: ignore[arg-type]
