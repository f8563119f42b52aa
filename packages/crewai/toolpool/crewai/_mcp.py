"""CrewAI's native MCP tools (`Agent(mcps=[MCPServerHTTP(...)])`) on pooled MCP sessions.

CrewAI builds an `MCPNativeTool` per MCP tool whose every call creates a new MCP client on a
new event loop (`asyncio.run`): initialize, the initialized notification, the call, a DELETE,
and on a stateful server a GET event stream, for each call, over connections that cannot be
reused. A wrapped crew runs the tools of streamable HTTP servers on `toolpool.mcp` sessions
instead (one per server and tenant, on the long-lived tool loop), and gives every failure
back as CrewAI's tool error text: a busy pool raises `ToolBusy` ("... busy, retry in N s"),
a dead session or a server gone is a `ToolFailure` the model reads ("could not run: MCP server
... unavailable"), within the server's 30 s operation timeout. Stdio and SSE servers keep
CrewAI's own path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from toolpool import Pool
from toolpool.adapters import find_busy
from toolpool.mcp import McpServer, failure_message, sessions_of

try:
    from crewai.mcp.content import content_blocks_to_text
    from crewai.mcp.transports.http import HTTPTransport
    from crewai.tools.mcp_native_tool import MCPNativeTool
    from crewai.tools.tool_failure import ToolFailure, ToolFailureReason
except ImportError:  # pragma: no cover - CrewAI without its MCP support
    MCPNativeTool = None  # type: ignore[assignment,misc]

__all__ = ["pooled_mcp_run"]

log = logging.getLogger("toolpool.crewai")


def _server_of(tool: Any) -> McpServer | None:
    """The streamable HTTP server behind an `MCPNativeTool`, or None (not one, or stdio/SSE).

    The tool keeps only a factory of clients; one client is built (not connected) to read its
    transport's settings."""
    try:
        client = tool._client_factory()
    except Exception as exc:  # a factory we cannot call: leave the tool on CrewAI's path
        log.debug("MCP tool %r left unpooled: %s", getattr(tool, "name", "?"), exc)
        return None
    transport = getattr(client, "transport", None)
    if not isinstance(transport, HTTPTransport) or not transport.streamable:
        return None
    headers = {str(k): str(v) for k, v in (transport.headers or {}).items()}
    return McpServer(transport.url, headers=headers, name=getattr(tool, "server_name", None))


def pooled_mcp_run(tool: Any, pool: Pool) -> Callable[..., Coroutine[Any, Any, Any]] | None:
    """A `_run` for `tool` that calls it on `pool`'s MCP sessions, or None if `tool` is not a
    CrewAI MCP tool of a streamable HTTP server. It returns a coroutine, which the wrapped
    tool runs on the long-lived tool loop (where the sessions live)."""
    if MCPNativeTool is None or not isinstance(tool, MCPNativeTool):
        return None
    server = _server_of(tool)
    if server is None:
        return None
    sessions = sessions_of(pool)
    name = tool.original_tool_name
    details = {"server": tool.server_name, "tool": name}

    async def call(**kwargs: Any) -> Any:
        try:
            result = await sessions.call_tool(server, name, kwargs)
        except Exception as exc:
            if find_busy(exc) is not None:
                raise  # the wrapper raises ToolBusy: "... busy, retry in N s"
            text = failure_message(exc, tool.name)
            if text is None:
                raise
            return ToolFailure(message=text, reason=ToolFailureReason.MCP_ERROR, details=details)
        content = content_blocks_to_text(result.content) if result.content else ""
        if result.isError:
            return ToolFailure(message=content, reason=ToolFailureReason.MCP_ERROR, details=details)
        return content

    def run(**kwargs: Any) -> Coroutine[Any, Any, Any]:
        return call(**kwargs)

    return run
