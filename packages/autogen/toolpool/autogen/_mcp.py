"""A pooled `McpWorkbench`: its MCP sessions pooled per tenant by `toolpool.mcp`.

An `McpWorkbench` keeps one MCP session for all its callers. Pooled, an HTTP `McpWorkbench`
gets one session per `AuthContext` instead, so that each tenant's calls carry that tenant's
credentials and connections:

- streamable HTTP servers: sessions of `toolpool.mcp.McpSessions` (initialized once per
  tenant, `tools/list` cached, idle TTL, errored sessions discarded), called directly; every
  failure (a busy pool, a dead session, a server gone) comes back as the call's error
  `ToolResult`, within the server params' `timeout`, never as a hang of the agent's run.
  Their tools are not held at admission: a session's requests are sent by its own task,
  outside the tool call, so the pool's queue bounds them (a full queue is a prompt "busy");
- legacy SSE servers: one `McpWorkbench` per tenant, started inside the tenant's pooled scope
  (its actor's tasks, created then, keep that scope), at most `max_sessions`.

Stdio servers have no HTTP traffic to pool; `PooledWorkbench` treats them like any other
workbench.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from autogen_core import CancellationToken, Image
from autogen_core.tools import (
    ImageResultContent,
    ParametersSchema,
    TextResultContent,
    ToolResult,
    ToolSchema,
)

from toolpool import mcp as pooled_mcp
from toolpool._auth_context import AuthContext
from toolpool._pool import Pool
from toolpool.adapters import Admission, atool_call_scope, find_busy

try:  # autogen-ext's MCP support needs the `mcp` package (autogen-ext[mcp])
    from autogen_ext.tools.mcp import McpWorkbench, SseServerParams, StreamableHttpServerParams
    from mcp.types import ImageContent, TextContent
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


class _WorkbenchPerTenant:
    """Legacy SSE servers: one `McpWorkbench` per tenant (see the module docstring). Built only
    by `McpSessions`, which has checked `max_sessions`."""

    def __init__(
        self,
        template: McpWorkbench,
        pool: Pool,
        admission: Admission,
        *,
        pool_httpx: bool,
        max_sessions: int,
    ) -> None:
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


class McpSessions:
    """The per-tenant MCP sessions of one pooled `McpWorkbench` (`template`)."""

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
        params = template.server_params
        self._sessions: pooled_mcp.McpSessions | None = None
        self._legacy: _WorkbenchPerTenant | None = None
        if isinstance(params, StreamableHttpServerParams):
            self._sessions = pooled_mcp.McpSessions(pool, max_sessions=max_sessions)
            self._server = pooled_mcp.McpServer(
                params.url,
                headers={k: str(v) for k, v in (params.headers or {}).items()},
                timeout=params.timeout,
            )
        else:
            self._legacy = _WorkbenchPerTenant(
                template, pool, admission, pool_httpx=pool_httpx, max_sessions=max_sessions
            )

    @property
    def sessions(self) -> pooled_mcp.McpSessions | None:
        """The `toolpool.mcp` sessions (None for a legacy SSE server)."""
        return self._sessions

    def __len__(self) -> int:
        if self._sessions is not None:
            return self._sessions.stats().open
        assert self._legacy is not None
        return len(self._legacy)

    def contexts(self) -> list[AuthContext | None]:
        """The auth contexts that have a live session, least recently used first."""
        if self._sessions is not None:
            return self._sessions.contexts()
        assert self._legacy is not None
        return self._legacy.contexts()

    async def list_tools(self, ctx: AuthContext | None) -> list[ToolSchema]:
        """The server's tools as AutoGen schemas, with the workbench's overrides."""
        if self._legacy is not None:
            async with self._legacy.use(ctx) as session:
                return await session.list_tools()
        assert self._sessions is not None
        tools = await self._sessions.list_tools(self._server, ctx=ctx)
        overrides = self._template._tool_overrides
        schemas: list[ToolSchema] = []
        for tool in tools:
            name, description = tool.name, tool.description or ""
            override = overrides.get(tool.name)
            if override is not None:
                name = override.name if override.name is not None else name
                if override.description is not None:
                    description = override.description
            schemas.append(
                ToolSchema(
                    name=name,
                    description=description,
                    parameters=ParametersSchema(
                        type="object",
                        properties=tool.inputSchema.get("properties", {}),
                        required=tool.inputSchema.get("required", []),
                        additionalProperties=tool.inputSchema.get("additionalProperties", False),
                    ),
                )
            )
        return schemas

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None,
        ctx: AuthContext | None,
    ) -> ToolResult:
        """One call on `ctx`'s session. A busy pool raises (the workbench answers "busy,
        retry in N s" and lowers its limit); every other failure is the call's error result."""
        if self._legacy is not None:
            async with self._legacy.use(ctx) as session:
                return await session.call_tool(name, arguments, cancellation_token, call_id)
        assert self._sessions is not None
        original = self._template._override_name_to_original.get(name, name)
        try:
            result = await self._sessions.call_tool(self._server, original, arguments, ctx=ctx)
        except Exception as exc:
            if find_busy(exc) is not None:
                raise
            text = pooled_mcp.failure_message(exc, name)
            if text is None:
                raise
            log.debug("%s", text)
            return _text(name, text, is_error=True)
        parts: list[TextResultContent | ImageResultContent] = []
        for content in result.content:
            if isinstance(content, TextContent):
                parts.append(TextResultContent(content=content.text))
            elif isinstance(content, ImageContent):
                parts.append(ImageResultContent(content=Image.from_base64(content.data)))
            else:  # resources and the rest: their JSON, as McpWorkbench does
                parts.append(TextResultContent(content=content.model_dump_json()))
        return ToolResult(name=name, result=parts, is_error=bool(result.isError))

    async def stop(self) -> None:
        """End every session."""
        if self._sessions is not None:
            await self._sessions.aclose()
        if self._legacy is not None:
            await self._legacy.stop()


def _text(name: str, text: str, *, is_error: bool) -> ToolResult:
    return ToolResult(name=name, result=[TextResultContent(content=text)], is_error=is_error)


_NONE: Any = object()


async def _stop_quietly(workbench: McpWorkbench) -> None:
    try:
        await workbench.stop()
    except Exception as exc:  # a session whose server went away: nothing left to stop
        log.debug("stopping an MCP session failed: %s", exc)
