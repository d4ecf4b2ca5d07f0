import asyncio

import pytest

from pipeline.errors import RowError, TransientError
from pipeline.retry import RetryPolicy


def _attempts(outcomes):
    """An attempt function that plays ``outcomes`` in turn (an exception is raised, anything else returned)."""
    calls = []

    async def attempt():
        calls.append(len(calls) + 1)
        result = outcomes[len(calls) - 1]
        if isinstance(result, BaseException):
            raise result
        return result
    return attempt, calls


def _call(policy, attempt):
    slept, retried = [], []

    async def sleep(s):
        slept.append(s)

    result = asyncio.run(policy.call(attempt, sleep, before_sleep=lambda state: retried.append(state.attempt_number)))
    return result, slept, retried


def test_a_first_try_that_succeeds_is_tried_once_and_waits_for_nothing():
    attempt, calls = _attempts(["answer"])
    result, slept, retried = _call(RetryPolicy(3), attempt)
    assert (result, calls, slept, retried) == ("answer", [1], [], [])


def test_a_failed_first_try_is_tenacitys_first_attempt_with_the_servers_wait():
    """The first try runs outside tenacity; its failure must count as attempt 1, wait what the server said
    and be seen by before_sleep, exactly as if tenacity had made it."""
    attempt, calls = _attempts([TransientError("busy", kind="server", retry_after=2.0), "answer"])
    result, slept, retried = _call(RetryPolicy(3), attempt)
    assert result == "answer" and calls == [1, 2]
    assert slept == [pytest.approx(2.05)] and retried == [1]


def test_the_stop_counts_the_first_try():
    errors = [TransientError(f"busy {i}", kind="server", retry_after=0.0) for i in range(5)]
    attempt, calls = _attempts(errors)
    with pytest.raises(TransientError, match="busy 2"):
        _call(RetryPolicy(3), attempt)
    assert calls == [1, 2, 3]


def test_one_attempt_means_no_retry_at_all():
    attempt, calls = _attempts([TransientError("busy", kind="server"), "never asked"])
    with pytest.raises(TransientError):
        _call(RetryPolicy(1), attempt)
    assert calls == [1]


def test_an_error_that_is_not_transient_is_not_retried():
    attempt, calls = _attempts([RowError("bad row", kind="bad_request"), "never asked"])
    with pytest.raises(RowError):
        _call(RetryPolicy(3), attempt)
    assert calls == [1]
