"""Admission per tool call: wait (boundedly) while a destination the tool uses is saturated.

Which destinations a tool uses is learned from its pooled traffic (`tool_call_scope` reports
it) or declared up front. What is learned is knowledge about the pool's tools, not about one
wrapping: every `Admission` on the same pool shares it, so an agent built and wrapped per task
(AutoGen's `AssistantAgent`, a CrewAI `Crew` per kickoff) is gated from its first call rather
than only after its own traffic taught a fresh gate (issue 25). Declared destinations stay
per gate. Before a tool call runs, admission is asked of each of them at the
destination's gate (toolpool.resilience, the gate behind `pool.admit`), as a *strict* call: it
is admitted while the destination has a connection for it (calls in flight below the
effective limit), otherwise it waits at the gate, FIFO among its tenant's calls and the
least-served tenant first, up to `max_wait` in total, then gives up with `PoolSaturated`
carrying a retry-after that adapters turn into a readable "busy, retry in N s" tool result.
Tool calls do not take places in the pool's own queue: those go to whoever asks first, so the
tenant whose burst arrived first would hold them all.

`hold` / `hold_sync` keep the admissions for the whole tool call, so the pool counts the call
against the destination's capacity and its requests do not meet a full queue; `admit` /
`admit_sync` only wait for the gate to open and let go at once. Destinations are admitted in
name order, so two calls never wait on each other's destinations crosswise.

A destination a call reaches that was not admitted up front (the first call of a tool, a URL
taken from the call's arguments) is admitted when the call's first request to it goes out
(`tool_call_scope` does it), within what is left of the same `max_wait`. A destination is
learned for admission up front once a tool used it in two calls in a row, so a tool whose
destination changes per call does not hold places at destinations it will not use.
Waiting calls are served per tenant (the auth context's label), least-served tenant first.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

from toolpool._auth_context import AuthContext

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool._pool import Pool
    from toolpool.resilience._layer import PolicyRuntime

__all__ = ["Admission", "Held"]

# When the current tool call's admission waits must end (set by `hold` for the call's body,
# read by `tool_call_scope` when a request reaches a destination not admitted up front).
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "toolpool_admission_deadline", default=None
)


class Held:
    """What `hold` did for one tool call: `waited` is True if the call had to queue behind
    more calls than the destination's capacity (limit + queue bound) holds (the adapters
    then narrow their tool-call concurrency)."""

    __slots__ = ("waited",)

    def __init__(self) -> None:
        self.waited = False

    def note_wait(self) -> None:
        self.waited = True


log = logging.getLogger("toolpool.adapters")

monotonic = time.monotonic


class _Learned:
    """Tool name -> destinations its traffic reached, for one pool (shared by its gates)."""

    __slots__ = ("lock", "tools")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tools: dict[str, frozenset[str]] = {}


_learned_by_pool: weakref.WeakKeyDictionary[Pool, _Learned] = weakref.WeakKeyDictionary()
_learned_lock = threading.Lock()


def _learned_of(pool: Pool) -> _Learned:
    with _learned_lock:
        learned = _learned_by_pool.get(pool)
        if learned is None:
            learned = _learned_by_pool[pool] = _Learned()
        return learned


class Admission:
    """Gates tool calls on the saturation of the destinations they use.

    ```python
    admission = Admission(pool, max_wait=5.0)
    admission.declare("search_crm", ["crm"])       # optional: learned from traffic otherwise
    async with admission.hold("search_crm"):       # waits while 'crm' is saturated, or raises
        result = await search_crm(...)             # counted against 'crm' capacity meanwhile
    ```

    `max_wait` bounds the total wait of one call (seconds); 0 checks without waiting.
    Destinations learned from traffic are shared by all `Admission`s of the same pool (an
    agent wrapped per task starts with what earlier ones learned); declared ones are this
    gate's own.
    """

    def __init__(self, pool: Pool, *, max_wait: float = 5.0) -> None:
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        self.pool = pool
        self.max_wait = float(max_wait)
        self._lock = threading.Lock()
        shared = _learned_of(pool)
        self._learned_lock = shared.lock
        self._learned = shared.tools
        self._declared: dict[str, frozenset[str]] = {}
        # The destinations each tool's last finished call used.
        self._last_used: dict[str, frozenset[str]] = {}

    def __repr__(self) -> str:
        return f"<Admission max_wait={self.max_wait:g} tools={sorted(self._tools())}>"

    def _tools(self) -> set[str]:
        return set(self._learned) | set(self._declared)

    # ------------------------------------------------------------------ what a tool uses

    def learn(self, tool_name: str, destination: str) -> None:
        """Record that `tool_name`'s traffic went to `destination` (called by the scope)."""
        known = self._learned.get(tool_name)
        if known is not None and destination in known:
            return
        with self._learned_lock:
            known = self._learned.get(tool_name, frozenset())
            self._learned[tool_name] = known | {destination}
        log.debug("tool %r uses destination %r", tool_name, destination)

    def settle(self, tool_name: str, used: Iterable[str]) -> None:
        """A call of `tool_name` ended having used `used`: keep as learned only the
        destinations it shares with the tool's previous call (called by the scope)."""
        now = frozenset(used)
        with self._lock:
            before = self._last_used.get(tool_name, now)
            self._last_used[tool_name] = now
            self._learned[tool_name] = now & before

    def remaining(self, started: float) -> float:
        """Seconds a call that started at `started` may still wait for admission (the
        `hold` around it sets the deadline; otherwise `max_wait` from `started`)."""
        deadline = _deadline.get()
        if deadline is None:
            deadline = started + self.max_wait
        return max(0.0, deadline - monotonic())

    def declare(self, tool_name: str, destinations: Iterable[str]) -> None:
        """Declare the destinations `tool_name` uses (names or URLs), before any traffic."""
        if isinstance(destinations, str):
            raise TypeError("declare() takes an iterable of destination names, not one str")
        names = frozenset(destinations)
        with self._lock:
            self._declared[tool_name] = self._declared.get(tool_name, frozenset()) | names

    def destinations(self, tool_name: str) -> frozenset[str]:
        """The destinations `tool_name` is known to use (declared and learned)."""
        return self._learned.get(tool_name, frozenset()) | self._declared.get(
            tool_name, frozenset()
        )

    # ------------------------------------------------------------------ admission

    def _dests(self, tool_name: str) -> list[DestinationPool]:
        """The tool's destinations that the pool knows (declared ones may not exist yet),
        once each, in name order (the order every hold is admitted in)."""
        found: dict[str, DestinationPool] = {}
        for name in self.destinations(tool_name):
            try:
                dest = self.pool.destination(name)
            except KeyError:
                continue  # declared, never used yet: nothing to be saturated
            found[dest.name] = dest
        return [found[name] for name in sorted(found)]

    @contextlib.asynccontextmanager
    async def hold(self, tool_name: str, ctx: AuthContext | None = None) -> AsyncIterator[Held]:
        """Be admitted to every destination of `tool_name` and stay admitted (counted against
        their capacity) for the enclosed tool call, acting for `ctx` (its turn at each
        gate; default: the current auth context). Waits at most `max_wait` seconds in total,
        then raises `PoolSaturated` (with `retry_after` and `reason`). The enclosed body's
        requests to destinations not admitted here wait within the same `max_wait`."""
        holding = _Holding(self.max_wait, ctx)
        try:
            for runtime in holding.to_admit(self, tool_name):
                await runtime.admit_async(
                    holding.remaining(), holding.tenant, holding.held.note_wait, strict=True
                )
                holding.admitted(runtime)
            yield holding.held
        finally:
            holding.release()

    @contextlib.contextmanager
    def hold_sync(self, tool_name: str, ctx: AuthContext | None = None) -> Iterator[Held]:
        """`hold` for sync tool calls (blocks the calling thread while waiting)."""
        holding = _Holding(self.max_wait, ctx)
        try:
            for runtime in holding.to_admit(self, tool_name):
                runtime.admit_blocking(
                    holding.remaining(), holding.tenant, holding.held.note_wait, strict=True
                )
                holding.admitted(runtime)
            yield holding.held
        finally:
            holding.release()

    async def admit(self, tool_name: str) -> None:
        """Wait until every destination of `tool_name` admits a call, then let go at once;
        `PoolSaturated` after `max_wait` seconds if one stays saturated. Prefer `hold`."""
        async with self.hold(tool_name):
            pass

    def admit_sync(self, tool_name: str) -> None:
        """`admit` for sync tool calls (blocks the calling thread). Prefer `hold_sync`."""
        with self.hold_sync(tool_name):
            pass


