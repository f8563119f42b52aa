"""Admission and saturation: how busy a destination is (`Saturation`), the FIFO of calls
waiting to be admitted, and the delivery of saturation changes to `on_saturation` callbacks.

The rules, in one place (the runtime in `_policy` applies them under its lock):

- *Capacity* of a destination is its effective limit plus its effective queue bound, the
  pool's queue bound scaled down with the limit (`queue_limit * cap / max_connections`), so
  that a call admitted while the limit is low waits at most about `queue_factor` service
  times. The bound counts calls: the requests of a counted call (admitted, or let in by
  the layer) queue in the pool without its own bound, so connections opening and closing
  during tenant hand-overs never make the pool refuse a call this layer let in.
- A destination-wide rate limit admits only the calls it can start within `max_wait` (its
  *room*, less the admitted calls that have not sent yet); with no room the destination is
  saturated ("rate_limited"), as it is during a Retry-After pause.
- *In use* counts connections in use or opening, and calls that entered the layer (inside
  `admit`, or sending) up to the limit; the rest of those count as *queued*, with the
  requests waiting in the pool and the calls waiting in `admit`.
- *Occupancy* is the larger of (calls inside `admit` + requests in flight that were not
  admitted) and (connections in use or opening + requests queued in the pool that no layer
  counted, such as traffic sent before the policy was bound). A call is
  admitted while occupancy < capacity, the breaker lets calls through and no Retry-After
  pause is on; otherwise it waits, FIFO per tenant, the least-served tenant first (`_fair`),
  or is refused at once when it cannot wait. A *strict* call (a wrapped agent's tool call)
  is admitted only while occupancy < the effective limit: it waits here rather than in the
  pool's queue, whose places go in arrival order (one tenant's burst arriving first would
  take them all); one that cannot wait may still take a queue place.
  An admitted call never meets a full queue when it sends: its requests (token fetch, 401
  refresh, retries included) wait in order for a connection, bounded by their timeouts.
- *Levels* (the callbacks hear every crossing), with hysteresis so that they do not flap at
  a threshold:

      saturated     breaker open, a Retry-After pause, or occupancy >= capacity; it stays
                    saturated until occupancy <= limit + queue bound / 2
      queued        (state "busy") anything queued; it stays until the queue is empty and
                    utilization < busy_at
      utilization   (state "busy") utilization (in use / effective limit) >= busy_at; it
                    stays until utilization < busy_at - 0.2
      ok            otherwise
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Literal

from toolpool._saturation import Saturation, SaturationHub
from toolpool.resilience._fair import FairQueue

__all__ = [
    "BUSY",
    "OK",
    "QUEUED",
    "SATURATED",
    "UTILIZED",
    "AdmissionQueue",
    "AdmitWaiter",
    "Assessment",
    "Saturation",
    "SaturationHub",
    "assess",
]

log = logging.getLogger("toolpool.resilience")

OK: Literal["ok"] = "ok"
BUSY: Literal["busy"] = "busy"
SATURATED: Literal["saturated"] = "saturated"
# The two levels inside "busy" (each crossing is a change the callbacks hear about).
UTILIZED = "utilization"
QUEUED = "queued"

# Rejection reasons (the `reason` of PoolSaturated / the rejection counters).
QUEUE_FULL = "queue_full"
TIMEOUT = "timeout"
BREAKER_OPEN = "breaker_open"
RATE_LIMITED = "rate_limited"
REJECTION_REASONS = (QUEUE_FULL, TIMEOUT, BREAKER_OPEN, RATE_LIMITED)

# How far below busy_at utilization must fall before "busy" clears.
_BUSY_HYSTERESIS = 0.2


@dataclass(frozen=True)
class Assessment:
    """The numbers behind one saturation reading (internal to the runtime)."""

    level: str
    state: Literal["ok", "busy", "saturated"]
    reason: str
    in_use: int
    capacity: int
    occupancy: int
    queue_limit: int
    utilization: float
    queued: int
    retry_after: float


def assess(
    *,
    cap: int,
    max_connections: int,
    pool_queue_limit: int,
    in_use: int,
    closing: int,
    pool_waiting: int,
    admit_waiting: int,
    tracked: int,
    pool_waiting_counted: int = 0,
    breaker_wait: float,
    pause_wait: float,
    rate_room: int | None,
    rate_wait: float,
    hold_time: float,
    busy_at: float,
    previous: str,
) -> Assessment:
    """Apply the rules of the module docstring to one destination's numbers."""
    queue_limit = pool_queue_limit * cap // max_connections
    capacity = cap + queue_limit
    # Requests in the pool that no layer counted (counted ones are inside `tracked`).
    occupancy = max(tracked, in_use + pool_waiting - pool_waiting_counted)
    rate_limited = pause_wait > 0 or (rate_room is not None and rate_room <= 0)
    if rate_room is not None:
        capacity = min(capacity, occupancy + max(0, rate_room))
    # Calls that entered (admitted, or sending) count as in use or queued before the pool
    # has seen them, so a change is visible the moment a call arrives.
    in_use = max(in_use, min(tracked, cap))
    queued = max(pool_waiting, tracked - cap) + admit_waiting
    utilization = in_use / cap
    level: str
    reason: str
    if breaker_wait > 0:
        level, reason = SATURATED, BREAKER_OPEN
    elif rate_limited:
        level, reason = SATURATED, RATE_LIMITED
    elif occupancy >= capacity or (
        previous == SATURATED and occupancy > cap + queue_limit // 2 and occupancy > 0
    ):
        level, reason = SATURATED, QUEUE_FULL
    elif queued > 0 or (previous in (SATURATED, QUEUED) and utilization >= busy_at):
        level = reason = QUEUED
    elif utilization >= busy_at or (
        previous != OK and utilization >= round(busy_at - _BUSY_HYSTERESIS, 6) and in_use > 0
    ):
        level = reason = UTILIZED
    else:
        level, reason = OK, ""
    state: Literal["ok", "busy", "saturated"] = (
        SATURATED if level == SATURATED else OK if level == OK else BUSY
    )
    if breaker_wait > 0:
        retry_after = breaker_wait
    elif rate_limited:
        retry_after = max(0.05, pause_wait, rate_wait)
    elif occupancy + admit_waiting >= cap:
        # The calls ahead (in flight, queued in the pool, waiting at the gate) must drain
        # through `cap` connections, one hold time each.
        retry_after = max(0.05, hold_time * (occupancy + admit_waiting - cap + 1) / cap)
    else:
        retry_after = 0.0
    return Assessment(
        level=level,
        state=state,
        reason=reason,
        in_use=in_use,
        capacity=capacity,
        occupancy=occupancy,
        queue_limit=queue_limit,
        utilization=utilization,
        queued=queued,
        retry_after=retry_after,
    )


