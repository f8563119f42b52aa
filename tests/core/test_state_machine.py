"""The pool's rules, checked by hypothesis against random sequences of events.

The state machine (`toolpool._state`) is driven the way the drivers drive it: requests of
random keys acquire, open, release (reusable or not), cancel and time out; closes complete;
idle connections die; time passes; the adaptive cap moves. After every step the invariants
hold: cap, queue bound, affinity, per-key FIFO, bounded bypass of the queue head, and no
lost waiter.
"""

from __future__ import annotations

from typing import Any

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    precondition,
    rule,
)

from toolpool import _state
from toolpool._state import Close, DestinationState, Limits, Slot, Waiter, Wake

IDENTITIES = ["A", "B", "C", ""]
DRIVERS = ["loop1", "threads"]
KEYS = st.tuples(st.sampled_from(IDENTITIES), st.sampled_from(DRIVERS))


class PoolRules(RuleBasedStateMachine):
    permits = Bundle("permits")
    leases = Bundle("leases")
    waiters = Bundle("waiters")

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.state: DestinationState | None = None
        self.closing: list[Slot] = []
        self.bound_identity: dict[int, str] = {}
        self.arrivals: dict[tuple[str | None, Any], list[Waiter]] = {}
        self.granted: list[Slot] = []

    @rule(
        max_connections=st.integers(1, 5),
        queue_factor=st.sampled_from([0.0, 1.0, 2.0]),
        bypass=st.sampled_from([None, 0, 2]),
        stream_permits=st.booleans(),
    )
    @precondition(lambda self: self.state is None)
    def setup(
        self, max_connections: int, queue_factor: float, bypass: int | None, stream_permits: bool
    ) -> None:
        self.state = DestinationState(
            Limits(
                max_connections=max_connections,
                queue_limit=int(queue_factor * max_connections),
                idle_ttl=10.0,
                max_lifetime=100.0,
                max_bypass=bypass,
            ),
            rng=lambda: 0.5,
        )
        if stream_permits:  # an HTTP/2 destination: slots are stream permits
            assert self.state.use_stream_permits() == []

    # ------------------------------------------------------------------ helpers

    def _apply(self, actions: list[Any]) -> None:
        assert self.state is not None
        for action in actions:
            if isinstance(action, Close):
                assert action.slot.state == _state.CLOSING
                self.closing.append(action.slot)
            else:
                assert isinstance(action, Wake)
                self._granted(action.waiter)

    def _granted(self, waiter: Waiter) -> None:
        assert waiter.state == _state.GRANTED
        slot = waiter.grant
        assert slot is not None
        # Per-key FIFO: nobody of the same key who arrived earlier is still waiting.
        earlier = self.arrivals[waiter.key]
        index = next(i for i, w in enumerate(earlier) if w is waiter)
        assert all(w.state != _state.WAITING for w in earlier[:index]), "per-key FIFO broken"
        del earlier[index]
        assert slot.key == waiter.key
        self.granted.append(slot)

    def _bind(self, slot: Slot) -> None:
        identity = slot.key[0]
        assert identity is not None, "a leased connection must be bound"
        first = self.bound_identity.setdefault(slot.id, identity)
        assert first == identity, f"affinity broken: slot {slot.id} carried {first} then {identity}"

    # ------------------------------------------------------------------ rules

    @precondition(lambda self: self.state is not None)
    @rule(target=waiters, key=KEYS, counted=st.booleans())
    def acquire(self, key: tuple[str, str], counted: bool) -> Any:
        assert self.state is not None
        self.now += 0.01
        got = self.state.acquire(key, self.now, None, counted)
        if counted:
            assert got is not None, "a request of a counted call was refused"
        if isinstance(got, Waiter):
            self.arrivals.setdefault(key, []).append(got)
            self._apply(self.state.take_actions())
            return got
        if isinstance(got, Slot):
            self.granted.append(got)
        return None

    @precondition(lambda self: self.state is not None and self.granted)
    @rule(index=st.integers(0, 100), outcome=st.sampled_from(["opens", "fails", "abandoned"]))
    def take_grant(self, index: int, outcome: str) -> None:
        """A request that got a slot (directly or by waking) uses it: a permit is opened
        (or fails to open, or is abandoned after TCP connected and closes gracefully), a
        lease carries the request."""
        assert self.state is not None
        slot = self.granted.pop(index % len(self.granted))
        if slot.state == _state.OPENING:
            if outcome == "opens":
                self.state.opened(slot, object(), self.now)
                self._bind(slot)
                self.leased.append(slot)
            elif outcome == "fails":
                self._apply(self.state.open_failed(slot, self.now))
            else:
                self._apply(self.state.abandon(slot, self.now))
                self.closing.append(slot)
        else:
            assert slot.state == _state.IN_USE
            self._bind(slot)
            self.leased.append(slot)

    leased: list[Slot]

    @precondition(lambda self: self.state is not None and self.leased)
    @rule(index=st.integers(0, 100), reusable=st.booleans(), hold=st.floats(0, 3))
    def release(self, index: int, reusable: bool, hold: float) -> None:
        assert self.state is not None
        slot = self.leased.pop(index % len(self.leased))
        self.now += hold
        self._apply(self.state.release(slot, self.now, reusable))

    @precondition(lambda self: self.state is not None and self.leased)
    @rule(index=st.integers(0, 100))
    def response_is_an_event_stream(self, index: int) -> None:
        """The leased connection's response is an event stream: long-lived from now on."""
        assert self.state is not None
        slot = self.leased[index % len(self.leased)]
        self._apply(self.state.stream(slot, self.now))
        assert slot.long_lived == _state.EVENT_STREAM

    @precondition(lambda self: self.state is not None and self.leased)
    @rule(index=st.integers(0, 100))
    def replace_dead(self, index: int) -> None:
        """The leased connection was dead: the same request gets a permit instead."""
        assert self.state is not None
        slot = self.leased[index % len(self.leased)]
        if slot.long_lived == _state.EVENT_STREAM:
            return  # a stream's response head arrived: its connection was not dead
        self.leased.remove(slot)
        permit = self.state.replace(slot, self.now)
        assert permit.state == _state.OPENING and permit.key == slot.key
        self.granted.append(permit)

    @precondition(lambda self: self.state is not None and self.leased)
    @rule(
        index=st.integers(0, 100),
        reused=st.booleans(),
        retried=st.booleans(),
        replayable=st.booleans(),
    )
    def fails_before_the_response(
        self, index: int, reused: bool, retried: bool, replayable: bool
    ) -> None:
        """The leased connection failed before any response byte: the state machine either
        gives the same request a permit to retry on, or closes the slot."""
        assert self.state is not None
        slot = self.leased[index % len(self.leased)]
        if slot.long_lived == _state.EVENT_STREAM:
            return  # a stream's response head arrived: it did not fail before it
        self.leased.remove(slot)
        got = self.state.unanswered(slot, self.now, reused, retried, replayable)
        if _state.retry_stale(reused, retried, replayable):
            assert isinstance(got, Slot), "a retry gets a permit"
            assert got.state == _state.OPENING and got.key == slot.key
            assert slot.state == _state.CLOSED
            self.granted.append(got)
        else:
            assert isinstance(got, list), "no retry: the slot is closed"
            assert [a.slot for a in got if isinstance(a, Close)] == [slot]
            self._apply(got)

    @precondition(lambda self: self.state is not None)
    @rule(waiter=consumes(waiters), timed_out=st.booleans())
    def cancel(self, waiter: Waiter | None, timed_out: bool) -> None:
        assert self.state is not None
        if waiter is None:
            return
        was_granted = waiter.state == _state.GRANTED
        if was_granted:
            # The grant was delivered but the task was cancelled before using it.
            slot = waiter.grant
            if slot in self.granted:
                self.granted.remove(slot)
            else:
                return  # already taken by take_grant
        self._apply(self.state.cancel(waiter, self.now, timed_out))

    @precondition(lambda self: self.closing)
    @rule(index=st.integers(0, 100))
    def close_completes(self, index: int) -> None:
        assert self.state is not None
        slot = self.closing.pop(index % len(self.closing))
        self._apply(self.state.closed(slot, self.now))

    @precondition(lambda self: self.state is not None and self.state.idle)
    @rule(index=st.integers(0, 100))
    def idle_connection_dies(self, index: int) -> None:
        assert self.state is not None
        idle = self.state.idle_slots()
        self._apply(self.state.discard(idle[index % len(idle)], self.now))

    @precondition(lambda self: self.state is not None)
    @rule(seconds=st.floats(0, 30))
    def time_passes(self, seconds: float) -> None:
        assert self.state is not None
        self.now += seconds
        self._apply(self.state.expire(self.now))

    @precondition(lambda self: self.state is not None)
    @rule(cap=st.integers(1, 5))
    def adaptive_cap(self, cap: int) -> None:
        assert self.state is not None
        self._apply(self.state.set_cap(cap, self.now))

    @precondition(lambda self: self.state is not None)
    @rule(factor=st.integers(1, 4))
    def reuse_factor_changes(self, factor: int) -> None:
        assert self.state is not None
        self._apply(self.state.set_reuse_factor(factor))

    @precondition(lambda self: self.state is not None and self.state.stream_permits)
    @rule()
    def server_picks_http11(self) -> None:
        # An HTTP/2-offering destination whose server picked http/1.1: slots are connections.
        assert self.state is not None
        self._apply(self.state.use_stream_permits(False))

    @precondition(lambda self: self.state is not None)
    @rule(driver=st.sampled_from(DRIVERS), count=st.integers(0, 3), opens=st.booleans())
    def warm_up(self, driver: str, count: int, opens: bool) -> None:
        assert self.state is not None
        for slot in self.state.warm((None, driver), count, self.now):
            if opens:
                self._apply(self.state.warmed(slot, object(), self.now))
            else:
                self._apply(self.state.open_failed(slot, self.now))

    # ------------------------------------------------------------------ invariants

    @invariant()
    def rules_hold(self) -> None:
        if self.state is None:
            return
        self.state.check()
        head = self.state._peek_head()
        if head is not None:
            assert head.bypassed <= self.state.limits.bypass_limit, "head starved"
        for slot in self.state.idle_slots():
            if slot.key[0] is not None:
                assert self.bound_identity.get(slot.id, slot.key[0]) == slot.key[0]

    @invariant()
    def no_lost_waiter(self) -> None:
        """Someone waits only while something in flight will free or hand over a slot."""
        st_ = self.state
        if st_ is None or not st_.waiting:
            return
        assert st_.in_use + st_.opening + st_.closing > 0, "waiters with nothing in flight"