class _Holding:
    """One `hold` / `hold_sync` in progress: its deadline, its tenant, the destinations it was
    admitted to (and marked as admitted here), released in `release`. The two hold methods
    are only the I/O shells around it (await vs block at each gate)."""

    __slots__ = ("deadline", "held", "marks", "runtimes", "tenant", "token")

    def __init__(self, max_wait: float, ctx: AuthContext | None) -> None:
        self.held = Held()
        self.deadline = monotonic() + max_wait
        self.tenant = _label(ctx)
        self.runtimes: list[PolicyRuntime] = []
        self.token = _deadline.set(self.deadline)
        self.marks: list[contextvars.Token[frozenset[int]] | None] = []

    def to_admit(self, admission: Admission, tool_name: str) -> Iterator[PolicyRuntime]:
        """The runtimes of `tool_name`'s destinations, lazily, skipping those the current
        task or thread is already admitted to (a nested call inside one admitted here)."""
        from toolpool.resilience._admission_control import admitted_here

        for dest in admission._dests(tool_name):
            runtime = admission.pool.policy_runtime(dest)
            if not admitted_here(runtime):
                yield runtime

    def remaining(self) -> float:
        return max(0.0, self.deadline - monotonic())

    def admitted(self, runtime: PolicyRuntime) -> None:
        from toolpool.resilience._admission_control import mark_admitted

        self.runtimes.append(runtime)
        self.marks.append(mark_admitted(runtime))

    def release(self) -> None:
        from toolpool.resilience._admission_control import unmark_admitted

        for mark in reversed(self.marks):
            unmark_admitted(mark)
        for runtime in self.runtimes:
            runtime.release_admission()
        _deadline.reset(self.token)


def _label(ctx: AuthContext | None) -> str | None:
    """The tenant a call's turn at a gate belongs to (the current context by default)."""
    if ctx is None:
        from toolpool._auth_context import current_auth

        ctx = current_auth()
    return ctx.label if ctx is not None else None