# ---------------------------------------------------------------------- waiting calls


class AdmitWaiter:
    """A call waiting in `admit`. `outcome` is None while waiting, then "admitted" or the
    reason it was refused; `wake()` is called (outside any lock) once it is set. `tenant`
    is whom the call acts for: waiting calls are served tenant by tenant (`_fair`). A
    `strict` waiter (a tool call of a wrapped agent) is admitted only while the destination
    has a connection's worth of room under its limit, not into the pool's queue."""

    __slots__ = ("_event", "_fut", "_loop", "_thread", "outcome", "strict", "tenant")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        tenant: str | None = None,
        strict: bool = False,
    ) -> None:
        self.outcome: str | None = None
        self.tenant = tenant
        self.strict = strict
        self._thread = threading.get_ident()
        self._loop = loop
        if loop is not None:
            self._fut: asyncio.Future[None] | None = loop.create_future()
            self._event: threading.Event | None = None
        else:
            self._fut = None
            self._event = threading.Event()

    def wake(self) -> bool:
        """Wake the waiting task or thread; False if its event loop is gone."""
        if self._event is not None:
            self._event.set()
            return True
        fut, loop = self._fut, self._loop
        assert fut is not None
        assert loop is not None
        if threading.get_ident() == self._thread:
            _resolve(fut)
            return True
        try:
            loop.call_soon_threadsafe(_resolve, fut)
        except RuntimeError:
            return False
        return True

    def rearm(self) -> None:
        """Make the next wait block again. Call it *before* looking at `outcome`, so that a
        wake arriving after the look is not lost."""
        if self._event is not None:
            self._event.clear()
        elif self._fut is not None and self._fut.done() and self._loop is not None:
            self._fut = self._loop.create_future()

    async def wait_async(self, timeout: float) -> None:
        """Wait until woken or `timeout` seconds pass."""
        fut, loop = self._fut, self._loop
        assert fut is not None
        assert loop is not None
        handle = loop.call_later(timeout, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()

    def wait_sync(self, timeout: float) -> None:
        """Block the thread until woken or `timeout` seconds pass."""
        event = self._event
        assert event is not None
        event.wait(timeout)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AdmissionQueue:
    """Counts of admitted and tracked calls, and the waiting ones: a FIFO per tenant, the
    least-served tenant first (`FairQueue`), so one tenant's burst of 200 calls delays
    another tenant's single call by one turn, not by the burst, and a tenant that arrived
    first does not keep the lead it took before anyone waited. Not thread-safe by itself;
    the runtime calls it under its lock."""

    __slots__ = ("_fair", "admitted", "sending", "unadmitted", "waiting")

    def __init__(self) -> None:
        self.admitted = 0
        # Requests in flight made inside an admit (so `admitted - sending` calls are admitted
        # but have not sent yet), and requests in flight made outside one.
        self.sending = 0
        self.unadmitted = 0
        self.waiting = 0
        # The waiting calls; those that left are dropped lazily.
        self._fair: FairQueue[AdmitWaiter] = FairQueue()

    @property
    def tracked(self) -> int:
        """Calls inside admit plus requests in flight that were not admitted."""
        return self.admitted + self.unadmitted

    @property
    def pending(self) -> int:
        """Admitted calls that have not sent their request yet."""
        return max(0, self.admitted - self.sending)

    def served(self, tenant: str | None) -> int:
        """Places `tenant` was given since the destination was last idle."""
        return self._fair.served(tenant)

    def try_enter(self, room: int, tenant: str | None = None, allowance: int = 0) -> bool:
        """Admit at once if nobody waits and there is room (`allowance`: how far behind
        the most-served tenant a newcomer's count starts, see `FairQueue`)."""
        if self.waiting == 0 and room > 0:
            self.admitted += 1
            self._fair.note_served(tenant, allowance)
            return True
        return False

    def enqueue(self, waiter: AdmitWaiter, allowance: int = 0) -> None:
        self._fair.push(waiter.tenant, waiter, allowance)
        self.waiting += 1

    def grant(self, room: int, strict_room: int | None = None) -> list[AdmitWaiter]:
        """Admit waiters, least-served tenant first, while there is room (`strict_room` for
        strict waiters, default `room`); the caller wakes them. The next waiter that has no
        room stops the granting: nobody behind it jumps ahead."""
        if strict_room is None:
            strict_room = room
        granted: list[AdmitWaiter] = []
        fair = self._fair
        while self.waiting:
            waiter = fair.peek(_alive)
            if waiter is None or (strict_room if waiter.strict else room) <= 0:
                break
            fair.pop(_alive)
            waiter.outcome = "admitted"
            self.waiting -= 1
            self.admitted += 1
            room -= 1
            strict_room -= 1
            granted.append(waiter)
        return granted

    def refuse_all(self, reason: str) -> list[AdmitWaiter]:
        """Refuse every waiter (breaker opened); the caller wakes them."""
        refused = [w for w in self._fair.items() if w.outcome is None]
        for waiter in refused:
            waiter.outcome = reason
        self._fair.clear()
        self.waiting = 0
        return refused

    def leave_queue(self, waiter: AdmitWaiter, reason: str) -> bool:
        """A waiter gives up. Returns True if it had been admitted meanwhile (the caller must
        then `leave()` for it)."""
        if waiter.outcome == "admitted":
            return True
        if waiter.outcome is None:
            waiter.outcome = reason
            self.waiting -= 1
            if self.waiting == 0:
                self._fair.clear()
                if self.admitted == 0:
                    self._fair.reset()
            else:
                queued = self._fair.queued(waiter.tenant)
                if queued > 64 and queued > 2 * self.waiting:
                    self._fair.compact(waiter.tenant, _alive)
        return False

    def leave(self) -> None:
        """An admitted call is done."""
        self.admitted -= 1
        if self.admitted == 0 and self.waiting == 0:
            self._fair.reset()  # idle: the next burst's turns start afresh


def _alive(waiter: AdmitWaiter) -> bool:
    return waiter.outcome is None
