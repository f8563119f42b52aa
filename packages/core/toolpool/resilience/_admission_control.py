"""Admission control of one destination at run time: its room, its saturation level and
the changes delivered to `on_saturation`, the calls waiting in `pool.admit`, the timer that
looks again when a breaker rest or a pause ends, and the `admit` context managers.

The rules themselves (capacity, occupancy, levels) are pure functions in `_admission`; this
module applies them to the live destination under the policy runtime's lock.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from toolpool import _auth_context
from toolpool._saturation import SaturationOverlay
from toolpool.errors import PoolSaturated
from toolpool.resilience._admission_rules import (
    BREAKER_OPEN,
    QUEUE_FULL,
    RATE_LIMITED,
    TIMEOUT,
    AdmissionQueue,
    AdmitWaiter,
    Assessment,
    Saturation,
    SaturationHub,
    assess,
)
from toolpool.resilience._breaker import Breaker
from toolpool.resilience._ratelimit import RateLimiter

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool.resilience._policy import Policy

__all__ = [
    "AdmissionControl",
    "AsyncAdmission",
    "SyncAdmission",
    "admitted_here",
    "mark_admitted",
    "unmark_admitted",
]

monotonic = time.monotonic

# A waiting admission looks at the destination again at least this often, in case capacity
# was freed by traffic the layer does not see (token requests, requests already in flight
# when the policy was bound).
_ADMIT_POLL = 0.1
_ADMITTED_OUTCOME = "admitted"

# The destinations (runtime ids) the current task or thread is inside `admit` for.
_admitted: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "toolpool_admitted", default=frozenset()
)


def admitted_here(runtime: AdmissionControl) -> bool:
    """True if the current task or thread is inside `admit` for this destination."""
    return id(runtime) in _admitted.get()


class AdmissionControl:
    """The admission half of `PolicyRuntime` (which sets every attribute declared here)."""

    name: str
    dest: DestinationPool
    policy: Policy
    max_connections: int
    breaker: Breaker | None
    limiter: RateLimiter
    admission: AdmissionQueue
    level: str
    _lock: threading.Lock
    _rejections: dict[str, int]
    _admitted_total: int
    _admission_waits: int
    _timer: threading.Timer | None
    _timer_at: float

    def saturation(self) -> Saturation:
        """How busy the destination is now (also re-assesses, which may notify)."""
        now = monotonic()
        with self._lock:
            found = self._assessment_locked(now)
            queued = self._note_level_locked(found, now)
            snapshot = self._snapshot(found)
        if queued:
            self._deliver()
        for layer in self.dest.layers:
            if isinstance(layer, SaturationOverlay):
                snapshot = layer.adjust_saturation(snapshot)
        return snapshot

    # ------------------------------------------------------------------ admission

    def _admit_now_locked(
        self, now: float, timeout: float, tenant: str | None = None, strict: bool = False
    ) -> str | None:
        """Admit at once ("admitted"), refuse at once (a reason), or None: wait."""
        breaker = self.breaker
        if breaker is not None and breaker.rejecting(now):
            self._rejections[BREAKER_OPEN] += 1
            return BREAKER_OPEN
        pause = self.limiter.paused_until - now
        if pause > timeout:
            self._rejections[RATE_LIMITED] += 1
            return RATE_LIMITED
        # A strict call that cannot wait may still take a place in the pool's queue.
        room = self._room_locked(now, admission=True, strict=strict and timeout > 0)
        if pause <= 0 and self.admission.try_enter(room, tenant, self.dest.state.cap):
            self._admitted_total += 1
            return _ADMITTED_OUTCOME
        if timeout <= 0:
            # Refused without waiting: say whether the queue or the rate limit is full.
            reason = self._assessment_locked(now).reason
            reason = RATE_LIMITED if reason == RATE_LIMITED else QUEUE_FULL
            self._rejections[reason] += 1
            return reason
        return None

    def _pump_locked(self, now: float) -> list[AdmitWaiter]:
        """Admit waiting calls while there is room (the caller wakes them, unlocked)."""
        if not self.admission.waiting:
            return []
        breaker = self.breaker
        if breaker is not None and breaker.rejecting(now):
            refused = self.admission.refuse_all(BREAKER_OPEN)
            self._rejections[BREAKER_OPEN] += len(refused)
            return refused
        if self.limiter.paused_until > now:
            return []
        granted = self.admission.grant(
            self._room_locked(now, admission=True),
            self._room_locked(now, admission=True, strict=True),
        )
        self._admitted_total += len(granted)
        return granted

    async def admit_async(
        self,
        timeout: float,
        tenant: str | None = None,
        on_wait: Callable[[], object] | None = None,
        strict: bool = False,
    ) -> Saturation:
        """Wait (FIFO per tenant, least-served tenant first; at most `timeout` s) until a
        call may start; see `pool.admit`. `on_wait` is called if the call has to queue
        behind more calls than the destination's queue holds (those in flight, queued in
        the pool and waiting here reach its capacity): the signal for adapters to run fewer
        tool calls at once, as a full queue was before strict calls waited here instead.

        A `strict` call (a wrapped agent's tool call) is admitted only while fewer calls
        than the limit are in flight: it waits here, in its tenant's turn, rather than in
        the pool's queue, whose places go to whoever asks first. `pool.admit` callers and
        direct clients keep the queue (the seed's 2 x the cap)."""
        loop = asyncio.get_running_loop()
        with self._arrive(timeout, loop, tenant, on_wait, strict) as arrival:
            while (waiter := arrival.waiting()) is not None:
                await waiter.wait_async(arrival.pause)
        return arrival.result()

    def admit_blocking(
        self,
        timeout: float,
        tenant: str | None = None,
        on_wait: Callable[[], object] | None = None,
        strict: bool = False,
    ) -> Saturation:
        """`admit_async` for threads (blocks the calling thread)."""
        with self._arrive(timeout, None, tenant, on_wait, strict) as arrival:
            while (waiter := arrival.waiting()) is not None:
                waiter.wait_sync(arrival.pause)
        return arrival.result()

    def _arrive(
        self,
        timeout: float,
        loop: asyncio.AbstractEventLoop | None,
        tenant: str | None,
        on_wait: Callable[[], object] | None,
        strict: bool,
    ) -> _Arrival:
        """A call asks to start: its verdict now, or the waiter queued for it on `loop`
        (None: a thread)."""
        deadline = monotonic() + timeout
        now = monotonic()
        waiter: AdmitWaiter | None = None
        with self._lock:
            verdict = self._admit_now_locked(now, timeout, tenant, strict)
            if verdict is None:
                waiter = AdmitWaiter(loop, tenant, strict)
                self.admission.enqueue(waiter, self.dest.state.cap)
                self._admission_waits += 1
            found = self._assessment_locked(now)
            crowded = waiter is not None and _crowded(found, self.admission)
            queued = self._note_level_locked(found, now)
        if queued:
            self._deliver()
        if crowded and on_wait is not None:
            on_wait()
        return _Arrival(self, verdict, waiter, deadline, now)

    def _traced_wait(self, since: float, outcome: str, error: BaseException | None) -> None:
        """Report a finished wait at the gate to the pool's tracing (toolpool.otel), if any:
        `outcome` "admitted" or why not."""
        probe = self.dest.probe
        if probe is not None:
            probe.admission_waited(self.dest, since, monotonic(), outcome, error)

    def _check_waiter(self, waiter: AdmitWaiter, deadline: float) -> tuple[str | None, float]:
        """(outcome or None, seconds left) for a waiting admission, re-armed for its next
        wait; admits what has room."""
        waiter.rearm()
        now = monotonic()
        with self._lock:
            woken = self._pump_locked(now)
            outcome = waiter.outcome
            if outcome is None and now >= deadline:
                self.admission.leave_queue(waiter, TIMEOUT)
                self._rejections[TIMEOUT] += 1
                outcome = TIMEOUT
            queued = self._reassess_locked(now)
        self._after_unlock([w for w in woken if w is not waiter], queued)
        return outcome, deadline - now

    def _give_up(self, waiter: AdmitWaiter | None) -> None:
        """A waiting admission was cancelled or interrupted."""
        if waiter is None:
            return
        now = monotonic()
        with self._lock:
            if self.admission.leave_queue(waiter, "cancelled"):
                self.admission.leave()
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)

    def _verdict(self, verdict: str | None) -> Saturation:
        """The snapshot for an admitted call, or raise the refusal."""
        now = monotonic()
        with self._lock:
            found = self._assessment_locked(now)
            if verdict == _ADMITTED_OUTCOME:
                return self._snapshot(found)
            if verdict == BREAKER_OPEN and self.breaker is not None:
                error: Exception = self._saturated_error(
                    found, BREAKER_OPEN, retry_after=max(0.05, self.breaker.retry_after(now))
                )
            elif verdict == RATE_LIMITED:
                wait = max(self.limiter.paused_until - now, self.limiter.room_in(now))
                error = self._saturated_error(found, RATE_LIMITED, retry_after=max(0.05, wait))
            else:
                error = self._saturated_error(found, verdict or TIMEOUT)
        raise error

    def release_admission(self) -> None:
        """An admitted call is done: its room goes to the next waiter."""
        now = monotonic()
        with self._lock:
            self.admission.leave()
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)

    # ------------------------------------------------------------------ saturation

    def _room_locked(self, now: float, admission: bool, strict: bool = False) -> int:
        """Capacity minus occupancy (the rules in `_admission`), without the rest; for an
        admission also what the rate limit can start in time. Requests made outside admit
        meet the rate limit when they send. `strict`: the room under the limit alone (no
        queue places), for strict admissions."""
        st = self.dest.state
        limits = st.limits
        cap = st.cap
        capacity = cap if strict else cap + limits.queue_limit * cap // limits.max_connections
        unseen = st.in_use + st.opening + st.waiting - st.waiting_counted
        room = capacity - max(self.admission.tracked, unseen)
        if admission:
            rate_room = self.limiter.room(now)
            if rate_room is not None:
                room = min(room, rate_room - self.admission.pending)
        return room

    def _assessment_locked(self, now: float) -> Assessment:
        st = self.dest.state
        limits = st.limits
        breaker = self.breaker
        rate_room = self.limiter.room(now)
        return assess(
            cap=st.cap,
            max_connections=limits.max_connections,
            pool_queue_limit=limits.queue_limit,
            in_use=st.in_use + st.opening,
            closing=st.closing,
            pool_waiting=st.waiting,
            pool_waiting_counted=st.waiting_counted,
            admit_waiting=self.admission.waiting,
            tracked=self.admission.tracked,
            breaker_wait=breaker.retry_after(now) if breaker is not None else 0.0,
            pause_wait=max(0.0, self.limiter.paused_until - now),
            rate_room=None if rate_room is None else rate_room - self.admission.pending,
            rate_wait=self.limiter.room_in(now),
            hold_time=st.hold_ewma,
            busy_at=self.policy.busy_at,
            previous=self.level,
        )

    def _reassess_locked(self, now: float) -> bool:
        """Re-assess the level; True if a change was queued for the callbacks. Skipped when
        nobody listens and nobody waits (the level then only matters to `saturation()`,
        which assesses afresh)."""
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if (hub is None or not hub.active) and not self.admission.waiting:
            return False
        return self._note_level_locked(self._assessment_locked(now), now)

    def _note_level_locked(self, found: Assessment, now: float) -> bool:
        if found.reason in (BREAKER_OPEN, RATE_LIMITED):
            # Nothing else may happen when the rest ends: look again then.
            self._schedule_locked(now + found.retry_after)
        if found.level == self.level:
            return False
        self.level = found.level
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if hub is None or not hub.active:
            return False
        hub.queue(self._snapshot(found))
        return True

    def _snapshot(self, found: Assessment) -> Saturation:
        st = self.dest.state
        return Saturation(
            destination=self.name,
            utilization=round(found.utilization, 4),
            in_use=found.in_use,
            queued=found.queued,
            queue_limit=found.queue_limit,
            effective_limit=st.cap,
            max_connections=self.max_connections,
            retry_after=round(found.retry_after, 3),
            state=found.state,
            reason=found.reason,
        )

    def _saturated_error(
        self, found: Assessment, reason: str, retry_after: float | None = None
    ) -> PoolSaturated:
        st = self.dest.state
        return PoolSaturated(
            self.name,
            # Calls in flight, less the slots still opening (named on their own).
            in_use=max(0, found.in_use - st.opening),
            waiting=found.queued,
            max_connections=st.cap,
            queue_limit=found.queue_limit,
            retry_after=round(
                max(0.05, found.retry_after if retry_after is None else retry_after), 3
            ),
            reason=reason,
            opening=st.opening,
            closing=st.closing,
        )

    def _rate_limited_error(self, tenant: str | None, now: float) -> PoolSaturated:
        found = self._assessment_locked(now)
        return self._saturated_error(
            found, RATE_LIMITED, retry_after=self.limiter.retry_after(tenant, now)
        )

    def _deliver(self) -> None:
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if hub is not None:
            hub.deliver()

    def _after_unlock(self, woken: list[AdmitWaiter], queued: bool) -> None:
        for waiter in woken:
            if not waiter.wake() and waiter.outcome == _ADMITTED_OUTCOME:
                self.release_admission()  # its event loop is gone: give the room back
        if queued:
            self._deliver()

    # ------------------------------------------------------------------ timer

    def _schedule_locked(self, at: float) -> None:
        """Re-assess at `at` (the end of a breaker rest or a pause)."""
        if self._timer_at <= at:
            return  # one is due sooner (or the pool is closing)
        if self._timer is not None:
            self._timer.cancel()
        timer = threading.Timer(max(0.0, at - monotonic()) + 0.001, self._on_timer)
        timer.daemon = True
        timer.name = f"toolpool-resilience-{self.name}"
        self._timer = timer
        self._timer_at = at
        timer.start()

    def _stop_timer(self) -> None:
        """The pool is closing: no more re-assessments."""
        with self._lock:
            timer, self._timer = self._timer, None
            self._timer_at = -math.inf  # never schedule again
        if timer is not None:
            timer.cancel()

    def _on_timer(self) -> None:
        now = monotonic()
        with self._lock:
            if self.dest.pool.closed:
                return
            self._timer = None
            self._timer_at = math.inf
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)


