"""The pool's rules for one destination, as a state machine with no I/O.

Everything that decides which request gets which connection must live in this file. The
drivers (`_pool` with `_async` and `_sync`) execute the actions these methods return (close a
connection, wake a waiter) and report what happened (opened, closed, released); they never
decide anything themselves. Every method takes `now` (a monotonic clock reading) and
returns a list of actions; none blocks, sleeps or touches a socket. The caller serialises
calls (one lock per destination).

Theory of operation
-------------------
A destination owns at most `max_connections` *slots*. A slot is one connection, in one of
four states:

    OPENING   a permit: its holder is opening the connection (TCP, TLS) right now
    IDLE      open, unused, waiting in the idle stacks
    IN_USE    leased to exactly one request
    CLOSING   a close is under way; it still counts against the cap until the driver
              reports `closed`, so the downstream never sees more than max_connections

Every slot carries a *key* `(identity, driver)`. `identity` is the auth-context fingerprint
of the requests it carried; `None` means *unbound*: opened by warm-up, it has carried no
request, and the first request that takes it binds it to its own identity for life. That is
the affinity rule: a connection that carried identity A never carries identity B. `driver`
names the I/O world the connection lives in (an asyncio event loop, or the thread driver),
because a socket owned by one event loop cannot be used from another.

A request asks `acquire(key)` and gets, in this order of preference:

    1. the most recently used IDLE slot of its key (LIFO keeps few connections hot and lets
       the rest reach their idle TTL),
    2. an unbound IDLE slot of its driver, which it binds,
    3. a new OPENING slot (a permit) when the destination is under its cap,
    4. else a place in the wait queue, or `None` (saturated) when the queue is full.

The queue bound limits *calls*, not requests. A request that belongs to a call already
counted elsewhere (`counted=True`: a call inside admission or accepted by the resilience
layer, whose bound covers it; a token fetch, part of the call it is for; a retry of a counted
call) always gets its place: refusing it would fail a call that was already let in. Such
waiters queue in order with the rest but do not take places under the bound, so the bound is
`waiting - waiting_counted <= queue_limit`, and every counted waiter is bounded by whoever
counted its call.

Waiters form one FIFO per destination, and one per key. A released connection is handed to
the oldest waiter of *its* key, which is usually not the head when many tenants share a
destination; serving it out of order avoids closing a warm connection to open a cold one,
but each time a needy head is passed over it counts one *bypass*, and once it has been
passed over `max_bypass` times, the released connection is closed instead so that its
capacity reaches the head. Every waiter is therefore served after a bounded number of
grants.

The *cap* is `max_connections` unless an adaptive limit (toolpool.resilience) lowered it with
`set_cap`: then new permits stop until the total is under the new cap, connections coming
back while the total is over it are closed (reason "limit"), and so are idle ones. Raising
the cap grants permits to waiters at once.

A connection costs a round trip to close (gracefully) and two or three to open, so handing a
tenant's connection to another tenant is worth it only where it is needed. A key is *needy*
when its waiters outnumber what its own connections in flight (in use or opening) can serve
soon: `need(K) = max(0, ceil(waiting(K) / reuse_factor) - in_flight(K))`, where
`reuse_factor` (default 2) is how many waiters one connection serves in about the time a new
connection takes to open. `needed` is the sum over keys. Connections of other keys are
closed (reason "affinity") only for needy keys: an idle one when `needed > closing` (the
closes under way do not cover the need yet), a returning one that no waiter of its key
takes, likewise, and a returning one whose key holds more than its fair share of the cap
(the cap over the keys waiting or holding connections), so that one tenant's burst does not
keep the connections while another tenant waits with none. Capacity that frees up goes to
the needy key with the fewest connections in flight (its oldest waiter), else to the head of
the queue. A waiter whose key is not needy is served by its own key's
connections as they come back; the head of the queue counts a bypass only while its key is
needy. On an HTTP/2 destination (`use_stream_permits`) a slot is a stream permit, which costs
nothing to hand over (its tenant's connection stays open), so `need(K) = waiting(K)`: every
waiter takes another key's idle permit at once.

A *long-lived* response (a `text/event-stream` the driver reports with `stream`, such as an
MCP session's GET event stream, or any request held past `LONG_HOLD_FACTOR` times the
destination's typical hold time, floor `LONG_HOLD_FLOOR`) is not a connection about to come
back: it leaves its key's in-flight count, so a request of the same key that queues behind
it makes the key needy at once and fairness closes another key's idle connection for it.
It still counts against the cap (the server holds the connection), it counts in `streams`
while held, and an event stream's hold time does not enter the typical hold time. Held-too-
long slots are found in lease order, from the oldest, when a request queues and when the
maintenance timer calls `expire`: O(slots found) each time.

Invariants, checked by the hypothesis tests in tests/core:

    I1  opening + idle + in_use + closing <= max_connections, and opening + idle + in_use
        <= cap unless the cap was lowered and connections in use have not come back yet
    I2  no waiter while an idle slot it could use exists
    I3  waiters exist only while the destination is at (or over) its cap
    I4  needed > closing implies no idle slot
    I5  waiting - waiting_counted <= queue_limit (counted requests are bounded upstream)
    I6  in_flight(K) counts K's opening and in-use slots that are not long-lived
"""

