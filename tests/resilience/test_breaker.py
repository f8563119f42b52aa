"""The circuit breaker's state machine: opening rules, half-open probes, generations, backoff;
and a hypothesis state machine checking its invariants under any sequence of events."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from toolpool.resilience import CircuitBreaker
from toolpool.resilience._breaker import (
    CLOSED,
    FAILURE,
    HALF_OPEN,
    IGNORE,
    OPEN,
    SUCCESS,
    Breaker,
    Permit,
)


def call(breaker: Breaker, outcome: str, now: float) -> str | None:
    permit = breaker.allow(now)
    assert permit is not None
    return breaker.record(permit, outcome, now)


def test_consecutive_failures_open_it_and_a_success_resets_the_count() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=3, min_calls=100))
    for _ in range(2):
        assert call(breaker, FAILURE, 0.0) is None
    assert call(breaker, SUCCESS, 0.0) is None
    assert call(breaker, FAILURE, 0.0) is None
    assert call(breaker, FAILURE, 0.0) is None
    assert call(breaker, FAILURE, 0.0) == OPEN
    assert breaker.reason == "3 consecutive failures"
    assert breaker.allow(0.1) is None
    assert breaker.retry_after(1.0) == pytest.approx(4.0)


def test_failure_rate_over_enough_calls_opens_it() -> None:
    breaker = Breaker(CircuitBreaker(failure_rate=0.5, min_calls=10, consecutive_failures=99))
    outcomes = [SUCCESS, FAILURE] * 4 + [SUCCESS]  # 9 calls: too few to judge
    for outcome in outcomes:
        assert call(breaker, outcome, 1.0) is None
    assert call(breaker, FAILURE, 1.0) == OPEN  # 5 of 10 failed
    assert breaker.reason == "5 of the last 10 calls failed"


def test_failures_of_one_incident_count_once() -> None:
    # One HTTP/2 connection lost under 10 streams: one failure, for both rules.
    breaker = Breaker(CircuitBreaker(consecutive_failures=2, failure_rate=0.5, min_calls=4))
    lost = object()
    for _ in range(10):
        permit = breaker.allow(0.0)
        assert permit is not None
        assert breaker.record(permit, FAILURE, 0.0, incident=lost) is None
    assert (breaker.state, breaker.consecutive, breaker.window_counts(0.0)) == (CLOSED, 1, (0, 1))
    # A second incident is a second failure: two in a row open it.
    permit = breaker.allow(0.0)
    assert permit is not None
    assert breaker.record(permit, FAILURE, 0.0, incident=object()) == OPEN
    assert breaker.reason == "2 consecutive failures"


def test_old_outcomes_leave_the_window() -> None:
    breaker = Breaker(CircuitBreaker(failure_rate=0.75, min_calls=4, consecutive_failures=99))
    for _ in range(3):
        call(breaker, FAILURE, 0.0)
        call(breaker, SUCCESS, 0.0)
    assert breaker.window_counts(0.0) == (3, 3)
    # 10 s later the window holds none of them: one failure alone is not a rate.
    assert breaker.window_counts(10.5) == (0, 0)
    assert call(breaker, FAILURE, 10.5) is None
    assert breaker.state == CLOSED


def test_half_open_lets_one_probe_through_and_closes_on_success() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=1, open_for=2.0, probes=1))
    assert call(breaker, FAILURE, 0.0) == OPEN
    assert breaker.allow(1.9) is None
    probe = breaker.allow(2.0)
    assert probe is not None and probe.probe
    assert breaker.state == HALF_OPEN
    assert breaker.allow(2.0) is None  # one probe at a time
    assert breaker.rejecting(2.0)
    assert breaker.record(probe, SUCCESS, 2.1) == CLOSED
    assert breaker.allow(2.1) is not None
    assert breaker.transitions == {CLOSED: 1, OPEN: 1, HALF_OPEN: 1}


def test_a_failed_probe_reopens_it_for_twice_as_long_up_to_the_maximum() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=1, open_for=1.0, max_open_for=3.0))
    call(breaker, FAILURE, 0.0)
    now = 0.0
    rests = []
    for _ in range(3):
        now += breaker.open_for
        probe = breaker.allow(now)
        assert probe is not None
        assert breaker.record(probe, FAILURE, now) == OPEN
        rests.append(breaker.open_for)
    assert rests == [2.0, 3.0, 3.0]
    probe = breaker.allow(now + 3.0)
    assert probe is not None
    breaker.record(probe, SUCCESS, now + 3.0)
    assert breaker.open_for == 1.0  # closing resets the rest


def test_an_ignored_probe_frees_the_probe_slot() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=1, open_for=1.0))
    call(breaker, FAILURE, 0.0)
    probe = breaker.allow(1.0)
    assert probe is not None
    assert breaker.record(probe, IGNORE, 1.0) is None  # e.g. cancelled before it was sent
    assert breaker.state == HALF_OPEN
    assert breaker.allow(1.0) is not None


def test_stragglers_from_before_the_opening_are_ignored() -> None:
    breaker = Breaker(CircuitBreaker(consecutive_failures=2, open_for=1.0))
    early = breaker.allow(0.0)  # in flight while the breaker opens
    assert early is not None
    call(breaker, FAILURE, 0.0)
    call(breaker, FAILURE, 0.0)
    assert breaker.state == OPEN
    probe = breaker.allow(1.0)
    assert probe is not None
    # The straggler's success says nothing about now: the breaker stays half-open.
    assert breaker.record(early, SUCCESS, 1.0) is None
    assert breaker.state == HALF_OPEN
    assert breaker.record(probe, SUCCESS, 1.1) == CLOSED
    # Recording twice counts once.
    assert breaker.record(probe, FAILURE, 1.1) is None


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        CircuitBreaker(failure_rate=0)
    with pytest.raises(ValueError, match="consecutive_failures"):
        CircuitBreaker(consecutive_failures=0)
    with pytest.raises(ValueError, match="max_open_for"):
        CircuitBreaker(open_for=10, max_open_for=5)
    with pytest.raises(ValueError, match="window"):
        CircuitBreaker(window=float("inf"))


class BreakerMachine(RuleBasedStateMachine):
    """Any interleaving of calls, outcomes and time keeps the breaker's promises."""

    def __init__(self) -> None:
        super().__init__()
        self.config = CircuitBreaker(
            consecutive_failures=3, min_calls=6, failure_rate=0.5, open_for=1.0, probes=2
        )
        self.breaker = Breaker(self.config)
        self.now = 0.0
        self.permits: list[Permit] = []

    @rule(step=st.floats(min_value=0.0, max_value=1.5))
    def tick(self, step: float) -> None:
        self.now += step

    @rule()
    def ask(self) -> None:
        b = self.breaker
        before = b.state
        rest_over = before != OPEN or self.now >= b.opened_at + b.open_for
        permit = b.allow(self.now)
        if before == OPEN and not rest_over:
            assert permit is None, "a call passed while the breaker rests"
        if before == CLOSED:
            assert permit is not None and not permit.probe
        if permit is not None:
            self.permits.append(permit)

    @precondition(lambda self: self.permits)
    @rule(data=st.data(), outcome=st.sampled_from([SUCCESS, FAILURE, IGNORE]))
    def finish(self, data: st.DataObject, outcome: str) -> None:
        permit = self.permits.pop(data.draw(st.integers(0, len(self.permits) - 1)))
        b = self.breaker
        before, generation = b.state, b.generation
        change = b.record(permit, outcome, self.now)
        if permit.generation != generation:
            assert change is None and b.state == before, "a straggler moved the breaker"
        if permit.probe and before == HALF_OPEN and permit.generation == generation:
            expected = {SUCCESS: CLOSED, FAILURE: OPEN, IGNORE: None}[outcome]
            assert change == expected
        judged = outcome != IGNORE and permit.generation == generation and not permit.probe
        if b.state == CLOSED and judged:
            # Judged when a success or failure of this generation arrives: a closed breaker is
            # then below both thresholds. An ignored outcome or a straggler judges nothing, so
            # a window that crossed the rate only by ageing out older successes is judged at
            # the next real outcome (hypothesis found that case).
            ok, failed = b.window_counts(self.now)
            total = ok + failed
            assert total < self.config.min_calls or failed < self.config.failure_rate * total

    @invariant()
    def probes_are_bounded(self) -> None:
        b = self.breaker
        assert 0 <= b.probes_out <= self.config.probes
        if b.state != HALF_OPEN:
            assert b.probes_out == 0

    @invariant()
    def closed_means_fewer_consecutive_failures_than_the_threshold(self) -> None:
        b = self.breaker
        if b.state == CLOSED:
            assert b.consecutive < self.config.consecutive_failures

    @invariant()
    def open_for_stays_within_bounds(self) -> None:
        assert self.config.open_for <= self.breaker.open_for <= self.config.max_open_for


TestBreakerMachine = BreakerMachine.TestCase
TestBreakerMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)