PoolRules.leased = []


def _fresh_leased(self: PoolRules) -> None:
    self.leased = []


_original_init = PoolRules.__init__


def _init(self: PoolRules) -> None:
    _original_init(self)
    _fresh_leased(self)


PoolRules.__init__ = _init  # type: ignore[method-assign]

TestPoolRules = PoolRules.TestCase
TestPoolRules.settings = settings(max_examples=700, stateful_step_count=80, deadline=None)


# ---------------------------------------------------------------------- worked examples


def _limits(cap: int, queue: int, bypass: int | None = None) -> Limits:
    return Limits(
        max_connections=cap,
        queue_limit=queue,
        idle_ttl=10.0,
        max_lifetime=100.0,
        max_bypass=bypass,
    )


def _open(state: DestinationState, key: tuple[str, str], now: float = 0.0) -> Slot:
    slot = state.acquire(key, now)
    assert isinstance(slot, Slot) and slot.state == _state.OPENING
    state.opened(slot, object(), now)
    return slot


def test_released_connection_goes_to_its_key_then_the_starved_head_gets_capacity() -> None:
    a, b, c = ("A", "loop"), ("B", "loop"), ("C", "loop")
    state = DestinationState(_limits(cap=4, queue=10, bypass=1))
    # B and C hold two connections each: their fair share of 4 among three tenants.
    conn_b, other_b = _open(state, b), _open(state, b)
    _open(state, c), _open(state, c)
    head = state.acquire(a, 1.0)  # A has no connection at all: it is needy
    b1 = state.acquire(b, 1.1)
    b2 = state.acquire(b, 1.2)
    assert isinstance(head, Waiter) and isinstance(b1, Waiter) and isinstance(b2, Waiter)
    assert state.needed == 1
    # B's connection comes back: B1 takes it although A waits longer (one bypass allowed).
    (wake,) = state.release(conn_b, 2.0, reusable=True)
    assert isinstance(wake, Wake) and wake.waiter is b1 and b1.grant is conn_b
    assert head.bypassed == 1
    # Again: the head has been passed over enough, so the connection is closed instead...
    (close,) = state.release(conn_b, 3.0, reusable=True)
    assert isinstance(close, Close) and close.reason == _state.AFFINITY
    assert b2.state == _state.WAITING
    # ...and when the close completes, the capacity goes to the head as a permit.
    (wake,) = state.closed(conn_b, 3.1)
    assert wake.waiter is head and head.grant is not None
    assert head.grant.state == _state.OPENING and head.grant.key == a
    assert other_b.state == _state.IN_USE
    state.check()