from __future__ import annotations

import bisect
import random
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

__all__ = [
    "CLOSED",
    "CLOSING",
    "IDLE",
    "IN_USE",
    "OPENING",
    "Close",
    "DestinationState",
    "DurationObserver",
    "Durations",
    "Limits",
    "Slot",
    "Waiter",
    "Wake",
    "retry_stale",
]

Key = tuple[str | None, Hashable]  # (identity or None for unbound, driver)

OPENING, IDLE, IN_USE, CLOSING, CLOSED = range(5)
SLOT_STATE_NAMES = ("opening", "idle", "in_use", "closing", "closed")

WAITING, GRANTED, GONE = range(3)

# Close reasons (the `reason` label of toolpool_connections_closed_total).
IDLE_TTL = "idle_ttl"
LIFETIME = "lifetime"
HEALTH = "health"
AFFINITY = "affinity"
ERROR = "error"
SHUTDOWN = "shutdown"
LIMIT = "limit"
CLOSE_REASONS = (IDLE_TTL, LIFETIME, HEALTH, AFFINITY, ERROR, SHUTDOWN, LIMIT)
#: Why an HTTP/2 connection closed (its slots are stream permits, which close for the reasons
#: above; `toolpool._h2pool` counts the connections): idle TTL, max lifetime, no PING
#: answer, shutdown, or error (closed by the server, GOAWAY, a failure).
H2_CLOSE_REASONS = (IDLE_TTL, LIFETIME, HEALTH, SHUTDOWN, ERROR)

# A request held this many times the destination's typical hold time (`hold_ewma`), and at
# least LONG_HOLD_FLOOR seconds, is long-lived: not expected back soon. 20x keeps an ordinary
# slow response (a few times the mean) out of it; the 5 s floor keeps a fast destination's
# ordinary slow calls (a tool taking a second or two) out of it.
LONG_HOLD_FACTOR = 20.0
LONG_HOLD_FLOOR = 5.0
# Slot.long_lived values: why the slot is not expected back soon.
HELD_LONG = 1
EVENT_STREAM = 2

# Upper bounds (seconds) of the wait-time histogram buckets; the last bucket is +Inf.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Bounds of the connection create-time (TCP + TLS) and use-time (lease to release) histograms.
CREATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
USE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class Limits:
    """The numbers one destination's rules run on (already validated by the config layer)."""

    max_connections: int
    queue_limit: int
    idle_ttl: float
    max_lifetime: float
    # Each connection's lifetime is shortened by up to this fraction, at random, so that
    # connections opened together (warm-up, a burst) do not all expire together.
    lifetime_jitter: float = 0.1
    # How often the head of the queue may be passed over before it is served first.
    max_bypass: int | None = None
    # Idle connections are health-checked this often (seconds).
    health_check_interval: float = 10.0

    @property
    def bypass_limit(self) -> int:
        return self.max_bypass if self.max_bypass is not None else self.max_connections