class _Arrival:
    """One call in `admit_async` / `admit_blocking`: every decision of its wait, so that the
    two only wait (on the event loop or the thread) while `waiting()` says so.

    ```python
    with control._arrive(...) as arrival:      # an exception: the call gives up its place
        while (waiter := arrival.waiting()) is not None:
            waiter.wait_sync(arrival.pause)     # or: await waiter.wait_async(arrival.pause)
    return arrival.result()                     # the snapshot, or raise the refusal
    ```
    """

    __slots__ = ("control", "deadline", "pause", "since", "verdict", "waiter")

    def __init__(
        self,
        control: AdmissionControl,
        verdict: str | None,
        waiter: AdmitWaiter | None,
        deadline: float,
        since: float,
    ) -> None:
        self.control = control
        #: "admitted" or why not; None while the call waits.
        self.verdict = verdict
        #: The waiter queued for the call (None: decided on arrival, it never waited).
        self.waiter = waiter
        self.deadline = deadline
        self.since = since
        #: How long the next wait may last (seconds), set by `waiting()`.
        self.pause = 0.0

    def waiting(self) -> AdmitWaiter | None:
        """The waiter to wait on next (re-armed; for at most `pause` s), or None once the
        verdict is in (admitted, refused, or the deadline passed)."""
        if self.verdict is not None:
            return None
        waiter = self.waiter
        assert waiter is not None
        self.verdict, remaining = self.control._check_waiter(waiter, self.deadline)
        if self.verdict is not None:
            return None
        self.pause = min(remaining, _ADMIT_POLL)
        return waiter

    def __enter__(self) -> _Arrival:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            # Cancelled or interrupted while waiting: leave the queue; the error propagates.
            self.control._give_up(self.waiter)
            self.control._traced_wait(self.since, "cancelled", exc)

    def result(self) -> Saturation:
        """After the wait: the snapshot for an admitted call, or raise the refusal."""
        verdict = self.verdict
        assert verdict is not None  # `waiting()` said so, or the call never waited
        if self.waiter is not None:
            self.control._traced_wait(self.since, verdict, None)
        return self.control._verdict(verdict)