def test_a_tenant_over_its_share_gives_a_returning_connection_to_a_starved_one() -> None:
    """Tenants in turn: B's burst holds every connection and A waits with none; B's next
    returning connection is closed for A at once (B is over its share), although B has
    waiters of its own and A has not been passed over yet."""
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=10))
    conn_b, other_b = _open(state, b), _open(state, b)
    b1 = state.acquire(b, 1.0)
    head = state.acquire(a, 1.1)
    assert isinstance(head, Waiter) and isinstance(b1, Waiter)
    (close,) = state.release(conn_b, 2.0, reusable=True)
    assert isinstance(close, Close) and close.reason == _state.AFFINITY
    (wake,) = state.closed(conn_b, 2.1)
    assert wake.waiter is head and head.grant is not None and head.grant.key == a
    # Now each holds its share (1 of 2): B's connection goes to B's own waiter.
    (wake,) = state.release(other_b, 2.2, reusable=True)
    assert wake.waiter is b1
    state.check()


def test_freed_capacity_goes_to_the_needy_tenant_with_fewest_connections() -> None:
    a, b, c = ("A", "loop"), ("B", "loop"), ("C", "loop")
    state = DestinationState(_limits(cap=3, queue=10))
    held_b = _open(state, b)
    _open(state, b)
    _open(state, c)
    b1 = state.acquire(b, 1.0)  # older, but B already has connections in flight
    b2 = state.acquire(b, 1.05)
    b3 = state.acquire(b, 1.06)
    b4 = state.acquire(b, 1.07)
    b5 = state.acquire(b, 1.08)
    a1 = state.acquire(a, 1.1)
    assert all(isinstance(w, Waiter) for w in (b1, b2, b3, b4, b5, a1))
    assert state._need.get(b) and state._need.get(a)
    (close,) = [x for x in state.release(held_b, 2.0, reusable=False) if isinstance(x, Close)]
    (wake,) = state.closed(close.slot, 2.1)
    assert wake.waiter is a1  # A has none in flight: its turn comes first
    state.check()


