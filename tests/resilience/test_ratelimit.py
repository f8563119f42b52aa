"""Rate limits without I/O: the GCRA bucket's promise (at most burst + rate x L starts in any
interval L), refusals beyond max_wait that cost nothing, per-tenant buckets, Retry-After
pauses."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolpool.resilience import RateLimit
from toolpool.resilience._ratelimit import RateLimiter, TokenBucket


def test_burst_then_steady_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3)
    delays = [bucket.reserve(0.0, max_wait=10.0) for _ in range(6)]
    assert delays == pytest.approx([0.0, 0.0, 0.0, 0.1, 0.2, 0.3])
    # After a quiet second the burst is available again.
    assert bucket.reserve(2.0, max_wait=0.0) == 0.0


def test_a_refused_reservation_costs_nothing() -> None:
    bucket = TokenBucket(rate=1, burst=1)
    assert bucket.reserve(0.0, max_wait=0.0) == 0.0
    before = bucket.tat
    assert bucket.reserve(0.0, max_wait=0.5) is None  # would need 1 s
    assert bucket.tat == before
    assert bucket.reserve(0.0, max_wait=1.0) == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([1.0, 5.0, 20.0, 100.0]),
    burst=st.integers(min_value=1, max_value=10),
    max_wait=st.sampled_from([0.0, 0.05, 0.5, 2.0]),
    used=st.integers(min_value=0, max_value=30),
    later=st.floats(min_value=0.0, max_value=1.0),
)
def test_room_is_exactly_the_reservations_that_fit(
    rate: float, burst: int, max_wait: float, used: int, later: float
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    for _ in range(used):
        bucket.reserve(0.0, max_wait=1e9)
    room = bucket.room(later, max_wait)
    granted = 0
    while bucket.reserve(later, max_wait) is not None:
        granted += 1
    assert granted == room


@settings(max_examples=200, deadline=None)
@given(
    rate=st.sampled_from([1.0, 5.0, 20.0, 100.0]),
    burst=st.integers(min_value=1, max_value=10),
    max_wait=st.sampled_from([0.0, 0.05, 0.5, 2.0]),
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=1, max_size=200),
)
def test_starts_never_exceed_the_rate_in_any_interval(
    rate: float, burst: int, max_wait: float, gaps: list[float]
) -> None:
    bucket = TokenBucket(rate=rate, burst=burst)
    now = 0.0
    starts: list[float] = []
    for gap in gaps:
        now += gap
        delay = bucket.reserve(now, max_wait)
        if delay is None:
            # Refused only when the start would really be later than max_wait.
            assert bucket.delay(now) > max_wait
            continue
        assert 0.0 <= delay <= max_wait + 1e-9
        starts.append(now + delay)
    assert starts == sorted(starts)
    for i, first in enumerate(starts):
        for j in range(i, len(starts)):
            length = starts[j] - first
            assert j - i + 1 <= burst + length * rate + 1e-6


def test_destination_limiter_waits_then_refuses_beyond_max_wait() -> None:
    limiter = RateLimiter(RateLimit(rate=10, burst=2), max_wait=0.25, max_pause=30.0)
    waits = [limiter.reserve("acme", 0.0) for _ in range(5)]
    assert waits[:4] == pytest.approx([0.0, 0.0, 0.1, 0.2])
    assert waits[4] is None  # 0.3 s > max_wait
    assert limiter.retry_after("acme", 0.0) == pytest.approx(0.3)
    assert limiter.reserve("other-tenant", 0.0) is None  # one bucket for the destination
    assert limiter.room(0.0) == 0
    assert limiter.room_in(0.0) == pytest.approx(0.05)
    fresh = RateLimiter(RateLimit(rate=10, burst=2), max_wait=0.25, max_pause=30.0)
    assert fresh.room(0.0) == 2 + math.floor(10 * 0.25)  # the burst plus 0.25 s worth


def test_per_tenant_buckets_are_independent() -> None:
    limiter = RateLimiter(RateLimit(rate=1, burst=1, per_tenant=True), max_wait=0.0, max_pause=1)
    assert limiter.reserve("acme", 0.0) == 0.0
    assert limiter.reserve("acme", 0.0) is None
    assert limiter.reserve("globex", 0.0) == 0.0
    assert limiter.reserve(None, 0.0) == 0.0  # the shared identity is one more "tenant"
    assert limiter.room(0.0) is None  # no destination-wide bucket to admit against


def test_pauses_from_retry_after() -> None:
    limiter = RateLimiter(None, max_wait=5.0, max_pause=30.0)
    assert limiter.reserve("acme", 0.0) == 0.0  # no limit configured
    limiter.pause("acme", 2.0, now=0.0, whole=False)  # a 429 for acme
    assert limiter.reserve("acme", 0.5) == pytest.approx(1.5)
    assert limiter.reserve("globex", 0.5) == 0.0
    limiter.pause(None, 8.0, now=1.0, whole=True)  # a 503: everyone
    assert limiter.reserve("globex", 1.0) is None  # 8 s > max_wait
    assert limiter.retry_after("globex", 1.0) == pytest.approx(8.0)
    assert limiter.reserve("globex", 5.0) == pytest.approx(4.0)
    # A bogus Retry-After is bounded by max_pause.
    end = limiter.pause(None, 86_400.0, now=10.0, whole=True)
    assert end == pytest.approx(40.0)


def test_pause_and_bucket_combine() -> None:
    limiter = RateLimiter(RateLimit(rate=10, burst=1), max_wait=5.0, max_pause=30.0)
    limiter.pause(None, 1.0, now=0.0, whole=True)
    assert limiter.reserve(None, 0.0) == pytest.approx(1.0)
    assert limiter.reserve(None, 0.0) == pytest.approx(1.1)  # next slot after the pause


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimit(rate=0)
    with pytest.raises(ValueError, match="burst"):
        RateLimit(rate=1, burst=0)
    assert RateLimit(rate=0.5).effective_burst == 1
    assert RateLimit(rate=40).effective_burst == 40
