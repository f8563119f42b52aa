"""Issue 19's scenario 1 with AutoGen on a legacy HTTP+SSE MCP server (`SseServerParams`): the
pooled `McpWorkbench` runs its calls on `toolpool.mcp` SSE sessions per tenant. Cap 4 with 6
parallel calls completes; tenants one after the other get their own sessions; a server that
answers errors, or is stopped in the middle of a run, gives each call an error `ToolResult`
("unavailable"), never an exception out of the run nor a hang. Real FastMCP SSE server under
uvicorn on loopback, hard timeouts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_ext.tools.mcp import McpWorkbench, SseServerParams

import toolpool
from tests._support.autogen_mcp import HARD_TIMEOUT, call_outcomes, mcp_pool, run_agent
from tests._support.autogen_replay import replay_model
from tests._support.mcp_servers import McpTestServer, serve_mcp
from toolpool.autogen import PooledWorkbench


@pytest.fixture
def sse_server() -> Iterator[McpTestServer]:
    with serve_mcp(sse=True) as server:
        yield server


def _workbench(server: McpTestServer, pool: toolpool.Pool, timeout: float = 10) -> PooledWorkbench:
    return PooledWorkbench(McpWorkbench(SseServerParams(url=server.url, timeout=timeout)), pool)


async def test_six_parallel_calls_on_cap_4_complete(sse_server: McpTestServer) -> None:
    """Scenario 1a on SSE: cap 4, 6 parallel calls, one session: all answered."""
    async with mcp_pool(sse_server, max_connections=4) as pool:
        workbench = _workbench(sse_server, pool)
        try:
            outcomes = await asyncio.wait_for(run_agent(workbench, "acme", 6), HARD_TIMEOUT)
            assert workbench.mcp_sessions is not None
            assert workbench.mcp_sessions.sessions.stats().streams == 1  # the session's GET
        finally:
            await workbench.stop()
        assert outcomes == ["ok"] * 6
        assert sse_server.count("initialize") == 1
        assert sse_server.count("tools/call") == 6
        assert sse_server.mixed_connections() == {}


async def test_one_workbench_for_acme_then_globex(sse_server: McpTestServer) -> None:
    """Scenario 1b on SSE: one workbench, acme then globex then acme: each run completes on
    its tenant's own session (the second acme run reuses the first one's)."""
    async with mcp_pool(sse_server, max_connections=4, queue_factor=10) as pool:
        workbench = _workbench(sse_server, pool)
        try:
            for tenant in ("acme", "globex", "acme"):
                outcomes = await asyncio.wait_for(
                    run_agent(workbench, tenant, 3, tool="whoami"), HARD_TIMEOUT
                )
                assert outcomes == ["ok"] * 3
            sessions = workbench.mcp_sessions
            assert sessions is not None and len(sessions) == 2
            tenants = {ctx.tenant for ctx in sessions.contexts() if ctx is not None}
            assert tenants == {"acme", "globex"}
        finally:
            await workbench.stop()
        assert sse_server.count("initialize") == 2
        assert sse_server.mixed_connections() == {}


async def test_a_server_answering_errors_is_an_error_result(sse_server: McpTestServer) -> None:
    """POSTs answered 503 (the MCP client would only log them and wait for an answer on the
    stream forever): each call is "unavailable" at once; the server back, calls work."""
    async with mcp_pool(sse_server) as pool:
        workbench = _workbench(sse_server, pool, timeout=30)
        try:
            assert (
                await asyncio.wait_for(run_agent(workbench, "acme", 2), HARD_TIMEOUT) == ["ok"] * 2
            )
            sse_server.down = True
            started = time.monotonic()
            outcomes = await asyncio.wait_for(run_agent(workbench, "acme", 2), HARD_TIMEOUT)
            assert outcomes == ["unavailable"] * 2
            assert time.monotonic() - started < 20  # answered, not timed out (30 s)
            sse_server.down = False
            assert await asyncio.wait_for(run_agent(workbench, "acme", 1), HARD_TIMEOUT) == ["ok"]
        finally:
            await workbench.stop()


async def test_a_server_stopped_mid_run_is_an_error_result(sse_server: McpTestServer) -> None:
    """Calls in flight when the server stops, and calls after it is gone, are error
    results within the hard timeout."""
    async with mcp_pool(sse_server) as pool:
        workbench = _workbench(sse_server, pool, timeout=30)
        try:
            agent = AssistantAgent(
                "acme_agent",
                model_client=replay_model([("slow_add", {"a": 1, "b": 2, "delay": 30})] * 3, "x"),
                workbench=workbench,
                max_tool_iterations=1,
            )
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                run = asyncio.ensure_future(agent.run(task="add"))
            deadline = time.monotonic() + 30
            while sse_server.count("tools/call") < 3:
                assert time.monotonic() < deadline, "the calls did not reach the server"
                await asyncio.sleep(0.01)
            await asyncio.to_thread(sse_server.stop)
            result = await asyncio.wait_for(run, HARD_TIMEOUT)
            assert call_outcomes(result) == ["unavailable"] * 3
            # The server gone: "unavailable", or "busy (breaker_open)" once failures opened
            # the destination's breaker; an error result either way.
            outcomes = await asyncio.wait_for(run_agent(workbench, "acme", 2), HARD_TIMEOUT)
            assert len(outcomes) == 2 and set(outcomes) <= {"unavailable", "busy"}
        finally:
            await asyncio.wait_for(workbench.stop(), HARD_TIMEOUT)