def test_a_covered_waiter_waits_for_its_own_connection() -> None:
    """A waiter whose tenant has a connection in flight is served by it, so an idle
    connection of another tenant is not closed for it (no needless churn)."""
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=4))
    idle_a, busy_b = _open(state, a), _open(state, b)
    state.release(idle_a, 1.0, reusable=True)
    waiter = state.acquire(b, 1.5)
    assert isinstance(waiter, Waiter)
    assert state.take_actions() == []  # B's own connection will serve it
    assert state.needed == 0 and idle_a.state == _state.IDLE
    (wake,) = state.release(busy_b, 2.0, reusable=True)
    assert wake.waiter is waiter and waiter.grant is busy_b
    # Three B waiters for one B connection: B becomes needy, and A's idle one makes room.
    for t in (2.1, 2.2, 2.3):
        state.acquire(b, t)
    assert state.needed == 1
    (close,) = state.take_actions()
    assert close.slot is idle_a and close.reason == _state.AFFINITY
    state.check()


def test_idle_connection_of_another_context_is_closed_to_make_room() -> None:
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=4))
    for slot in (_open(state, a), _open(state, a)):
        state.release(slot, 1.0, reusable=True)
    state.acquire(a, 1.5)  # touch: the other A connection is now the least recently used
    waiter = state.acquire(b, 2.0)
    assert isinstance(waiter, Waiter)
    (close,) = state.take_actions()
    assert isinstance(close, Close) and close.reason == _state.AFFINITY
    assert close.slot.state == _state.CLOSING and state.closing == 1
    (wake,) = state.closed(close.slot, 2.1)
    assert wake.waiter is waiter and waiter.grant is not None and waiter.grant.key == b
    state.check()


