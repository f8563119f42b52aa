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
from toolpool._state import Close, DestinationState, Limits, Slot, Wake, Waiter

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
    )
    @precondition(lambda self: self.state is None)
    def setup(self, max_connections: int, queue_factor: float, bypass: int | None) -> None:
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
    @rule(target=waiters, key=KEYS)
    def acquire(self, key: tuple[str, str]) -> Any:
        assert self.state is not None
        self.now += 0.01
        got = self.state.acquire(key, self.now)
        if isinstance(got, Waiter):
            self.arrivals.setdefault(key, []).append(got)
            self._apply(self.state.take_actions())
            return got
        if isinstance(got, Slot):
            self.granted.append(got)
        return None

    @precondition(lambda self: self.state is not None and self.granted)
    @rule(index=st.integers(0, 100), opens=st.booleans())
    def take_grant(self, index: int, opens: bool) -> None:
        """A request that got a slot (directly or by waking) uses it: a permit is opened
        (or fails to open), a lease carries the request."""
        assert self.state is not None
        slot = self.granted.pop(index % len(self.granted))
        if slot.state == _state.OPENING:
            if opens:
                self.state.opened(slot, object(), self.now)
                self._bind(slot)
                self.leased.append(slot)
            else:
                self._apply(self.state.open_failed(slot, self.now))
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
    def replace_dead(self, index: int) -> None:
        """The leased connection was dead: the same request gets a permit instead."""
        assert self.state is not None
        slot = self.leased.pop(index % len(self.leased))
        permit = self.state.replace(slot, self.now)
        assert permit.state == _state.OPENING and permit.key == slot.key
        self.granted.append(permit)

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
TestPoolRules.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)
