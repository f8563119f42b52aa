"""Issue 19's MCP scenarios with LangChain: a wrapped agent whose MCP tools run on pooled
sessions (`toolpool.langchain.mcp_tools`), or on langchain-mcp-adapters' per-call sessions
over `mcp_client_factory`, against real FastMCP servers (stateful and stateless), under hard
timeouts. Every call is answered or "busy", no run raises or hangs, no connection carries two
tenants."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langchain_mcp_adapters.client import MultiServerMCPClient

import toolpool
from tests._support.langchain_tools import Ctx, by_context
from tests._support.mcp_servers import McpTestServer
from toolpool.auth import Bearer
from toolpool.langchain import mcp_client_factory, mcp_tools, wrap
from toolpool.langchain.testing import ScriptedChatModel
from toolpool.mcp import McpSessions

HARD_TIMEOUT = 90
TENANTS = ("acme", "globex")


def _pool(server: McpTestServer, **kw: Any) -> toolpool.Pool:
    dest = toolpool.Destination(
        "mcp", server.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"), **kw
    )
    return toolpool.Pool([dest], warmup=0)


def _add_calls(n: int) -> list[dict[str, Any]]:
    return [{"name": "slow_add", "args": {"a": i, "b": 1, "delay": 0.2}} for i in range(n)]


def _outcome(message: ToolMessage) -> str:
    if message.status != "error":
        return "ok"
    text = message.text
    if "busy" in text:
        return "busy"
    assert "unavailable" in text, text
    return "unavailable"


async def _runs(agent: Any, tenants: tuple[str, ...] = TENANTS) -> list[list[str]]:
    outs = await asyncio.wait_for(
        asyncio.gather(
            *(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in tenants)
        ),
        HARD_TIMEOUT,
    )
    return [[_outcome(m) for m in out["messages"] if isinstance(m, ToolMessage)] for out in outs]


async def test_pooled_sessions_two_tenants_ten_calls_each(mcp_server: McpTestServer) -> None:
    """Scenarios 2 and 3: cap 4, 2 tenants x 10 parallel calls: all answered (queue deep
    enough), one session per tenant, GET streams on at most half the connections."""
    async with _pool(mcp_server, max_connections=4, queue_factor=10) as pool:
        sessions = McpSessions(pool)
        try:
            tools = await mcp_tools(
                pool,
                {"crm": {"transport": "streamable_http", "url": mcp_server.url}},
                ctx=toolpool.AuthContext(tenant="acme"),
                sessions=sessions,
            )
            model = ScriptedChatModel(tool_calls=_add_calls(10))
            agent = wrap(create_agent(model, tools, context_schema=Ctx), pool, auth=by_context)
            runs = await _runs(agent)
            assert runs == [["ok"] * 10, ["ok"] * 10]
            assert {m.text for m in model.tool_results} == {str(i + 1) for i in range(10)}
            assert pool.stats()["mcp"].streams <= 2
            assert sessions.stats().initialized_total == 2  # acme (listing + calls), globex
        finally:
            await sessions.aclose()
        assert mcp_server.count("initialize") == 2
        assert mcp_server.mixed_connections() == {}


async def test_pooled_sessions_saturated_answer_busy(mcp_server: McpTestServer) -> None:
    """Scenario 2 with a short queue: busy answers, never an exception out of a run."""
    dest_kw: dict[str, Any] = {"max_connections": 4, "queue_factor": 0.5, "acquire_timeout": 2}
    async with _pool(mcp_server, **dest_kw) as pool:
        sessions = McpSessions(pool)
        try:
            tools = await mcp_tools(
                pool,
                {"crm": {"transport": "streamable_http", "url": mcp_server.url}},
                ctx=toolpool.AuthContext(tenant="acme"),
                sessions=sessions,
            )
            agent = wrap(
                create_agent(
                    ScriptedChatModel(tool_calls=_add_calls(10)), tools, context_schema=Ctx
                ),
                pool,
                auth=by_context,
            )
            outcomes = [o for run in await _runs(agent) for o in run]
        finally:
            await sessions.aclose()
        assert len(outcomes) == 20 and set(outcomes) <= {"ok", "busy"}
        assert "ok" in outcomes and "busy" in outcomes
        assert mcp_server.mixed_connections() == {}


async def test_pooled_sessions_server_gone_is_an_error_message(mcp_server: McpTestServer) -> None:
    async with _pool(mcp_server) as pool:
        sessions = McpSessions(pool)
        try:
            tools = await mcp_tools(
                pool,
                {"crm": {"transport": "streamable_http", "url": mcp_server.url, "timeout": 10}},
                ctx=toolpool.AuthContext(tenant="acme"),
                sessions=sessions,
            )
            agent = wrap(
                create_agent(
                    ScriptedChatModel(tool_calls=_add_calls(2)), tools, context_schema=Ctx
                ),
                pool,
                auth=by_context,
            )
            mcp_server.down = True
            assert await _runs(agent, ("acme",)) == [["unavailable"] * 2]
            mcp_server.down = False
            assert await _runs(agent, ("acme",)) == [["ok"] * 2]
        finally:
            await sessions.aclose()


async def test_per_call_sessions_over_the_factory_never_raise(mcp_server: McpTestServer) -> None:
    """Scenario 2 as the README recipe had it (langchain-mcp-adapters' session per call,
    connections from `mcp_client_factory`), stateless and stateful, cap 4: every call is
    answered or busy; the runs never raise `ClosedResourceError`."""
    async with _pool(mcp_server, max_connections=4, acquire_timeout=5) as pool:
        connection: dict[str, Any] = {
            "transport": "streamable_http",
            "url": mcp_server.url,
            "httpx_client_factory": mcp_client_factory(pool),
        }
        client = MultiServerMCPClient({"crm": connection})
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            tools = await client.get_tools()
        agent = wrap(
            create_agent(ScriptedChatModel(tool_calls=_add_calls(10)), tools, context_schema=Ctx),
            pool,
            auth=by_context,
        )
        outcomes = [o for run in await _runs(agent) for o in run]
        assert len(outcomes) == 20 and set(outcomes) <= {"ok", "busy"}
        assert "ok" in outcomes
        assert mcp_server.mixed_connections() == {}