def test_with_stream_permits_every_waiter_takes_an_idle_permit_of_another_key_at_once() -> None:
    """HTTP/2: A's three idle stream permits at the cap; B's three requests each take one
    now (three closes, three grants), instead of B's later requests waiting for B's first
    to finish as connections would (a connection in flight serves the next waiter)."""
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=3, queue=6))
    assert state.use_stream_permits() == []
    for slot in [_open(state, a) for _ in range(3)]:
        state.release(slot, 1.0, reusable=True)
    grants = []
    for i in range(3):
        waiter = state.acquire(b, 2.0 + i)
        assert isinstance(waiter, Waiter)
        (close,) = state.take_actions()
        assert isinstance(close, Close) and close.reason == _state.AFFINITY
        (wake,) = state.closed(close.slot, 2.0 + i)
        assert wake.waiter is waiter and waiter.grant is not None and waiter.grant.key == b
        grants.append(waiter.grant)
        state.check()
    assert (state.idle, state.opening, state.waiting) == (0, 3, 0)
    # The same with connections: B's second request waits for B's first connection.
    state = DestinationState(_limits(cap=3, queue=6))
    for slot in [_open(state, a) for _ in range(3)]:
        state.release(slot, 1.0, reusable=True)
    state.acquire(b, 2.0)
    (close,) = state.take_actions()
    state.closed(close.slot, 2.0)
    assert isinstance(state.acquire(b, 2.1), Waiter)
    assert state.take_actions() == [] and state.idle == 2


def test_queue_bound_then_saturated() -> None:
    key = ("A", "loop")
    state = DestinationState(_limits(cap=1, queue=2))
    _open(state, key)
    assert isinstance(state.acquire(key, 0.1), Waiter)
    assert isinstance(state.acquire(key, 0.2), Waiter)
    assert state.acquire(key, 0.3) is None
    assert state.saturated_total == 1 and state.waiting == 2
    # A request of a counted call (admitted, a token fetch, a retry) still queues, in order.
    counted = state.acquire(key, 0.4, None, True)
    assert isinstance(counted, Waiter) and counted.counted
    assert state.waiting == 3 and state.waiting_counted == 1
    assert state.acquire(key, 0.5) is None  # and calls are still bounded by the queue
    state.check()


def test_lifo_reuse_and_idle_ttl() -> None:
    key = ("A", "loop")
    state = DestinationState(_limits(cap=3, queue=0))
    first, second = _open(state, key), _open(state, key)
    state.release(first, 1.0, reusable=True)
    state.release(second, 2.0, reusable=True)
    assert state.acquire(key, 3.0) is second  # most recently used first
    state.release(second, 4.0, reusable=True)
    assert state.expire(10.9) == []
    (close,) = state.expire(11.0)  # first has been idle since t=1 with a 10 s TTL
    assert close.slot is first and close.reason == _state.IDLE_TTL
    assert state.next_deadline() == 14.0


def test_lifetime_has_jitter_and_closes_on_release() -> None:
    key = ("A", "loop")
    state = DestinationState(_limits(cap=2, queue=0), rng=lambda: 1.0)
    slot = _open(state, key)
    assert slot.expires_at == 90.0  # 100 s lifetime shortened by the full 10 % jitter
    (close,) = state.release(slot, 95.0, reusable=True)
    assert close.reason == _state.LIFETIME


def test_stale_retry_rule() -> None:
    """Retried once, only on a reused connection, only with a body that can be sent again."""
    table = {
        (reused, retried, replayable): _state.retry_stale(reused, retried, replayable)
        for reused in (True, False)
        for retried in (True, False)
        for replayable in (True, False)
    }
    assert [key for key, retry in table.items() if retry] == [(True, False, True)]


def test_every_reuse_is_checked_and_a_fresh_permit_is_not() -> None:
    """Probe-on-borrow: the driver checks a pooled connection before each use (an idle one
    and one handed over by a returning request alike), never a permit it opens itself."""
    key = ("A", "loop")
    state = DestinationState(_limits(cap=1, queue=1))
    permit = state.acquire(key, 0.0)
    assert isinstance(permit, Slot) and not state.must_check(permit)
    state.opened(permit, object(), 0.0)
    state.release(permit, 0.1, reusable=True)
    reused = state.acquire(key, 0.2)
    assert reused is permit and state.must_check(reused)
    waiter = state.acquire(key, 0.3)
    assert isinstance(waiter, Waiter)
    (wake,) = state.release(reused, 0.4, reusable=True)
    assert wake.waiter.grant is permit and state.must_check(permit)


