"""MCP tools for LangChain on the pool: pooled sessions (`mcp_tools`), or pooled connections
under langchain-mcp-adapters' own per-call sessions (`mcp_client_factory`).

langchain-mcp-adapters opens an MCP session for every tool call (initialize, the initialized
notification, the call, a DELETE; on a stateful server also a GET event stream) and closes it
afterwards. `mcp_tools(pool, connections)` builds the same LangChain tools on
`toolpool.mcp` sessions instead: one initialized session per (server, tenant), reused by every
call of that tenant, `tools/list` cached. Inside a wrapped agent (`toolpool.langchain.wrap` /
`ToolpoolMiddleware`) every failure is a `ToolMessage(status="error")`: a busy pool reads
"busy, retry in N s" (and lowers the agent's parallel-call limit), a dead session or a server
gone reads "could not run: MCP server ... unavailable"; nothing hangs (each call is bounded by
the connection's `timeout`, 30 s by default) and nothing leaves the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx

from toolpool import AuthContext, Pool
from toolpool.adapters import find_busy, mcp_transport
from toolpool.errors import ConfigError
from toolpool.mcp import McpServer, McpSessions, failure_message, sessions_of

__all__ = ["McpClientFactory", "mcp_client_factory", "mcp_tools"]

# MCP's own defaults: operations answer within 30 s, an SSE response stream may stay quiet
# for 5 minutes. Waiting for a pooled connection is bounded by the pool's acquire_timeout.
_MCP_TIMEOUT = httpx.Timeout(30.0, read=300.0, pool=None)
_HTTP_TRANSPORTS = ("streamable_http", "streamable-http", "http")

McpClientFactory = Callable[..., httpx.AsyncClient]


def mcp_client_factory(pool: Pool) -> McpClientFactory:
    """A factory for langchain-mcp-adapters' `"httpx_client_factory"` that pools on `pool`.

    ```python
    client = MultiServerMCPClient({
        "crm": {
            "transport": "streamable_http",
            "url": "http://127.0.0.1:8000/mcp",
            "httpx_client_factory": toolpool.langchain.mcp_client_factory(pool),
        },
    })
    tools = await client.get_tools()   # pooled; inside a wrapped agent, per tenant
    ```

    Connections are pooled, sessions still open per call (prefer `mcp_tools`, which pools the
    sessions too). Requests act for the auth context current when they are sent (the tool
    call's tenant in a wrapped agent). A busy pool answers the MCP request it refused with an
    error instead of killing the session's tasks, and a wrapped agent turns it into "busy,
    retry in N s"; the session's GET event stream only opens while the destination has room.
    """

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        auth: httpx.Auth | None = None,
    ) -> httpx.AsyncClient:
        transport = mcp_transport(pool)
        if timeout is None:
            timeout = _MCP_TIMEOUT
        return httpx.AsyncClient(transport=transport, headers=headers, timeout=timeout, auth=auth)

    return factory


class _PooledSession:
    """What langchain-mcp-adapters' tools call as their session: one `call_tool`, sent on the
    pooled session of the caller's auth context."""

    def __init__(self, sessions: McpSessions, server: McpServer) -> None:
        self._sessions = sessions
        self._server = server

    async def call_tool(self, name: str, arguments: Any = None, **_: Any) -> Any:
        from mcp.types import CallToolResult, TextContent

        try:
            return await self._sessions.call_tool(self._server, name, arguments or {})
        except Exception as exc:
            if find_busy(exc) is not None:
                raise  # the wrapped agent answers "busy, retry in N s" and slows down
            text = failure_message(exc, name)
            if text is None:
                raise
            # An error result: langchain-mcp-adapters raises it as a ToolException, which
            # the tool turns into ToolMessage(status="error") for the model.
            return CallToolResult(content=[TextContent(type="text", text=text)], isError=True)


async def mcp_tools(
    pool: Pool,
    connections: Any,
    *,
    ctx: AuthContext | None = None,
    sessions: McpSessions | None = None,
    tool_interceptors: list[Any] | None = None,
    tool_name_prefix: bool = False,
) -> list[Any]:
    """LangChain tools for the MCP servers in `connections`, on pooled MCP sessions.

    ```python
    tools = await toolpool.langchain.mcp_tools(
        pool, {"crm": {"transport": "streamable_http", "url": "http://127.0.0.1:8000/mcp"}},
        ctx=toolpool.AuthContext(tenant="acme"),      # whose session lists the tools
    )
    agent = toolpool.langchain.wrap(create_agent(model, tools), pool, auth=...)
    ```

    `connections`: langchain-mcp-adapters' connection dicts by server name, or a
    `MultiServerMCPClient` (its connections and tool interceptors are used). Streamable HTTP
    or legacy SSE servers (`"transport": "streamable_http"` or `"sse"`, `"url"`, optional
    `"headers"` and `"timeout"`); per-tenant credentials come
    from the destination's auth provider, not from headers. `ctx` is the auth context the
    tools are listed for (None: the current one); each call then runs on the session of the
    calling run's tenant. `sessions`: default `toolpool.mcp.sessions_of(pool)`.
    """
    if hasattr(connections, "connections"):
        if tool_interceptors is None:
            tool_interceptors = getattr(connections, "tool_interceptors", None)
        connections = connections.connections
    if not isinstance(connections, Mapping):
        raise ConfigError("mcp_tools takes {server name: connection dict} or MultiServerMCPClient")
    from langchain_mcp_adapters.tools import convert_mcp_tool_to_langchain_tool

    pooled = sessions if sessions is not None else sessions_of(pool)
    tools: list[Any] = []
    for server_name, connection in connections.items():
        server = _server(server_name, connection)
        session = _PooledSession(pooled, server)
        kwargs: dict[str, Any] = {} if ctx is None else {"ctx": ctx}
        for tool in await pooled.list_tools(server, **kwargs):
            tools.append(
                convert_mcp_tool_to_langchain_tool(
                    session,  # type: ignore[arg-type]
                    tool,
                    server_name=server_name,
                    tool_interceptors=tool_interceptors,
                    tool_name_prefix=tool_name_prefix,
                )
            )
    return tools


def _server(name: str, connection: Mapping[str, Any]) -> McpServer:
    transport = connection.get("transport")
    if transport not in (*_HTTP_TRANSPORTS, "sse") or "url" not in connection:
        raise ConfigError(
            f"MCP server {name!r}: mcp_tools pools HTTP servers "
            f"({{'transport': 'streamable_http' or 'sse', 'url': ...}}), not {transport!r}; "
            f"use langchain-mcp-adapters directly for it"
        )
    timeout = connection.get("timeout", 30.0)
    seconds = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout)
    headers = {str(k): str(v) for k, v in (connection.get("headers") or {}).items()}
    return McpServer(
        str(connection["url"]),
        headers=headers,
        timeout=seconds,
        name=name,
        transport="sse" if transport == "sse" else "streamable_http",
    )