class _Admission:
    """What `AsyncAdmission` and `SyncAdmission` share: a nested admit for a destination the
    task or thread is already admitted to is counted once; leaving releases the place."""

    __slots__ = ("_runtime", "_timeout", "_token")

    def __init__(self, runtime: AdmissionControl, timeout: float) -> None:
        self._runtime = runtime
        self._timeout = timeout
        self._token: contextvars.Token[frozenset[int]] | None = None

    def _nested(self) -> bool:
        """Whether this admit is nested in one for the same destination (already counted)."""
        return id(self._runtime) in _admitted.get()

    def _admitted(self, snapshot: Saturation) -> Saturation:
        self._token = _admitted.set(_admitted.get() | {id(self._runtime)})
        return snapshot

    def _leave(self) -> None:
        _exit_admission(self._runtime, self._token)
        self._token = None


class AsyncAdmission(_Admission):
    """`async with pool.admit(destination):` (see `Pool.admit`)."""

    __slots__ = ()

    async def __aenter__(self) -> Saturation:
        if self._nested():
            return self._runtime.saturation()
        return self._admitted(await self._runtime.admit_async(self._timeout, _tenant()))

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()


class SyncAdmission(_Admission):
    """`with pool.admit_sync(destination):` (see `Pool.admit_sync`)."""

    __slots__ = ()

    def __enter__(self) -> Saturation:
        if self._nested():
            return self._runtime.saturation()
        return self._admitted(self._runtime.admit_blocking(self._timeout, _tenant()))

    def __exit__(self, *exc_info: object) -> None:
        self._leave()