def test_a_reused_connection_failing_unanswered_is_retried_once_on_a_permit() -> None:
    key = ("A", "loop")
    state = DestinationState(_limits(cap=1, queue=0))
    slot = _open(state, key)
    retry = state.unanswered(slot, 1.0, reused=True, retried=False, replayable=True)
    assert isinstance(retry, Slot) and retry.state == _state.OPENING and retry is not slot
    assert state.total == 1 and state.closed_total[_state.HEALTH] == 1
    state.opened(retry, object(), 1.0)
    (close,) = state.unanswered(retry, 2.0, reused=True, retried=True, replayable=True)
    assert close.slot is retry and close.reason == _state.ERROR


def test_an_event_stream_is_not_about_to_come_back() -> None:
    """Scenario 4 of issue 19: tenant A leaves 3 idle connections, tenant B holds a
    streaming GET and sends one more request: B is needy at once, and A's least recently
    used idle connection is closed for it (the stream still counts against the cap)."""
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=4, queue=8))
    idle_a = [_open(state, a) for _ in range(3)]
    for slot in idle_a:
        state.release(slot, 1.0, reusable=True)
    stream = _open(state, b, 1.5)
    assert state.stream(stream, 1.6) == []  # nobody waits yet: nothing to close
    assert state.streams == 1 and state.streams_total == 1
    waiter = state.acquire(b, 2.0)
    assert isinstance(waiter, Waiter)
    assert state.needed == 1
    (close,) = state.take_actions()
    assert close.slot is idle_a[0] and close.reason == _state.AFFINITY
    (wake,) = state.closed(close.slot, 2.1)
    assert wake.waiter is waiter and waiter.grant is not None and waiter.grant.key == b
    assert state.total == 4  # the stream still counts against the cap
    state.check()
    # The stream ends: its hold time (minutes, for a real stream) stays out of hold_ewma.
    before = state.hold_ewma
    state.release(stream, 500.0, reusable=True)
    assert state.hold_ewma == before and state.streams == 0
    state.check()


def test_a_stream_reported_before_waiters_makes_their_key_needy_when_they_queue() -> None:
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=4))
    idle_a = _open(state, a)
    state.release(idle_a, 0.5, reusable=True)
    stream = _open(state, b, 1.0)
    waiter = state.acquire(b, 1.1)
    assert isinstance(waiter, Waiter)
    assert state.take_actions() == []  # B's connection looks about to come back
    (close,) = state.stream(stream, 1.2)  # ...until its response turns out a stream
    assert close.slot is idle_a and close.reason == _state.AFFINITY
    state.check()


def test_a_request_held_far_longer_than_usual_counts_as_long_lived() -> None:
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=4))
    idle_a = _open(state, a)
    state.release(idle_a, 0.05, reusable=True)  # typical hold: about 50 ms
    held = _open(state, b, 1.0)
    waiter = state.acquire(b, 1.5)  # held 0.5 s: under the floor, still coming back
    assert isinstance(waiter, Waiter) and state.take_actions() == []
    state.cancel(waiter, 1.6)
    # Held past max(LONG_HOLD_FLOOR, LONG_HOLD_FACTOR x hold_ewma): long-lived.
    late = 1.0 + max(_state.LONG_HOLD_FLOOR, _state.LONG_HOLD_FACTOR * state.hold_ewma) + 0.1
    waiter = state.acquire(b, late)
    assert isinstance(waiter, Waiter)
    assert held.long_lived == _state.HELD_LONG and state.streams == 1
    (close,) = state.take_actions()
    assert close.slot is idle_a
    state.check()
    # Unlike an event stream, a slow request's hold time does teach hold_ewma.
    before = state.hold_ewma
    state.release(held, late + 1.0, reusable=True)
    assert state.hold_ewma > before and state.streams == 0
    state.check()


def test_the_maintenance_timer_finds_requests_held_long() -> None:
    a, b = ("A", "loop"), ("B", "loop")
    state = DestinationState(_limits(cap=2, queue=4))
    idle_a = _open(state, a)
    state.release(idle_a, 0.05, reusable=True)
    held = _open(state, b, 0.1)
    waiter = state.acquire(b, 0.2)
    assert isinstance(waiter, Waiter) and state.take_actions() == []
    actions = state.expire(5.5)  # idle TTL is 10 s: only the long hold acts
    assert [a.slot for a in actions if isinstance(a, Close)] == [idle_a]
    assert held.long_lived == _state.HELD_LONG
    state.check()