class Durations:
    """A fixed-bucket histogram of durations in seconds; `observe` is O(1) and allocates no
    container, so the request path can afford it. `buckets[i]` counts observations <=
    `bounds[i]` (and above the bound before it); the last bucket is +Inf. Like every counter
    here it is updated and read under the destination's lock."""

    __slots__ = ("bounds", "buckets", "count", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.count += 1


class Slot:
    """One connection's bookkeeping. `conn` is the driver's connection object."""

    __slots__ = (
        "checked_at",
        "conn",
        "created_at",
        "expires_at",
        "id",
        "idle_since",
        "key",
        "leased_at",
        "long_lived",
        "state",
        "uses",
    )

    def __init__(self, slot_id: int, key: Key, now: float, expires_at: float) -> None:
        self.id = slot_id
        self.key = key
        self.state = OPENING
        self.created_at = now
        self.expires_at = expires_at
        self.idle_since = now
        self.checked_at = now
        self.leased_at = now
        self.uses = 0
        # 0, HELD_LONG or EVENT_STREAM while in use (see `DestinationState.stream`).
        self.long_lived = 0
        self.conn: Any = None

    def __repr__(self) -> str:
        return f"<Slot #{self.id} {SLOT_STATE_NAMES[self.state]} uses={self.uses}>"


class Waiter:
    """A request waiting for a slot. `grant` is set when it is served (state GRANTED)."""

    __slots__ = ("bypassed", "counted", "grant", "granted_at", "key", "notify", "since", "state")

    def __init__(self, key: Key, now: float, notify: Any = None, counted: bool = False) -> None:
        self.key = key
        # Part of a call counted elsewhere: takes no place under the queue bound.
        self.counted = counted
        self.since = now
        self.state = WAITING
        self.grant: Slot | None = None
        # When it was served: `granted_at - since` is the wait the histogram recorded.
        self.granted_at = now
        self.bypassed = 0
        # Opaque to this module: the driver's way to wake the waiting request.
        self.notify = notify


class DurationObserver(Protocol):
    """Hears each duration as the histograms above record it (under the destination lock)."""

    def wait(self, seconds: float) -> None: ...
    def create(self, seconds: float) -> None: ...
    def use(self, seconds: float) -> None: ...


class Close(NamedTuple):
    """Action: close this slot's connection; report `closed(slot)` when the peer saw it."""

    slot: Slot
    reason: str


class Wake(NamedTuple):
    """Action: the waiter was granted a slot (an idle lease or an OPENING permit)."""

    waiter: Waiter


Action = Close | Wake
_NO_ACTIONS: list[Action] = []


def retry_stale(reused: bool, retried: bool, replayable: bool) -> bool:
    """Whether a request whose connection failed before any response byte (peer closed,
    reset) is sent again on a new connection: only once, only if the connection was reused
    (a fresh one failing says something about the destination, not about keep-alive), and
    only if its body can be sent again."""
    return reused and not retried and replayable


class DestinationState:
    """One destination's slots, idle stacks and wait queue. Not thread-safe by itself."""

    def __init__(self, limits: Limits, rng: Callable[[], float] | None = None) -> None:
        self.limits = limits
        self._rng = rng if rng is not None else random.random
        # The effective connection limit (<= max_connections); see `set_cap`.
        self.cap = limits.max_connections
        self._next_id = 1
        # Counts by state; `total` is everything that counts against the cap.
        self.opening = 0
        self.in_use = 0
        self.closing = 0
        self.total = 0
        # Idle slots: a LIFO stack per key, and one LRU order over all of them.
        self._idle: dict[Key, OrderedDict[Slot, None]] = {}
        self._idle_lru: OrderedDict[Slot, None] = OrderedDict()
        # Waiters: one FIFO over all, one per key, one per driver (for unbound grants).
        # Entries are removed lazily: a deque may still hold waiters that left or were served.
        self._queue: deque[Waiter] = deque()
        self._by_key: dict[Key, deque[Waiter]] = {}
        self._by_driver: dict[Hashable, deque[Waiter]] = {}
        self._waiting_by_key: dict[Key, int] = {}
        self._waiting_by_driver: dict[Hashable, int] = {}
        self.waiting = 0
        # The part of `waiting` that belongs to calls counted elsewhere (outside the bound).
        self.waiting_counted = 0
        # Connections in flight (opening or in use, not long-lived) per key, and the need
        # per needy key.
        self._inflight: dict[Key, int] = {}
        # IN_USE slots in lease order (oldest first), to find the ones held too long.
        self._leased: dict[Slot, None] = {}
        # Long-lived responses held now, and event streams reported since the start.
        self.streams = 0
        self.streams_total = 0
        self._need: dict[Key, int] = {}
        self.needed = 0
        self.reuse_factor = 2
        # Slots are HTTP/2 stream permits (`use_stream_permits`): see `_need_of`.
        self.stream_permits = False
        # Counters (monotonic) and the wait-time histogram.
        self.created_total = 0
        self.closed_total: dict[str, int] = dict.fromkeys(CLOSE_REASONS, 0)
        self.acquired_total = 0
        self.reused_total = 0
        self.queued_total = 0
        self.saturated_total = 0
        self.timeouts_total = 0
        self.wait_buckets = [0] * (len(WAIT_BUCKETS) + 1)
        self.wait_sum = 0.0
        self.wait_count = 0
        self.recent_waits: deque[float] = deque(maxlen=2048)
        # Connection create time (recorded by the drivers) and use time (lease to release).
        self.create_time = Durations(CREATE_BUCKETS)
        self.use_time = Durations(USE_BUCKETS)
        # Told every wait, create and use duration as it is recorded (toolpool.otel's meter
        # histograms); None costs one attribute test per record.
        self.observer: DurationObserver | None = None
        # Exponentially weighted mean time a slot is held by a request, for retry-after.
        self.hold_ewma = 0.05

    # ------------------------------------------------------------------ queries

    @property
    def idle(self) -> int:
        return len(self._idle_lru)

    def idle_slots(self) -> list[Slot]:
        """Idle slots, least recently used first."""
        return list(self._idle_lru)

    def retry_after(self) -> float:
        """Seconds until a new request would likely be served, from the recent hold time."""
        return max(0.05, self.hold_ewma * (self.waiting + 1) / self.cap)

    def check(self) -> None:
        """Assert the invariants I1–I5 (used by tests; O(slots + waiters))."""
        lim = self.limits
        assert self.total == self.opening + self.idle + self.in_use + self.closing, "counts"
        assert self.total <= lim.max_connections, "I1: cap exceeded"
        # Over a lowered cap only by connections in use or opening (they close on return).
        busy = self.in_use + self.opening
        assert self.total - self.closing <= max(self.cap, busy), "I1: over lowered cap"
        assert self.waiting - self.waiting_counted <= lim.queue_limit, "I5: queue bound exceeded"
        assert 0 <= self.waiting_counted <= self.waiting, "counted waiters drift"
        if self.waiting:
            assert self.total >= self.cap, "I3: waiter while under cap"
            assert self.needed <= self.closing or not self._idle_lru, "I4: idle blocks a need"
            for key, n in self._waiting_by_key.items():
                if n:
                    assert not self._idle.get(key), "I2: waiter beside its idle slot"
                    assert not self._idle.get((None, key[1])), "I2: waiter beside unbound"
        live = [w for w in self._queue if w.state == WAITING]
        assert len(live) == self.waiting, "waiter count drift"
        assert sum(w.counted for w in live) == self.waiting_counted, "counted waiter drift"
        assert sum(self._waiting_by_key.values()) == self.waiting, "per-key count drift"
        assert len(self._idle_lru) == sum(len(s) for s in self._idle.values()), "idle drift"
        assert len(self._leased) == self.in_use, "leased drift"
        held = sum(1 for s in self._leased if s.long_lived)
        assert held == self.streams, "I6: stream count drift"
        assert sum(self._inflight.values()) == self.in_use + self.opening - held, "I6: in-flight"
        need = {}
        for key, n in self._waiting_by_key.items():
            k = self._need_of(key, n)
            if k:
                need[key] = k
        assert need == self._need, "need drift"
        assert self.needed == sum(need.values()), "needed drift"

    # ------------------------------------------------------------------ requests

    def acquire(
        self, key: Key, now: float, notify: Any = None, counted: bool = False
    ) -> Slot | Waiter | None:
        """A request of `key` wants a connection.

        Returns an IN_USE slot (reuse), an OPENING slot (a permit: open a connection for
        it and report `opened` or `open_failed`), a Waiter (queued; wait for its Wake), or
        None when the queue is full (saturated). A `counted` request (its call is counted
        elsewhere, see the theory of operation) is never refused. Closes needed to make
        room for the new waiter are returned by `take_actions()`.
        """
        stack = self._idle.get(key)
        if stack:
            slot = stack.popitem()[0]
            return self._lease(slot, now)
        unbound = self._idle.get((None, key[1]))
        if unbound:
            slot = unbound.popitem()[0]
            slot.key = key
            return self._lease(slot, now)
        if self.total < self.cap:
            self._record_wait(0.0)
            self.acquired_total += 1
            return self._new_slot(key, now)
        if not counted and self.waiting - self.waiting_counted >= self.limits.queue_limit:
            self.saturated_total += 1
            return None
        self._find_long_held(now)
        waiter = Waiter(key, now, notify, counted)
        self._enqueue(waiter)
        self.queued_total += 1
        self._pending = self._make_room()
        return waiter

    def take_actions(self) -> list[Action]:
        """Actions produced by the last `acquire` that queued (closes to make room)."""
        actions = self._pending
        self._pending = _NO_ACTIONS
        return actions

    _pending: list[Action] = _NO_ACTIONS

    def cancel(self, waiter: Waiter, now: float, timed_out: bool = False) -> list[Action]:
        """The waiting request gave up (cancelled or timed out).

        If it had been granted a slot in the meantime, the slot is given back: an idle lease
        is released for reuse, a permit's capacity goes to the next waiter.
        """
        if timed_out:
            self.timeouts_total += 1
        if waiter.state == WAITING:
            waiter.state = GONE
            self._count_waiter(waiter, -1)
            self._compact_if_sparse()
            return _NO_ACTIONS
        if waiter.state == GRANTED:
            waiter.state = GONE
            slot = waiter.grant
            waiter.grant = None
            assert slot is not None
            if slot.state == OPENING:
                return self.open_failed(slot, now)
            return self.release(slot, now, reusable=True)
        return _NO_ACTIONS

    # ------------------------------------------------------------------ connections

    def opened(self, slot: Slot, conn: Any, now: float) -> list[Action]:
        """The permit's connection is open and in use by the request that opened it.

        For warm-up slots (unbound, nobody waiting on them) use `warmed` instead.
        """
        assert slot.state == OPENING
        self.opening -= 1
        self.in_use += 1
        self.created_total += 1
        slot.state = IN_USE
        slot.conn = conn
        slot.uses = 1
        slot.leased_at = now
        self._leased[slot] = None
        return _NO_ACTIONS

    def warmed(self, slot: Slot, conn: Any, now: float) -> list[Action]:
        """A warm-up connection is open: give it to a waiter that can bind it, or idle it."""
        assert slot.state == OPENING
        self.opening -= 1
        self.created_total += 1
        slot.conn = conn
        slot.state = IN_USE
        self.in_use += 1
        slot.uses = 0
        self._leased[slot] = None
        return self._return(slot, now)

    def open_failed(self, slot: Slot, now: float) -> list[Action]:
        """Opening the permit's connection failed or was abandoned: free its capacity."""
        assert slot.state == OPENING
        self.opening -= 1
        slot.state = CLOSED
        self._flight(slot.key, -1)
        return self._free_capacity(now)

    def abandon(self, slot: Slot, now: float) -> list[Action]:
        """Opening the permit's connection was given up (cancelled, timed out, TLS refused)
        after TCP connected: the peer may count the connection already, so the slot turns
        CLOSING and counts against the cap until the driver reports `closed` (the peer saw
        the close). Not counted as created nor closed: it never carried a request."""
        assert slot.state == OPENING
        self.opening -= 1
        self.closing += 1
        slot.state = CLOSING
        self._flight(slot.key, -1)
        return self._make_room()

    def release(self, slot: Slot, now: float, reusable: bool) -> list[Action]:
        """The request is done with the slot. Not reusable (error, `Connection: close`,
        body not read) means: close it."""
        assert slot.state == IN_USE, slot
        held = now - slot.leased_at
        kind = slot.long_lived
        if kind:
            self._unmark_long_lived(slot)
        if kind != EVENT_STREAM:
            # An event stream's hold time says nothing about when requests come back.
            self.hold_ewma += 0.1 * (held - self.hold_ewma)
        self.use_time.observe(held)
        if self.observer is not None:
            self.observer.use(held)
        if not reusable:
            return self._close(slot, ERROR)
        if slot.expires_at <= now:
            return self._close(slot, LIFETIME)
        return self._return(slot, now)

    @staticmethod
    def must_check(slot: Slot) -> bool:
        """Probe-on-borrow: whether the driver checks the leased slot's connection for
        staleness before sending on it (and reports a failed check with `replace`).

        The rule: *every* reuse is checked, not only after some idle time. A pooled
        connection that is not alive, has unread bytes or has seen EOF (a zero-timeout
        readability check; on asyncio also any byte received while it was idle) is stale.
        Bytes nobody asked for are a response to no request; reusing the connection would
        hand them to the next one. A fresh permit has nothing to check."""
        return slot.conn is not None

    def unanswered(
        self, slot: Slot, now: float, reused: bool, retried: bool, replayable: bool
    ) -> Slot | list[Action]:
        """The slot's connection failed before any byte of the response arrived (the peer
        closed or reset it). Either a permit in its place, for the same request to retry
        once on a new connection (`retry_stale` says when), or the slot closed (the
        returned actions) and the request fails."""
        if retry_stale(reused, retried, replayable):
            return self.replace(slot, now)
        return self.release(slot, now, reusable=False)

    def replace(self, slot: Slot, now: float) -> Slot:
        """The leased connection turned out stale before it carried the request (see
        `must_check` and `unanswered`): drop it and give the same request a permit in its
        place, keeping its turn. The dead connection needs no graceful close."""
        assert slot.state == IN_USE
        if slot.long_lived:
            self._unmark_long_lived(slot)
        del self._leased[slot]
        self.in_use -= 1
        self.total -= 1
        slot.state = CLOSED
        self.closed_total[HEALTH] += 1
        self._flight(slot.key, -1)
        return self._new_slot(slot.key, now)

    def closed(self, slot: Slot, now: float) -> list[Action]:
        """The driver finished closing a CLOSING slot: its capacity is free."""
        if slot.state != CLOSING:
            return _NO_ACTIONS
        self.closing -= 1
        slot.state = CLOSED
        return self._free_capacity(now)

    def discard(self, slot: Slot, now: float, reason: str = HEALTH) -> list[Action]:
        """An IDLE connection was found dead (the peer closed it, a health check failed).

        No-op unless the slot is still idle (a request may have taken it meanwhile; that
        request then meets the dead connection and uses `replace`)."""
        if slot.state != IDLE:
            return _NO_ACTIONS
        self._unidle(slot)
        slot.state = CLOSED
        self.closed_total[reason] += 1
        return self._free_capacity(now)

    def stream(self, slot: Slot, now: float) -> list[Action]:
        """The slot's response is an event stream (`text/event-stream`): held until the
        stream ends, not about to come back. Its key's waiters may now be needy, so this
        may close other keys' idle connections (the returned actions)."""
        if slot.state != IN_USE or slot.long_lived == EVENT_STREAM:
            return _NO_ACTIONS
        if slot.long_lived:
            slot.long_lived = EVENT_STREAM  # already counted as held long
            return _NO_ACTIONS
        self.streams_total += 1
        self._mark_long_lived(slot, EVENT_STREAM)
        return self._make_room()

    def expire(self, now: float) -> list[Action]:
        """Close idle slots past their idle TTL or lifetime. O(expired) for the TTL part;
        the lifetime part scans idle slots, so call it from the maintenance timer. Also
        marks requests held too long as long-lived (and closes what their waiters need)."""
        actions: list[Action] = []
        if self._find_long_held(now):
            actions.extend(self._make_room())
        ttl = self.limits.idle_ttl
        while self._idle_lru:
            oldest = next(iter(self._idle_lru))
            if oldest.idle_since + ttl > now:
                break
            actions.extend(self._close_idle(oldest, IDLE_TTL))
        for slot in [s for s in self._idle_lru if s.expires_at <= now]:
            actions.extend(self._close_idle(slot, LIFETIME))
        return actions

    def due_health_checks(self, now: float) -> list[Slot]:
        """Idle slots whose last check is older than the health-check interval."""
        due = [s for s in self._idle_lru if s.checked_at + self.limits.health_check_interval <= now]
        for slot in due:
            slot.checked_at = now
        return due

    def next_deadline(self) -> float | None:
        """When `expire` next has work, or None while nothing is idle."""
        if not self._idle_lru:
            return None
        oldest = next(iter(self._idle_lru))
        soonest_lifetime = min(s.expires_at for s in self._idle_lru)
        return min(oldest.idle_since + self.limits.idle_ttl, soonest_lifetime)

    def warm(self, key: Key, count: int, now: float) -> list[Slot]:
        """Permits for up to `count` warm-up connections (as far as the cap allows)."""
        room = self.cap - self.total
        return [self._new_slot(key, now) for _ in range(max(0, min(count, room)))]

    def set_cap(self, cap: int, now: float) -> list[Action]:
        """Change the effective connection limit (clamped to 1..max_connections)."""
        self.cap = max(1, min(int(cap), self.limits.max_connections))
        actions: list[Action] = []
        while self.total < self.cap and self.waiting:
            actions.append(self._grant_permit(now))
        while self.total - self.closing > self.cap and self._idle_lru:
            actions.extend(self._close_idle(next(iter(self._idle_lru)), LIMIT))
        actions.extend(self._make_room())
        return actions

    def use_stream_permits(self, on: bool = True) -> list[Action]:
        """Whether this destination's slots are HTTP/2 stream permits (on from the start for
        a destination offering h2; off once its server picked http/1.1)."""
        self.stream_permits = on
        for key in list(self._waiting_by_key):
            self._renew_need(key)
        return self._make_room()

    def set_reuse_factor(self, factor: int) -> list[Action]:
        """How many waiters one connection of a key serves before the key counts as needy
        (about: time to open a connection / time a request holds one). At least 1."""
        self.reuse_factor = max(1, int(factor))
        for key in list(self._waiting_by_key):
            self._renew_need(key)
        return self._make_room()

    def free_idle(self, now: float) -> list[Action]:
        """Close the least recently used idle slot (reason "affinity") so that a request of
        another key can take its place under the cap without queuing; nothing if none is
        idle. For destinations whose idle slot costs nothing to give up (an HTTP/2 stream
        permit: its tenant's connection stays open), asked by the overflow tier before it
        sends a request locally rather than to the pool service (toolpool._overflow)."""
        if not self._idle_lru:
            return _NO_ACTIONS
        return self._close_idle(next(iter(self._idle_lru)), AFFINITY)

    def close_all_idle(self, now: float, reason: str = SHUTDOWN) -> list[Action]:
        """Close every idle slot (pool shutdown)."""
        actions: list[Action] = []
        for slot in list(self._idle_lru):
            actions.extend(self._close_idle(slot, reason))
        return actions

    def fail_all_waiters(self) -> list[Waiter]:
        """Remove and return every waiting request (pool shutdown); the driver fails them."""
        gone = [w for w in self._queue if w.state == WAITING]
        for waiter in gone:
            waiter.state = GONE
        self._queue.clear()
        self._by_key.clear()
        self._by_driver.clear()
        self._waiting_by_key.clear()
        self._waiting_by_driver.clear()
        self._need.clear()
        self.needed = 0
        self.waiting = 0
        self.waiting_counted = 0
        return gone

    # ------------------------------------------------------------------ internals

    def _new_slot(self, key: Key, now: float) -> Slot:
        lim = self.limits
        lifetime = lim.max_lifetime * (1.0 - lim.lifetime_jitter * self._rng())
        slot = Slot(self._next_id, key, now, now + lifetime)
        self._next_id += 1
        self.opening += 1
        self.total += 1
        self._flight(key, 1)
        return slot

    def _lease(self, slot: Slot, now: float) -> Slot:
        self._idle_lru.pop(slot)
        self._leased[slot] = None
        slot.state = IN_USE
        slot.uses += 1
        slot.leased_at = now
        self.in_use += 1
        self.acquired_total += 1
        self.reused_total += 1
        self._record_wait(0.0)
        self._flight(slot.key, 1)
        return slot

    def _return(self, slot: Slot, now: float) -> list[Action]:
        """An open, reusable IN_USE slot comes back: hand it over, idle it, or close it."""
        identity, driver = slot.key
        if self.total > self.cap:
            return self._close(slot, LIMIT)
        if self.waiting:
            # Who can take it: the oldest waiter of its key; any waiter of its driver if
            # it is unbound.
            queue = self._by_driver.get(driver) if identity is None else self._by_key.get(slot.key)
            taker = self._peek_oldest(queue)
            if queue is not None and taker is not None:
                if identity is not None and self._over_share(slot.key):
                    # Its key holds more than its share while another key has nothing
                    # coming: the capacity goes there (tenants served in turn).
                    return self._close(slot, AFFINITY)
                head = self._peek_head()
                if head is not None and taker is not head and self._need.get(head.key):
                    if head.bypassed >= self.limits.bypass_limit:
                        # The head has been passed over enough: this capacity goes to it.
                        return self._close(slot, AFFINITY)
                    head.bypassed += 1
                queue.popleft()
                if identity is None:
                    self._flight(slot.key, -1)
                    slot.key = taker.key
                    self._flight(slot.key, 1)
                slot.uses += 1
                slot.leased_at = now
                # Leased anew: to the end of the lease order.
                del self._leased[slot]
                self._leased[slot] = None
                return [Wake(self._grant(taker, slot, now))]
            if self.needed > self.closing:
                # Nobody waiting can use this connection, and some key needs room.
                return self._close(slot, AFFINITY)
        self.in_use -= 1
        del self._leased[slot]
        self._flight(slot.key, -1)
        slot.state = IDLE
        slot.idle_since = now
        slot.checked_at = now
        stack = self._idle.get(slot.key)
        if stack is None:
            stack = self._idle[slot.key] = OrderedDict()
        stack[slot] = None
        self._idle_lru[slot] = None
        return _NO_ACTIONS

    def _close(self, slot: Slot, reason: str) -> list[Action]:
        self.in_use -= 1
        del self._leased[slot]
        self._flight(slot.key, -1)
        self.closing += 1
        slot.state = CLOSING
        self.closed_total[reason] += 1
        return [Close(slot, reason)]

    def _close_idle(self, slot: Slot, reason: str) -> list[Action]:
        self._unidle(slot)
        self.closing += 1
        slot.state = CLOSING
        self.closed_total[reason] += 1
        return [Close(slot, reason)]

    def _unidle(self, slot: Slot) -> None:
        del self._idle_lru[slot]
        stack = self._idle[slot.key]
        del stack[slot]
        if not stack:
            del self._idle[slot.key]

    def _free_capacity(self, now: float) -> list[Action]:
        """One slot's worth of capacity is free: a waiter gets a permit to open its own."""
        self.total -= 1
        if self.total >= self.cap or not self.waiting:
            # No permit to grant (over a lowered cap), but a need may still want room.
            return self._make_room()
        wake = self._grant_permit(now)
        room = self._make_room()
        return [wake, *room] if room else [wake]

    def _grant_permit(self, now: float) -> Wake:
        """Grant a new slot to the oldest waiter of a needy key, else to the head."""
        waiter = self._oldest_needy()
        if waiter is None:
            waiter = self._pop_oldest(self._queue)
        assert waiter is not None
        return Wake(self._grant(waiter, self._new_slot(waiter.key, now), now))

    def _over_share(self, key: Key) -> bool:
        """True while a need is not covered by the closes under way and `key` holds more
        connections in flight than its fair share of the cap (the cap over the keys that
        wait or hold connections). O(keys), and only while some key is needy."""
        if self.needed <= self.closing:
            return False
        active = len(self._inflight.keys() | self._waiting_by_key.keys())
        return self._inflight.get(key, 0) > -(-self.cap // active)

    def _oldest_needy(self) -> Waiter | None:
        """Pop and return a waiter of a needy key: the key with the fewest connections in
        flight (tenants served in turn), its oldest waiter; ties go to the oldest waiter
        (O(needy keys))."""
        best: Waiter | None = None
        best_queue: deque[Waiter] | None = None
        best_rank: tuple[int, float] | None = None
        for key in self._need:
            queue = self._by_key.get(key)
            waiter = self._peek_oldest(queue)
            if waiter is None:
                continue
            rank = (self._inflight.get(key, 0), waiter.since)
            if best_rank is None or rank < best_rank:
                best, best_queue, best_rank = waiter, queue, rank
        if best_queue is not None:
            best_queue.popleft()
        return best

    def _make_room(self) -> list[Action]:
        """Keep I4: close LRU idle slots while needs exceed the closes under way."""
        if self.needed <= self.closing or not self._idle_lru:
            return _NO_ACTIONS
        actions: list[Action] = []
        while self.needed > self.closing and self._idle_lru:
            actions.extend(self._close_idle(next(iter(self._idle_lru)), AFFINITY))
        return actions

    def _find_long_held(self, now: float) -> bool:
        """Mark the requests held past the long-hold threshold, oldest lease first; True
        if any was marked. Stops at the first one under it (leases are in time order)."""
        limit = now - max(LONG_HOLD_FLOOR, LONG_HOLD_FACTOR * self.hold_ewma)
        found = False
        for slot in self._leased:
            if slot.leased_at > limit:
                break
            if not slot.long_lived:
                self._mark_long_lived(slot, HELD_LONG)
                found = True
        return found

    def _mark_long_lived(self, slot: Slot, kind: int) -> None:
        slot.long_lived = kind
        self.streams += 1
        self._flight(slot.key, -1)

    def _unmark_long_lived(self, slot: Slot) -> None:
        slot.long_lived = 0
        self.streams -= 1
        self._flight(slot.key, 1)

    def _flight(self, key: Key, delta: int) -> None:
        n = self._inflight.get(key, 0) + delta
        if n:
            self._inflight[key] = n
        else:
            del self._inflight[key]
        if key in self._waiting_by_key or key in self._need:
            self._renew_need(key)

    def _need_of(self, key: Key, waiting: int) -> int:
        """need(K) (see the theory of operation). With stream permits every waiter needs a
        permit of its own: a permit in flight serves one request, and another key's idle
        permit costs nothing to give up (its tenant's connection stays open), so a waiter
        takes one at once rather than waiting for its key's requests to finish."""
        if self.stream_permits:
            return waiting
        return max(0, -(-waiting // self.reuse_factor) - self._inflight.get(key, 0))

    def _renew_need(self, key: Key) -> None:
        new = self._need_of(key, self._waiting_by_key.get(key, 0))
        old = self._need.get(key, 0)
        if new != old:
            self.needed += new - old
            if new:
                self._need[key] = new
            else:
                del self._need[key]

    def _grant(self, waiter: Waiter, slot: Slot, now: float) -> Waiter:
        self.acquired_total += 1
        if slot.state == IN_USE:
            self.reused_total += 1
        waiter.state = GRANTED
        waiter.grant = slot
        self._count_waiter(waiter, -1)
        waiter.granted_at = now
        self._record_wait(now - waiter.since)
        return waiter

    def _record_wait(self, seconds: float) -> None:
        self.wait_buckets[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.wait_sum += seconds
        self.wait_count += 1
        self.recent_waits.append(seconds)
        if self.observer is not None:
            self.observer.wait(seconds)

    def record_create(self, seconds: float) -> None:
        """A connection took `seconds` to open (TCP connect plus TLS handshake)."""
        self.create_time.observe(seconds)
        if self.observer is not None:
            self.observer.create(seconds)

    def _enqueue(self, waiter: Waiter) -> None:
        self._queue.append(waiter)
        by_key = self._by_key.get(waiter.key)
        if by_key is None:
            by_key = self._by_key[waiter.key] = deque()
        by_key.append(waiter)
        driver = waiter.key[1]
        by_driver = self._by_driver.get(driver)
        if by_driver is None:
            by_driver = self._by_driver[driver] = deque()
        by_driver.append(waiter)
        self._count_waiter(waiter, 1)

    def _count_waiter(self, waiter: Waiter, delta: int) -> None:
        key = waiter.key
        self.waiting += delta
        if waiter.counted:
            self.waiting_counted += delta
        n = self._waiting_by_key.get(key, 0) + delta
        if n:
            self._waiting_by_key[key] = n
        else:
            self._waiting_by_key.pop(key, None)
            self._by_key.pop(key, None)
        self._renew_need(key)
        driver = key[1]
        m = self._waiting_by_driver.get(driver, 0) + delta
        if m:
            self._waiting_by_driver[driver] = m
        else:
            self._waiting_by_driver.pop(driver, None)
            self._by_driver.pop(driver, None)
        if not self.waiting:
            self._queue.clear()

    def _peek_head(self) -> Waiter | None:
        return self._peek_oldest(self._queue)

    @staticmethod
    def _peek_oldest(queue: deque[Waiter] | None) -> Waiter | None:
        """The oldest live waiter of `queue` (dropping departed ones from its front)."""
        while queue:
            if queue[0].state == WAITING:
                return queue[0]
            queue.popleft()
        return None

    def _pop_oldest(self, queue: deque[Waiter] | None) -> Waiter | None:
        waiter = self._peek_oldest(queue)
        if waiter is not None:
            assert queue is not None
            queue.popleft()
        return waiter

    def _compact_if_sparse(self) -> None:
        """Drop departed waiters from the deques once they outnumber the live ones."""
        if len(self._queue) > 2 * self.waiting + 64:
            live = [w for w in self._queue if w.state == WAITING]
            self._queue = deque(live)
            for key in list(self._by_key):
                self._by_key[key] = deque(w for w in self._by_key[key] if w.state == WAITING)
            for driver in list(self._by_driver):
                self._by_driver[driver] = deque(
                    w for w in self._by_driver[driver] if w.state == WAITING
                )
