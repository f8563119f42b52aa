"""The AIMD limit without I/O: windows, overload and latency decreases, slow recovery, the
baseline that follows a new normal, the bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from toolpool.resilience import AdaptiveLimit
from toolpool.resilience._adaptive import (
    HTTP_429,
    HTTP_503,
    INITIAL,
    LATENCY,
    RECOVERY,
    TIMEOUT,
    AimdLimit,
)


def run_window(
    limiter: AimdLimit, start: float, latency: float | None, signal: str | None = None, n: int = 10
) -> tuple[float, int | None]:
    """Feed one window of n samples; return (end time, change reported at its close)."""
    change = None
    end = start + limiter.config.interval * 1.000001  # just past the interval: it closes
    for i in range(n):
        now = end if i == n - 1 else start + limiter.config.interval * (i + 1) / (n + 1)
        result = limiter.sample(now, latency, signal if i == n - 1 else None)
        if result is not None:
            change = result
    return end, change


def test_nothing_changes_before_a_window_closes() -> None:
    config = AdaptiveLimit(interval=1.0, min_samples=5, latency_tolerance=2.0)
    limiter = AimdLimit(config, max_limit=20, now=0.0)
    limiter.sample(0.0, 0.001)
    for i in range(100):
        assert limiter.sample(0.5 * i / 100, 1.0) is None  # slow, but the window is open
    assert (limiter.limit, limiter.reason) == (20, INITIAL)
    # A window with too few samples (and no overload signal) stays open past its interval.
    quiet = AimdLimit(AdaptiveLimit(interval=0.1, min_samples=5), max_limit=20, now=0.0)
    assert quiet.sample(0.2, 0.01) is None
    assert quiet.sample(0.3, 0.01) is None


@pytest.mark.parametrize("signal", [HTTP_503, HTTP_429, TIMEOUT])
def test_overload_signals_cut_by_a_quarter(signal: str) -> None:
    limiter = AimdLimit(AdaptiveLimit(), max_limit=20, now=0.0)
    _, change = run_window(limiter, 0.0, 0.01, signal)
    assert change == 15
    assert limiter.reason == signal
    assert limiter.decreases == 1


def test_an_overload_acts_at_once_and_its_echoes_are_ignored() -> None:
    limiter = AimdLimit(AdaptiveLimit(interval=10.0), max_limit=20, now=0.0)
    assert limiter.sample(1.0, None, HTTP_503, sent_at=0.9) == 15  # no need to wait 10 s
    # Requests sent before that decrease report the same overload: ignored.
    for _ in range(5):
        assert limiter.sample(1.01, None, HTTP_503, sent_at=0.95) is None
    assert limiter.limit == 15
    # A request sent after it says the destination is still overloaded.
    assert limiter.sample(1.2, None, TIMEOUT, sent_at=1.1) == 11
    assert (limiter.reason, limiter.decreases) == (TIMEOUT, 2)


def test_latency_is_ignored_unless_enabled() -> None:
    limiter = AimdLimit(AdaptiveLimit(), max_limit=20, now=0.0)
    t, _ = run_window(limiter, 0.0, 0.01)
    _, change = run_window(limiter, t, 1.0)  # 100x slower
    assert change is None and limiter.limit == 20


def test_rising_latency_cuts_by_a_tenth_and_never_below_min() -> None:
    config = AdaptiveLimit(latency_tolerance=2.0, min_limit=3, baseline_drift=0.01)
    limiter = AimdLimit(config, max_limit=20, now=0.0)
    t, _ = run_window(limiter, 0.0, 0.020)  # baseline 20 ms
    limits = []
    for _ in range(20):
        t, _ = run_window(limiter, t, 0.200)
        limits.append(limiter.limit)
    assert limits[:4] == [18, 16, 14, 12]
    assert min(limits) == 3
    assert limiter.reason == LATENCY


def test_small_absolute_rises_are_noise() -> None:
    config = AdaptiveLimit(latency_tolerance=2.0, min_latency_rise=0.010)
    limiter = AimdLimit(config, max_limit=20, now=0.0)
    t, _ = run_window(limiter, 0.0, 0.0005)
    _, change = run_window(limiter, t, 0.004)  # 8x, but only 3.5 ms more
    assert change is None and limiter.limit == 20


def test_recovery_is_one_step_per_window_up_to_max() -> None:
    limiter = AimdLimit(AdaptiveLimit(), max_limit=10, now=0.0)
    t, _ = run_window(limiter, 0.0, 0.01, HTTP_503)
    t, _ = run_window(limiter, t, 0.01, HTTP_503)
    assert limiter.limit == 5
    seen = []
    for _ in range(8):
        t, _ = run_window(limiter, t, 0.01)
        seen.append(limiter.limit)
    assert seen == [6, 7, 8, 9, 10, 10, 10, 10]
    assert limiter.reason == RECOVERY
    assert limiter.increases == 5


def test_a_downstream_that_stays_slow_becomes_the_new_normal() -> None:
    config = AdaptiveLimit(latency_tolerance=2.0, baseline_drift=0.1)
    limiter = AimdLimit(config, max_limit=20, now=0.0)
    t, _ = run_window(limiter, 0.0, 0.020)
    for _ in range(60):
        t, _ = run_window(limiter, t, 0.200)
    assert limiter.baseline is not None and limiter.baseline > 0.1
    assert limiter.limit == 20  # dropped, then grew back once 200 ms was normal
    assert limiter.decreases > 0
    # ...and a recovered downstream is trusted at once: the baseline follows it down.
    run_window(limiter, t, 0.020)
    assert limiter.baseline == pytest.approx(0.020)


@settings(max_examples=100, deadline=None)
@given(
    windows=st.lists(
        st.tuples(
            st.floats(min_value=0.0001, max_value=2.0),
            st.sampled_from([None, HTTP_503, HTTP_429, TIMEOUT]),
        ),
        max_size=60,
    ),
    max_limit=st.integers(min_value=1, max_value=64),
    min_limit=st.integers(min_value=1, max_value=8),
)
def test_the_limit_stays_within_bounds_and_moves_one_way_per_window(
    windows: list[tuple[float, str | None]], max_limit: int, min_limit: int
) -> None:
    config = AdaptiveLimit(latency_tolerance=2.0, min_limit=min_limit)
    limiter = AimdLimit(config, max_limit=max_limit, now=0.0)
    t = 0.0
    for latency, signal in windows:
        before = limiter.limit
        t, _ = run_window(limiter, t, latency, signal)
        after = limiter.limit
        assert min(min_limit, max_limit) <= after <= max_limit
        if signal is not None:
            assert after <= before
        if after > before:
            assert after == before + 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="latency_tolerance"):
        AdaptiveLimit(latency_tolerance=1.0)
    with pytest.raises(ValueError, match="overload_backoff"):
        AdaptiveLimit(overload_backoff=1.0)
    with pytest.raises(ValueError, match="min_limit"):
        AdaptiveLimit(min_limit=0)
