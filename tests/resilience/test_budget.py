"""The retry budget: retries <= ratio x calls + floor in the sliding window, and no more
refusals than that rule asks for."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolpool.resilience._budget import RetryBudget


def test_a_worked_example() -> None:
    budget = RetryBudget(ratio=0.2, floor=2, window=10.0)
    assert [budget.try_retry(0.0) for _ in range(3)] == [True, True, False]  # the floor
    for _ in range(10):
        budget.record_call(1.0)
    assert budget.available(1.0) == pytest.approx(2.0)  # 0.2 * 10 + 2 - 2
    assert [budget.try_retry(1.0) for _ in range(3)] == [True, True, False]
    # Ten seconds later every call and retry has left the window: only the floor is back.
    assert budget.available(12.0) == pytest.approx(2.0)
    assert budget.try_retry(12.0)


def test_late_readings_do_not_recycle_newer_buckets() -> None:
    budget = RetryBudget(ratio=1.0, floor=0, window=1.0, buckets=10)
    for _ in range(5):
        budget.record_call(10.05)
    budget.record_call(10.0)  # a reading from another thread that arrived late
    assert budget.available(10.05) == pytest.approx(6.0)


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="ratio"):
        RetryBudget(ratio=-0.1, floor=0, window=1.0)
    with pytest.raises(ValueError, match="floor"):
        RetryBudget(ratio=0.1, floor=-1, window=1.0)
    with pytest.raises(ValueError, match="window"):
        RetryBudget(ratio=0.1, floor=0, window=0.0)


events = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=3.0),  # time step
        st.booleans(),  # True: a call, False: a retry attempt
    ),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(
    events=events,
    ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    floor=st.integers(min_value=0, max_value=5),
)
def test_granted_retries_never_exceed_the_rule_in_the_window(
    events: list[tuple[float, bool]], ratio: float, floor: int
) -> None:
    """Replaying any sequence against a brute-force model of the window: every grant keeps
    retries <= ratio x calls + floor over the live slices, and every refusal was needed."""
    window, buckets = 10.0, 10
    width = window / buckets
    budget = RetryBudget(ratio=ratio, floor=floor, window=window, buckets=buckets)
    now = 0.0
    log: list[tuple[int, bool]] = []  # (slice, is_call) of counted events
    for step, is_call in events:
        now += step
        epoch = math.floor(now / width)
        live = [(e, c) for e, c in log if e > epoch - buckets]
        calls = sum(1 for _, c in live if c)
        retries = sum(1 for _, c in live if not c)
        if is_call:
            budget.record_call(now)
            log.append((epoch, True))
            continue
        allowed = retries + 1 <= ratio * calls + floor
        assert budget.try_retry(now) == allowed
        if allowed:
            log.append((epoch, False))


@settings(max_examples=100, deadline=None)
@given(
    calls=st.integers(min_value=0, max_value=400),
    attempts=st.integers(min_value=1, max_value=8),
    ratio=st.sampled_from([0.1, 0.2, 0.3]),
    floor=st.integers(min_value=0, max_value=10),
)
def test_requests_sent_against_a_dead_downstream_stay_within_the_budget(
    calls: int, attempts: int, ratio: float, floor: int
) -> None:
    """Every call fails and wants `attempts` attempts; within one window the requests
    sent are at most (1 + ratio) x calls + floor."""
    budget = RetryBudget(ratio=ratio, floor=floor, window=10.0)
    sent = 0
    for i in range(calls):
        now = i * 0.01  # all within 4 s, well inside the 10 s window
        budget.record_call(now)
        sent += 1
        for _ in range(attempts - 1):
            if not budget.try_retry(now):
                break
            sent += 1
    assert sent <= (1 + ratio) * calls + floor
    if attempts > 1 and calls:
        # ...and the budget is used, not just refused: all but a fraction of a retry.
        assert sent >= min(attempts * calls, (1 + ratio) * calls + floor) - 1
