"""An AIMD limit on parallel tool calls, fed by the pool's saturation signals.

Frameworks fix their parallelism per run (LangGraph's `max_concurrency`, a thread pool's
size). When destinations saturate, firing every tool call of a turn at once only fills wait
queues and earns "busy" results; this limiter lets fewer run at a time after a busy signal
and grows back as calls succeed (additive increase, multiplicative decrease, as TCP does).

Rules:
  - a call takes a slot (`slot()` / `slot_sync()`) before it runs; slots are granted while
    fewer than `limit` are in flight, FIFO per tenant, the tenant that has had the fewest
    slots first (`toolpool.resilience._fair`: equal tenants alternate, and tenants that
    arrive a little after another one catch up with the slots it took before anyone
    waited), so one tenant's burst does not hold back another tenant's calls;
  - a busy signal (a busy result, or a call that had to wait at a saturated destination)
    halves the limit (not below `minimum`), at most once per *generation*:
    calls that started before the last decrease do not decrease it again, so a burst of
    twenty refusals counts as one signal, not twenty;
  - `limit` successes in a row raise the limit by one, up to the initial limit;
  - a call made from inside a call holding a slot of the same limiter (a tool that runs a
    nested agent) does not take another slot, so nesting cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading

from toolpool.resilience._fair import FairQueue

__all__ = ["AdaptiveToolConcurrency", "ToolSlot"]

_held: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "toolpool_tool_slots", default=frozenset()
)
_NONE_HELD: frozenset[int] = frozenset()


class ToolSlot:
    """A granted slot: report how its call went with `busy()` or `success()` (once)."""

    __slots__ = ("_limiter", "_reported", "generation", "nested")

    def __init__(self, limiter: AdaptiveToolConcurrency, generation: int, nested: bool) -> None:
        self._limiter = limiter
        self.generation = generation
        self.nested = nested
        self._reported = False

    def busy(self) -> None:
        """The call met a busy destination: lower the limit (once per generation)."""
        if not self._reported:
            self._reported = True
            self._limiter.on_busy(self.generation)

    def success(self) -> None:
        """The call ran without meeting a busy destination."""
        if not self._reported:
            self._reported = True
            self._limiter.on_success()


class _Waiter:
    """A call queued for a slot; `with waiter:` gives its place up when the wait ends in an
    exception (cancelled, interrupted)."""

    __slots__ = ("event", "fut", "generation", "granted", "limiter", "loop", "tenant", "thread")

    def __init__(
        self,
        limiter: AdaptiveToolConcurrency,
        event: threading.Event | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        fut: asyncio.Future[None] | None = None,
        tenant: str | None = None,
    ) -> None:
        self.limiter = limiter
        self.tenant = tenant
        self.granted = False
        self.generation = 0
        self.thread = threading.get_ident()
        self.event = event
        self.loop = loop
        self.fut = fut

    def __enter__(self) -> _Waiter:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None:
            self.limiter._abandon(self)

    def future(self) -> asyncio.Future[None]:
        """What an asyncio task awaits until the slot is granted."""
        assert self.fut is not None
        return self.fut

    def block(self) -> None:
        """Block the thread until the slot is granted."""
        assert self.event is not None
        self.event.wait()

    def wake(self) -> bool:
        if self.event is not None:
            self.event.set()
            return True
        assert self.fut is not None
        assert self.loop is not None
        if threading.get_ident() == self.thread:
            _resolve(self.fut)
            return True
        try:
            self.loop.call_soon_threadsafe(_resolve, self.fut)
        except RuntimeError:  # its loop is closed: nobody takes the grant
            return False
        return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class AdaptiveToolConcurrency:
    """An adaptive (AIMD) cap on tool calls in flight, shared by the runs of an agent.

    ```python
    limiter = AdaptiveToolConcurrency(16)
    async with limiter.slot() as slot:
        try:
            result = await run_tool()
        except toolpool.PoolSaturated:
            slot.busy()            # halves the limit
            raise
        slot.success()             # +1 after `limit` successes
    ```

    Works from asyncio tasks (any event loop) and threads at once.
    """

    def __init__(self, limit: int, *, minimum: int = 1) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be an int >= 1, got {limit!r}")
        if isinstance(minimum, bool) or not isinstance(minimum, int) or not 1 <= minimum <= limit:
            raise ValueError(f"minimum must be an int in 1..{limit} (the limit), got {minimum!r}")
        self.initial = limit
        self.minimum = minimum
        self._limit = limit
        self._in_flight = 0
        self._generation = 0
        self._successes = 0
        # The waiting calls, per tenant.
        self._waiters: FairQueue[_Waiter] = FairQueue()
        self._waiting = 0
        self._lock = threading.Lock()
        self.decreases_total = 0
        self.increases_total = 0

    def __repr__(self) -> str:
        return (
            f"<AdaptiveToolConcurrency limit={self._limit}/{self.initial} "
            f"in_flight={self._in_flight} waiting={self._waiting}>"
        )

    @property
    def limit(self) -> int:
        """The current limit (between `minimum` and the initial limit)."""
        return self._limit

    @property
    def in_flight(self) -> int:
        """Calls holding a slot now."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        return self._waiting

    # ------------------------------------------------------------------ signals

    def on_busy(self, generation: int | None = None) -> None:
        """A busy signal: halve the limit (min `minimum`). With the `generation` a slot was
        granted in, signals from calls that started before the last decrease are ignored."""
        with self._lock:
            if generation is not None and generation < self._generation:
                return
            self._generation += 1
            self._successes = 0
            new = max(self.minimum, self._limit // 2)
            if new < self._limit:
                self._limit = new
                self.decreases_total += 1

    def on_success(self) -> None:
        """A call succeeded: after `limit` successes, raise the limit by one (max initial)."""
        with self._lock:
            self._successes += 1
            if self._successes < self._limit or self._limit >= self.initial:
                return
            self._successes = 0
            self._limit += 1
            self.increases_total += 1
            granted = self._grant_locked()
        self._wake(granted)

    # ------------------------------------------------------------------ slots

    def _grant_locked(self) -> list[_Waiter]:
        granted = []
        while self._waiting and self._in_flight < self._limit:
            popped = self._waiters.pop()
            if popped is None:
                break
            waiter = popped[1]
            self._waiting -= 1
            waiter.granted = True
            waiter.generation = self._generation
            self._in_flight += 1
            granted.append(waiter)
        return granted

    def _wake(self, granted: list[_Waiter]) -> None:
        for waiter in granted:
            if not waiter.wake():
                self._release()

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            granted = self._grant_locked()
            if self._in_flight == 0 and self._waiting == 0:
                self._waiters.reset()  # idle: the next burst's turns start afresh
        self._wake(granted)

    def _take(self, tenant: str | None) -> int | None:
        """Take a slot at once (returns the generation) or None when the caller must queue."""
        with self._lock:
            if self._in_flight < self._limit and not self._waiting:
                self._in_flight += 1
                self._waiters.note_served(tenant, self._limit)
                return self._generation
            return None

    def _queue(self, waiter: _Waiter) -> None:
        with self._lock:
            if self._in_flight < self._limit and not self._waiting:
                waiter.granted = True
                waiter.generation = self._generation
                self._in_flight += 1
                self._waiters.note_served(waiter.tenant, self._limit)
            else:
                self._waiters.push(waiter.tenant, waiter, self._limit)
                self._waiting += 1

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter gave up (cancelled, interrupted): return its grant or leave the queue."""
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter.tenant, waiter)
                self._waiting -= 1
                return
        self._release()

    def slot(self, tenant: str | None = None) -> contextlib.AbstractAsyncContextManager[ToolSlot]:
        """Hold one slot for the enclosed async tool call (waits FIFO among `tenant`'s
        calls, tenants in turn)."""
        return _AsyncSlot(self, tenant)

    def slot_sync(self, tenant: str | None = None) -> contextlib.AbstractContextManager[ToolSlot]:
        """Hold one slot for the enclosed sync tool call (blocks the thread while waiting;
        FIFO among `tenant`'s calls, tenants in turn)."""
        return _SyncSlot(self, tenant)


class _Hold:
    """One `slot()` / `slot_sync()`: every decision of taking and giving back the slot, so
    that the two only wait (on the event loop or the thread) for the waiter `_arrive()`
    returns.

    ```python
    waiter = hold._arrive()          # None: held at once (or nested)
    if waiter is not None:
        with waiter:                 # an exception: the call gives up its place
            ...                      # wait until granted
    slot = hold._granted()           # ... the call runs ...
    hold._leave()
    ```
    """

    __slots__ = ("_held", "_limiter", "_tenant", "_token", "_waiter", "generation")

    #: Whether the waiter blocks a thread (else it resolves a future on the running loop).
    _threads = False

    def __init__(self, limiter: AdaptiveToolConcurrency, tenant: str | None) -> None:
        self._limiter = limiter
        self._tenant = tenant
        self._held = _NONE_HELD  # read on arrival
        self._token: contextvars.Token[frozenset[int]] | None = None
        self._waiter: _Waiter | None = None
        #: The generation the slot was granted in; None: nested in a slot of the limiter.
        self.generation: int | None = None

    def _arrive(self) -> _Waiter | None:
        """Take the slot at once (None), or queue and return the waiter to wait on."""
        limiter = self._limiter
        self._held = held = _held.get()
        if id(limiter) in held:
            return None  # nested: no slot of its own
        generation = limiter._take(self._tenant)
        if generation is not None:
            self.generation = generation
            return None
        if self._threads:
            waiter = _Waiter(limiter, event=threading.Event(), tenant=self._tenant)
        else:
            loop = asyncio.get_running_loop()
            waiter = _Waiter(limiter, loop=loop, fut=loop.create_future(), tenant=self._tenant)
        limiter._queue(waiter)
        self._waiter = waiter
        return None if waiter.granted else waiter

    def _granted(self) -> ToolSlot:
        """The slot, once held (or nested)."""
        limiter = self._limiter
        if self._waiter is not None:
            self.generation = self._waiter.generation
        if self.generation is None:
            return ToolSlot(limiter, limiter._generation, nested=True)
        self._token = _held.set(self._held | {id(limiter)})
        return ToolSlot(limiter, self.generation, nested=False)

    def _leave(self) -> None:
        """The call is done: give the slot back (a nested one holds none)."""
        token = self._token
        if token is not None:
            self._token = None
            _held.reset(token)
            self._limiter._release()


class _AsyncSlot(_Hold):
    __slots__ = ()

    async def __aenter__(self) -> ToolSlot:
        waiter = self._arrive()
        if waiter is not None:
            with waiter:
                await waiter.future()
        return self._granted()

    async def __aexit__(self, *exc_info: object) -> None:
        self._leave()


class _SyncSlot(_Hold):
    __slots__ = ()

    _threads = True

    def __enter__(self) -> ToolSlot:
        waiter = self._arrive()
        if waiter is not None:
            with waiter:
                waiter.block()
        return self._granted()

    def __exit__(self, *exc_info: object) -> None:
        self._leave()
