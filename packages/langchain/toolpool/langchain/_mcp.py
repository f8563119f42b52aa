"""`mcp_client_factory`: pooled httpx clients for langchain-mcp-adapters' MCP connections.

langchain-mcp-adapters opens an MCP session (and a new httpx client) for every tool call and
closes it afterwards: without a pool, each call pays a TCP (and TLS) handshake. Its
`"httpx_client_factory"` connection setting takes a function that builds that client; this
module's factory builds one on the toolpool pool, whose `aclose()` leaves the pool open.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from toolpool._pool import Pool
from toolpool._transport import AsyncTransport
from toolpool.adapters import current_tool_call
from toolpool.adapters._scope import _ScopedAsyncTransport

__all__ = ["McpClientFactory", "mcp_client_factory"]

# MCP's own defaults: operations answer within 30 s, an SSE response stream may stay quiet
# for 5 minutes. Waiting for a pooled connection is bounded by the pool's acquire_timeout.
_MCP_TIMEOUT = httpx.Timeout(30.0, read=300.0, pool=None)

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

    Requests act for the auth context current when they are sent (the tool call's tenant in
    a wrapped agent), so an MCP server is reached over connections of that tenant only.
    """

    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        auth: httpx.Auth | None = None,
    ) -> httpx.AsyncClient:
        call = current_tool_call()
        transport: AsyncTransport = (
            _ScopedAsyncTransport(pool, call) if call is not None else AsyncTransport(pool)
        )
        if timeout is None:
            timeout = _MCP_TIMEOUT
        return httpx.AsyncClient(transport=transport, headers=headers, timeout=timeout, auth=auth)

    return factory
