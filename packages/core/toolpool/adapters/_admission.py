"""Admission per tool call: wait (boundedly) while a destination the tool uses is saturated.

Which destinations a tool uses is learned from its pooled traffic (`tool_call_scope` reports
it) or declared up front. Before a tool call runs, `admit` checks each of them; while one is
saturated (its wait queue is full, so a new request would be refused at once) the call waits,
up to `max_wait` in total, and then gives up with `PoolSaturated` carrying a retry-after that
adapters turn into a readable "busy, retry in N s" tool result.

When the pool offers the resilience admission API (`pool.admit` / `pool.admit_sync`), that is
used; otherwise the destination's state is read under its lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from toolpool.errors import PoolSaturated

if TYPE_CHECKING:
    from toolpool._pool import Pool
    from toolpool._runtime import DestinationPool

__all__ = ["Admission"]

log = logging.getLogger("toolpool.adapters")

monotonic = time.monotonic

# How often a waiting call looks at the destination again when the pool has no admission
# API: often enough to follow a queue that drains in tens of milliseconds, rarely enough to
# cost nothing next to a tool call.
_POLL_MIN = 0.005
_POLL_MAX = 0.05


class Admission:
    """Gates tool calls on the saturation of the destinations they use.

    ```python
    admission = Admission(pool, max_wait=5.0)
    admission.declare("search_crm", ["crm"])       # optional: learned from traffic otherwise
    await admission.admit("search_crm")            # waits while 'crm' is saturated, or raises
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

    def _resolve(self, name: str) -> DestinationPool | None:
        try:
            return self.pool.destination(name)
        except KeyError:
            return None  # declared but never used yet: nothing to be saturated

    async def admit(self, tool_name: str) -> None:
        """Wait until no destination of `tool_name` is saturated; `PoolSaturated` after
        `max_wait` seconds if one stays saturated."""
        deadline = monotonic() + self.max_wait
        for name in sorted(self.destinations(tool_name)):
            dest = self._resolve(name)
            if dest is None:
                continue
            remaining = max(0.0, deadline - monotonic())
            pool_admit: Any = getattr(self.pool, "admit", None)
            if pool_admit is not None:
                async with pool_admit(dest.name, timeout=remaining):
                    pass
                continue
            while _saturated(dest):
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise _refusal(dest)
                await asyncio.sleep(_poll_delay(dest, remaining))

    def admit_sync(self, tool_name: str) -> None:
        """`admit` for sync tool calls (blocks the calling thread)."""
        deadline = monotonic() + self.max_wait
        for name in sorted(self.destinations(tool_name)):
            dest = self._resolve(name)
            if dest is None:
                continue
            remaining = max(0.0, deadline - monotonic())
            pool_admit: Any = getattr(self.pool, "admit_sync", None)
            if pool_admit is not None:
                with pool_admit(dest.name, timeout=remaining):
                    pass
                continue
            while _saturated(dest):
                remaining = deadline - monotonic()
                if remaining <= 0:
                    raise _refusal(dest)
                time.sleep(_poll_delay(dest, remaining))


def _saturated(dest: DestinationPool) -> bool:
    """A new request would be refused at once: at the cap with a full wait queue."""
    with dest.lock:
        st = dest.state
        return st.total >= st.cap and st.waiting >= st.limits.queue_limit


def _poll_delay(dest: DestinationPool, remaining: float) -> float:
    with dest.lock:
        hint = dest.state.retry_after()
    return max(_POLL_MIN, min(_POLL_MAX, hint, remaining))


def _refusal(dest: DestinationPool) -> PoolSaturated:
    with dest.lock:
        st = dest.state
        return PoolSaturated(
            dest.name,
            in_use=st.in_use,
            waiting=st.waiting,
            max_connections=st.limits.max_connections,
            queue_limit=st.limits.queue_limit,
            retry_after=round(st.retry_after(), 3),
            reason="admission",
        )
