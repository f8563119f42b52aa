"""One MCP session per tenant for a pooled `McpWorkbench`, its HTTP traffic on the pool.

An `McpWorkbench` (streamable HTTP or SSE) keeps one long-lived MCP session, and its HTTP
requests are sent by tasks its session actor starts when the workbench starts. Context
variables are copied into tasks when they are created, so a session started inside
`atool_call_scope(pool, ctx)` sends all its traffic through the pool's transport, for `ctx`:
with the destination's auth provider (a token per tenant) and on `ctx`'s own connections.
A tenant's calls therefore need that tenant's session: `McpSessions` starts one per
`AuthContext` on first use, from the wrapped workbench's configuration, and stops them all
(or the least recently used idle one, beyond `max_sessions`).

Each live session holds one pooled connection for its server-to-client event stream (the MCP
streamable HTTP GET), in addition to its requests: size the MCP destination's
`max_connections` for the number of tenants active at once. Stdio servers have no HTTP
traffic to pool; `PooledWorkbench` treats them like any other workbench.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from toolpool._auth_context import AuthContext
from toolpool._pool import Pool
from toolpool.adapters import Admission, atool_call_scope

try:  # autogen-ext's MCP support needs the `mcp` package (autogen-ext[mcp])
    from autogen_ext.tools.mcp import McpWorkbench, SseServerParams, StreamableHttpServerParams
except ImportError:  # pragma: no cover - exercised only without the mcp package
    McpWorkbench = None  # type: ignore[assignment,misc]

__all__ = ["DEFAULT_MAX_MCP_SESSIONS", "McpSessions", "is_http_mcp_workbench"]

log = logging.getLogger("toolpool.autogen")

# Each session holds a connection and server state; 32 tenants active at once per workbench
# covers a busy agent, and the least recently used idle session is closed beyond that.
DEFAULT_MAX_MCP_SESSIONS = 32


def is_http_mcp_workbench(workbench: Any) -> bool:
    """Whether `workbench` is an `McpWorkbench` talking to its server over HTTP."""
    return McpWorkbench is not None and isinstance(
        getattr(workbench, "server_params", None), SseServerParams | StreamableHttpServerParams
    )


class _Session:
    __slots__ = ("in_flight", "lock", "workbench")

    def __init__(self) -> None:
        self.workbench: McpWorkbench | None = None
        self.lock = asyncio.Lock()
        self.in_flight = 0


class McpSessions:
    """The per-tenant sessions of one pooled `McpWorkbench` (`template`)."""

    def __init__(
        self,
        template: McpWorkbench,
        pool: Pool,
        admission: Admission,
        *,
        pool_httpx: bool,
        max_sessions: int = DEFAULT_MAX_MCP_SESSIONS,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions!r}")
        self._template = template
        self._pool = pool
        self._admission = admission
        self._pool_httpx = pool_httpx
        self._max = max_sessions
        self._sessions: OrderedDict[AuthContext | None, _Session] = OrderedDict()

    def __len__(self) -> int:
        return sum(1 for s in self._sessions.values() if s.workbench is not None)

    def contexts(self) -> list[AuthContext | None]:
        """The auth contexts that have a live session, least recently used first."""
        return [ctx for ctx, s in self._sessions.items() if s.workbench is not None]

    @asynccontextmanager
    async def use(self, ctx: AuthContext | None) -> AsyncIterator[McpWorkbench]:
        """`ctx`'s session (started on first use), held for the enclosed call."""
        session = self._sessions.get(ctx)
        if session is None:
            session = self._sessions[ctx] = _Session()
        self._sessions.move_to_end(ctx)
        session.in_flight += 1
        try:
            if session.workbench is None:
                async with session.lock:
                    if session.workbench is None:
                        session.workbench = await self._start(ctx)
            yield session.workbench
        finally:
            session.in_flight -= 1
        await self._evict()

    async def _start(self, ctx: AuthContext | None) -> McpWorkbench:
        template = self._template
        workbench = McpWorkbench(
            server_params=template.server_params,
            tool_overrides=dict(template._tool_overrides),
            model_client=template._model_client,
        )
        label = ctx.label if ctx is not None else "no auth context"
        name = f"mcp session ({label})"
        # Started inside the scope: the session actor's tasks, created now, keep its context.
        async with atool_call_scope(
            self._pool, ctx, tool_name=name, pool_httpx=self._pool_httpx
        ) as call:
            await workbench.start()
            try:
                tools = await workbench.list_tools()  # returns once the session is initialized
            except BaseException:
                await _stop_quietly(workbench)
                raise
        # Admission for the session's tools: the destinations its traffic went to.
        for tool in tools:
            self._admission.declare(tool["name"], call.destinations)
        log.debug("started %s over %s", name, sorted(call.destinations))
        return workbench

    async def _evict(self) -> None:
        while len(self) > self._max:
            victim = next(
                (
                    ctx
                    for ctx, s in self._sessions.items()
                    if s.workbench is not None and s.in_flight == 0 and not s.lock.locked()
                ),
                _NONE,
            )
            if victim is _NONE:
                return  # every session is busy: keep them, the next call tries again
            session = self._sessions.pop(victim)
            if session.workbench is not None:
                await _stop_quietly(session.workbench)

    async def stop(self) -> None:
        """Stop every session."""
        sessions, self._sessions = list(self._sessions.values()), OrderedDict()
        for session in sessions:
            if session.workbench is not None:
                await _stop_quietly(session.workbench)


_NONE: Any = object()


async def _stop_quietly(workbench: McpWorkbench) -> None:
    try:
        await workbench.stop()
    except Exception as exc:  # a session whose server went away: nothing left to stop
        log.debug("stopping an MCP session failed: %s", exc)