def _crowded(found: Assessment, admission: AdmissionQueue) -> bool:
    """True if a call that just queued (counted in `admission.waiting`) waits behind at
    least the destination's capacity (limit + queue bound) of other calls."""
    return found.occupancy + admission.waiting > found.capacity


def _tenant() -> str | None:
    """Whom the current call acts for (its turn at the gate): the auth context's label."""
    ctx = _auth_context._current.get()
    return ctx.label if ctx is not None else None


def mark_admitted(runtime: AdmissionControl) -> contextvars.Token[frozenset[int]] | None:
    """Mark the current task's (or thread's) requests to `runtime`'s destination as those of
    an admitted call, until `unmark_admitted(token)`; None if they already are."""
    held = _admitted.get()
    key = id(runtime)
    if key in held:
        return None
    return _admitted.set(held | {key})


def unmark_admitted(token: contextvars.Token[frozenset[int]] | None) -> None:
    """Undo `mark_admitted` (in the same task or thread)."""
    if token is not None:
        _admitted.reset(token)


def _exit_admission(
    runtime: AdmissionControl, token: contextvars.Token[frozenset[int]] | None
) -> None:
    if token is None:
        return  # a nested admit: the outer one releases
    try:
        _admitted.reset(token)
    except ValueError:
        pass  # exited in another context than entered; the outer context ends anyway
    runtime.release_admission()
