"""MCP tools (langchain-mcp-adapters, streamable HTTP) pooled per tenant, against a local
FastMCP server started by the test on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.interceptors import MCPToolCallRequest
from mcp.server.fastmcp import Context, FastMCP

import toolpool
from tests._support.langchain_tools import Ctx, by_context, calls
from toolpool.langchain import mcp_client_factory, wrap
from toolpool.langchain.testing import ScriptedChatModel

TENANTS = ("acme", "globex")


@dataclass
class McpServer:
    """A FastMCP server on a loopback port, recording which tenant each connection served."""

    url: str
    sse: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: list[tuple[int, str | None]] = field(default_factory=list)

    def connection_tenants(self) -> dict[int, set[str | None]]:
        with self.lock:
            out: dict[int, set[str | None]] = {}
            for port, tenant in self.requests:
                out.setdefault(port, set()).add(tenant)
            return out

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()


@pytest.fixture(scope="module", params=["json", "sse"])
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpServer]:
    """Answers as JSON bodies, or as SSE streams (which the MCP client closes after the
    answer, before their end: HTTP/1.1 cannot reuse such a connection)."""
    sse = request.param == "sse"
    mcp = FastMCP("crm", stateless_http=True, json_response=not sse, host="127.0.0.1")

    @mcp.tool()
    async def whoami(ctx: Context) -> str:  # type: ignore[type-arg]
        """Which connection and tenant carried this call."""
        request = ctx.request_context.request
        assert request is not None
        assert request.client is not None
        return json.dumps({"port": request.client.port, "tenant": request.headers.get("x-tenant")})

    app = mcp.streamable_http_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server_info = McpServer(url=f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", sse=sse)

    async def recording_app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            tenant = headers.get(b"x-tenant")
            with server_info.lock:
                server_info.requests.append(
                    (scope["client"][1], tenant.decode() if tenant is not None else None)
                )
        await app(scope, receive, send)

    server = uvicorn.Server(uvicorn.Config(recording_app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the MCP server did not start"
        assert time.monotonic() < deadline, "the MCP server did not start within 30 s"
        time.sleep(0.01)
    yield server_info
    server.should_exit = True
    thread.join(10)
    sock.close()


async def tenant_header(
    request: MCPToolCallRequest, handler: Callable[[MCPToolCallRequest], Awaitable[Any]]
) -> Any:
    """Send the run's tenant to the MCP server (per call, from the tool runtime)."""
    runtime: Any = request.runtime
    return await handler(request.override(headers={"X-Tenant": runtime.context.tenant_id}))


def _whoami_results(output: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        json.loads(str(m.content[0]["text"] if isinstance(m.content, list) else m.content))
        for m in output["messages"]
        if isinstance(m, ToolMessage)
    ]


async def _run_rounds(agent: Any, rounds: int = 3) -> list[tuple[str, dict[str, Any]]]:
    done: list[tuple[str, dict[str, Any]]] = []
    for _round in range(rounds):
        outs = await asyncio.gather(
            *(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS)
        )
        done += list(zip(TENANTS, outs, strict=True))
    return done


@pytest.mark.parametrize("explicit_factory", [True, False], ids=["factory", "patched-default"])
async def test_mcp_tools_are_pooled_per_tenant(
    mcp_server: McpServer, explicit_factory: bool
) -> None:
    """4 parallel MCP tool calls × 2 tenants × 3 runs: each call opens an MCP session (3+
    HTTP requests); the pool reuses connections across sessions, none shared by two tenants.
    With `mcp_client_factory(pool)` the factory pools; without it, the default factory's
    `httpx.AsyncClient()` is pooled by the wrapped tool call."""
    connection: dict[str, Any] = {"transport": "streamable_http", "url": mcp_server.url}
    pool = toolpool.Pool(warmup=0)
    async with pool:
        if explicit_factory:
            connection["httpx_client_factory"] = mcp_client_factory(pool)
        client = MultiServerMCPClient({"crm": connection}, tool_interceptors=[tenant_header])
        tools = await client.get_tools()
        assert [t.name for t in tools] == ["whoami"]
        agent = wrap(
            create_agent(
                ScriptedChatModel(tool_calls=calls(("whoami", 4))), tools, context_schema=Ctx
            ),
            pool,
            auth=by_context,
        )
        # get_tools' session, before the runs (pooled only with the explicit factory).
        reused_before = sum(d.reused_total for d in pool.stats().values())
        mcp_server.reset()
        runs = await _run_rounds(agent)

        for tenant, output in runs:
            results = _whoami_results(output)
            assert len(results) == 4
            assert {r["tenant"] for r in results} == {tenant}
        per_connection = mcp_server.connection_tenants()
        mixed = {port: t for port, t in per_connection.items() if len(t) > 1}
        assert mixed == {}, f"connections that carried two tenants: {mixed}"
        requests = len(mcp_server.requests)
        assert requests >= 24 * 3  # initialize, initialized notification, call: per session
        dest = pool.stats()[pool.destinations[0]]
        assert dest.in_use == 0
        assert dest.waiting == 0
        reused = dest.reused_total - reused_before
        if not mcp_server.sse:
            # Every response is read to its end, so no connection is lost and each round
            # starts on the connections the previous one left idle: a tenant never has more
            # connections than requests in flight at once, at most one round's requests. So
            # at most a third of the 3 rounds' requests open a connection.
            assert len(per_connection) <= requests // 3
            assert dest.closed_total["error"] == 0
        else:
            # Each SSE answer costs its connection; the other requests may reuse one, and every
            # later round starts on the idle connections the previous round left its tenant.
            assert reused >= 2 * 2
            assert len(per_connection) <= requests - reused


async def test_mcp_factory_client_close_leaves_the_pool_open(mcp_server: McpServer) -> None:
    pool = toolpool.Pool(warmup=0)
    async with pool:
        factory = mcp_client_factory(pool)
        for _ in range(2):
            async with factory(headers={"X-Tenant": "acme"}) as client:
                r = await client.get(mcp_server.url.rsplit("/", 1)[0] + "/nothing-here")
                assert r.extensions["toolpool"]["destination"]
        assert not pool.closed
        assert pool.stats().created_total == 1  # the second client reused the connection
