"""Admission per tool call: wait (boundedly) while a destination the tool uses is saturated.

Which destinations a tool uses is learned from its pooled traffic (`tool_call_scope` reports
it) or declared up front. Before a tool call runs, admission is asked of each of them through
the pool's admission API (`pool.admit` / `pool.admit_sync`, toolpool.resilience): while one is
saturated the call waits in FIFO order, up to `max_wait` in total, then gives up with
`PoolSaturated` carrying a retry-after that adapters turn into a readable "busy, retry in N s"
tool result.

`hold` / `hold_sync` keep the admissions for the whole tool call, so the pool counts the call
against the destination's capacity and its requests do not meet a full queue; `admit` /
`admit_sync` only wait for the gate to open and let go at once. Destinations are admitted in
name order, so two calls never wait on each other's destinations crosswise.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["Admission"]

log = logging.getLogger("toolpool.adapters")

monotonic = time.monotonic


class Admission:
    """Gates tool calls on the saturation of the destinations they use.

    ```python
    admission = Admission(pool, max_wait=5.0)
    admission.declare("search_crm", ["crm"])       # optional: learned from traffic otherwise
    async with admission.hold("search_crm"):       # waits while 'crm' is saturated, or raises
        result = await search_crm(...)             # counted against 'crm' capacity meanwhile
    ```

    `max_wait` bounds the total wait of one call (seconds); 0 checks without waiting.
    """

    def __init__(self, pool: Pool, *, max_wait: float = 5.0) -> None:
        if not max_wait >= 0:
            raise ValueError(f"max_wait must be >= 0 seconds, got {max_wait!r}")
        self.pool = pool
        self.max_wait = float(max_wait)
        self._lock = threading.Lock()
        self._learned: dict[str, frozenset[str]] = {}
        self._declared: dict[str, frozenset[str]] = {}

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
        with self._lock:
            known = self._learned.get(tool_name, frozenset())
            self._learned[tool_name] = known | {destination}
        log.debug("tool %r uses destination %r", tool_name, destination)

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

    def _names(self, tool_name: str) -> list[str]:
        """The tool's destinations that the pool knows (declared ones may not exist yet)."""
        names = []
        for name in sorted(self.destinations(tool_name)):
            try:
                names.append(self.pool.destination(name).name)
            except KeyError:
                continue  # declared, never used yet: nothing to be saturated
        return sorted(set(names))

    @contextlib.asynccontextmanager
    async def hold(self, tool_name: str) -> AsyncIterator[None]:
        """Be admitted to every destination of `tool_name` and stay admitted (counted against
        their capacity) for the enclosed tool call. Waits at most `max_wait` seconds in
        total, then raises `PoolSaturated` (with `retry_after` and `reason`)."""
        deadline = monotonic() + self.max_wait
        async with contextlib.AsyncExitStack() as stack:
            for name in self._names(tool_name):
                remaining = max(0.0, deadline - monotonic())
                await stack.enter_async_context(self.pool.admit(name, timeout=remaining))
            yield

    @contextlib.contextmanager
    def hold_sync(self, tool_name: str) -> Iterator[None]:
        """`hold` for sync tool calls (blocks the calling thread while waiting)."""
        deadline = monotonic() + self.max_wait
        with contextlib.ExitStack() as stack:
            for name in self._names(tool_name):
                remaining = max(0.0, deadline - monotonic())
                stack.enter_context(self.pool.admit_sync(name, timeout=remaining))
            yield

    async def admit(self, tool_name: str) -> None:
        """Wait until every destination of `tool_name` admits a call, then let go at once;
        `PoolSaturated` after `max_wait` seconds if one stays saturated. Prefer `hold`."""
        async with self.hold(tool_name):
            pass

    def admit_sync(self, tool_name: str) -> None:
        """`admit` for sync tool calls (blocks the calling thread). Prefer `hold_sync`."""
        with self.hold_sync(tool_name):
            pass
