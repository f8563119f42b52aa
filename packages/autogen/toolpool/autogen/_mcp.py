"""A pooled `McpWorkbench`: its MCP sessions pooled per tenant by `toolpool.mcp`.

An `McpWorkbench` keeps one MCP session for all its callers. Pooled, an HTTP `McpWorkbench`
gets one session per `AuthContext` instead, so that each tenant's calls carry that tenant's
credentials and connections:

- streamable HTTP and legacy SSE servers (`StreamableHttpServerParams`, `SseServerParams`)
  alike: sessions of `toolpool.mcp.McpSessions` (initialized once per tenant, `tools/list`
  cached, idle TTL, errored sessions discarded), called directly; every failure (a busy
  pool, a dead session, a server gone) comes back as the call's error `ToolResult`, within
  the server params' `timeout`, never as a hang of the agent's run. An SSE session's GET
  stream carries its answers and holds one connection for the session's life. Their tools
  are not held at admission: a session's requests are sent by its own task, outside the
  tool call, so the pool's queue bounds them (a full queue is a prompt "busy").

Stdio servers have no HTTP traffic to pool; `PooledWorkbench` treats them like any other
workbench.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from autogen_core import CancellationToken, Image
from autogen_core.tools import (
    ImageResultContent,
    ParametersSchema,
    TextResultContent,
    ToolResult,
    ToolSchema,
)

from toolpool import AuthContext, Pool
from toolpool import mcp as pooled_mcp
from toolpool.adapters import Admission, find_busy

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
        assert isinstance(params, SseServerParams | StreamableHttpServerParams), params
        self._sessions = pooled_mcp.McpSessions(pool, max_sessions=max_sessions)
        self._server = pooled_mcp.McpServer(
            params.url,
            headers={k: str(v) for k, v in (params.headers or {}).items()},
            timeout=params.timeout,
            transport="sse" if isinstance(params, SseServerParams) else "streamable_http",
        )

    @property
    def sessions(self) -> pooled_mcp.McpSessions:
        """The `toolpool.mcp` sessions."""
        return self._sessions

    def __len__(self) -> int:
        return self._sessions.stats().open

    def contexts(self) -> list[AuthContext | None]:
        """The auth contexts that have a live session, least recently used first."""
        return self._sessions.contexts()

    async def list_tools(self, ctx: AuthContext | None) -> list[ToolSchema]:
        """The server's tools as AutoGen schemas, with the workbench's overrides."""
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
        await self._sessions.aclose()


def _text(name: str, text: str, *, is_error: bool) -> ToolResult:
    return ToolResult(name=name, result=[TextResultContent(content=text)], is_error=is_error)
