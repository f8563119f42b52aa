"""Issue 19's promise on every LangChain MCP path: an MCP server stopped in the middle of a
wrapped agent's run (calls in flight cut, then connects refused) gives each tool call a
`ToolMessage(status="error")` the model can read, never an exception out of `ainvoke` and
never a hang. The three ways to get MCP tools: langchain-mcp-adapters' own
`MultiServerMCPClient` (a session per call, its connections pooled by the tool-call scope),
the same over `mcp_client_factory`, and `mcp_tools` (pooled sessions). Real FastMCP servers
(stateful and stateless) under uvicorn on loopback, hard timeouts."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient

import toolpool
from tests._support.langchain_tools import Ctx, by_context
from tests._support.mcp_servers import McpTestServer, serve_mcp
from toolpool.auth import Bearer
from toolpool.langchain import mcp_client_factory, mcp_tools, wrap
from toolpool.langchain.testing import ScriptedChatModel
from toolpool.mcp import McpSessions

HARD_TIMEOUT = 60
CALLS = 4


def _pool(server: McpTestServer) -> toolpool.Pool:
    dest = toolpool.Destination(
        "mcp", server.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"), acquire_timeout=5
    )
    return toolpool.Pool([dest], warmup=0)


async def _tools(kind: str, pool: toolpool.Pool, server: McpTestServer, sessions: Any) -> Any:
    connection: dict[str, Any] = {"transport": "streamable_http", "url": server.url}
    if kind == "mcp_tools":
        connection["timeout"] = 10
        return await mcp_tools(
            pool,
            {"crm": connection},
            ctx=toolpool.AuthContext(tenant="acme"),
            sessions=sessions,
        )
    if kind == "factory":
        connection["httpx_client_factory"] = mcp_client_factory(pool)
    with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
        return await MultiServerMCPClient({"crm": connection}).get_tools()


def _slow_calls(delay: float) -> list[dict[str, Any]]:
    return [{"name": "slow_add", "args": {"a": i, "b": 1, "delay": delay}} for i in range(CALLS)]


async def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _tool_messages(out: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in out["messages"] if isinstance(m, ToolMessage)]


@pytest.mark.parametrize("kind", ["client", "factory", "mcp_tools"])
async def test_server_stopped_mid_run_is_an_error_message(
    mcp_server: McpTestServer, kind: str
) -> None:
    async with _pool(mcp_server) as pool:
        sessions = McpSessions(pool)
        try:
            tools = await _tools(kind, pool, mcp_server, sessions)
            # Calls that take far longer than uvicorn's 1 s graceful shutdown: cut in flight.
            model = ScriptedChatModel(tool_calls=_slow_calls(delay=30.0))
            agent = wrap(create_agent(model, tools, context_schema=Ctx), pool, auth=by_context)
            run = asyncio.ensure_future(
                agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("acme"))
            )
            await _wait_for(lambda: mcp_server.count("tools/call") >= CALLS, "calls in flight")
            await asyncio.to_thread(mcp_server.stop)
            out = await asyncio.wait_for(run, HARD_TIMEOUT)  # no exception, no hang
            messages = _tool_messages(out)
            assert len(messages) == CALLS
            for message in messages:
                assert message.status == "error", message
                assert "could not run" in message.text and "unavailable" in message.text, (
                    message.text
                )

            # The server is gone now (connects refused): a new run's calls fail the same way.
            model = ScriptedChatModel(tool_calls=_slow_calls(delay=0.0))
            agent = wrap(create_agent(model, tools, context_schema=Ctx), pool, auth=by_context)
            out = await asyncio.wait_for(
                agent.ainvoke({"messages": [("user", "again")]}, context=Ctx("acme")),
                HARD_TIMEOUT,
            )
            messages = _tool_messages(out)
            assert len(messages) == CALLS
            for message in messages:
                assert message.status == "error", message
                # "MCP server unavailable", or, once failures opened the destination's
                # breaker, "busy (breaker_open); retry in N s": either way an answer.
                assert "could not run" in message.text, message.text
                assert "unavailable" in message.text or "breaker_open" in message.text
                assert "t-acme" not in message.text  # no credential in what the model reads
        finally:
            await asyncio.wait_for(sessions.aclose(), HARD_TIMEOUT)


async def test_mcp_tools_on_a_legacy_sse_server() -> None:
    """`mcp_tools` pools legacy HTTP+SSE servers too: two tenants' calls answered on their
    own sessions; then the server stopped mid-run gives error messages, not an exception."""
    with serve_mcp(sse=True) as server:
        async with _pool(server) as pool:
            sessions = McpSessions(pool)
            try:
                tools = await mcp_tools(
                    pool,
                    {"crm": {"transport": "sse", "url": server.url, "timeout": 10}},
                    ctx=toolpool.AuthContext(tenant="acme"),
                    sessions=sessions,
                )
                model = ScriptedChatModel(tool_calls=_slow_calls(delay=0.1))
                agent = wrap(create_agent(model, tools, context_schema=Ctx), pool, auth=by_context)
                outs = await asyncio.wait_for(
                    asyncio.gather(
                        *(
                            agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t))
                            for t in ("acme", "globex")
                        )
                    ),
                    HARD_TIMEOUT,
                )
                for out in outs:
                    assert [m.status for m in _tool_messages(out)] == ["success"] * CALLS
                assert sessions.stats().initialized_total == 2
                assert server.mixed_connections() == {}

                model = ScriptedChatModel(tool_calls=_slow_calls(delay=30.0))
                agent = wrap(create_agent(model, tools, context_schema=Ctx), pool, auth=by_context)
                run = asyncio.ensure_future(
                    agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("acme"))
                )
                await _wait_for(lambda: server.count("tools/call") >= 3 * CALLS, "calls")
                await asyncio.to_thread(server.stop)
                messages = _tool_messages(await asyncio.wait_for(run, HARD_TIMEOUT))
                assert len(messages) == CALLS
                assert all(m.status == "error" and "unavailable" in m.text for m in messages)
            finally:
                await asyncio.wait_for(sessions.aclose(), HARD_TIMEOUT)
