"""Issue 19's MCP scenarios with AutoGen: a wrapped agent on a pooled `McpWorkbench` against
real FastMCP servers (stateful and stateless), each run under a hard timeout. Every tool call
is answered or told "busy"; no run hangs or raises; no connection carries two tenants."""

from __future__ import annotations

import asyncio
import json

import pytest
from autogen_ext.tools.mcp import McpWorkbench, StreamableHttpServerParams

import toolpool
from tests._support.autogen_mcp import HARD_TIMEOUT, mcp_pool, run_agent
from tests._support.mcp_servers import McpTestServer
from toolpool.autogen import PooledWorkbench

pytestmark = pytest.mark.filterwarnings(
    "ignore:Use `streamable_http_client` instead:DeprecationWarning"
)


async def test_six_parallel_calls_on_cap_4_complete(mcp_server: McpTestServer) -> None:
    """Scenario 1a: cap 4, default queue, 6 parallel calls: the run returns, all answered."""
    async with mcp_pool(mcp_server, max_connections=4) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_server.url)), pool
        )
        try:
            outcomes = await asyncio.wait_for(run_agent(workbench, "acme", 6), HARD_TIMEOUT)
        finally:
            await workbench.stop()
        assert outcomes == ["ok"] * 6
        assert mcp_server.count("initialize") == 1  # one session for the 6 calls
        assert mcp_server.mixed_connections() == {}


async def test_one_workbench_for_acme_then_globex(mcp_server: McpTestServer) -> None:
    """Scenario 1b: one workbench, tenant acme then globex (queue_factor 10): both runs
    complete on their own sessions."""
    async with mcp_pool(mcp_server, max_connections=4, queue_factor=10) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_server.url)), pool
        )
        try:
            for tenant in ("acme", "globex", "acme"):
                outcomes = await asyncio.wait_for(
                    run_agent(workbench, tenant, 3, tool="whoami"), HARD_TIMEOUT
                )
                assert outcomes == ["ok"] * 3
            sessions = workbench.mcp_sessions
            assert sessions is not None and len(sessions) == 2
        finally:
            await workbench.stop()
        assert mcp_server.count("initialize") == 2
        assert mcp_server.mixed_connections() == {}


async def test_four_tenants_on_cap_4_get_answers_or_busy(mcp_server: McpTestServer) -> None:
    """Scenario 1c: 4 tenants at once on cap 4: no hang, every call answered or busy."""
    async with mcp_pool(mcp_server, max_connections=4, acquire_timeout=5) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_server.url, timeout=20)), pool
        )
        try:
            runs = await asyncio.wait_for(
                asyncio.gather(*(run_agent(workbench, f"t{i}", 4) for i in range(4))), HARD_TIMEOUT
            )
        finally:
            await workbench.stop()
        outcomes = [o for run in runs for o in run]
        assert len(outcomes) == 16 and "ok" in outcomes
        assert set(outcomes) <= {"ok", "busy"}
        assert mcp_server.mixed_connections() == {}


async def test_two_tenants_ten_calls_each_do_not_starve(mcp_server: McpTestServer) -> None:
    """Scenario 3: cap 4, queue_factor 10, 2 tenants x 10 concurrent calls: GET streams do
    not starve the pool; every call answered (the queue is deep enough)."""
    async with mcp_pool(mcp_server, max_connections=4, queue_factor=10) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_server.url)), pool
        )
        try:
            runs = await asyncio.wait_for(
                asyncio.gather(
                    run_agent(workbench, "acme", 10), run_agent(workbench, "globex", 10)
                ),
                HARD_TIMEOUT,
            )
            stats = pool.stats()["mcp"]
            # At most half the connections held by event streams.
            assert stats.streams <= 2
        finally:
            await workbench.stop()
        assert [o for run in runs for o in run] == ["ok"] * 20
        assert mcp_server.count("initialize") == 2
        assert mcp_server.mixed_connections() == {}


async def test_a_server_gone_is_an_error_result_not_a_hang(mcp_server: McpTestServer) -> None:
    async with mcp_pool(mcp_server) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_server.url, timeout=10)), pool
        )
        try:
            assert (
                await asyncio.wait_for(run_agent(workbench, "acme", 2), HARD_TIMEOUT) == ["ok"] * 2
            )
            mcp_server.down = True
            outcomes = await asyncio.wait_for(run_agent(workbench, "acme", 2), HARD_TIMEOUT)
            assert outcomes == ["unavailable"] * 2
            mcp_server.down = False
            assert await asyncio.wait_for(run_agent(workbench, "acme", 1), HARD_TIMEOUT) == ["ok"]
        finally:
            await workbench.stop()


def test_results_are_the_servers_answers(mcp_server: McpTestServer) -> None:
    async def go() -> None:
        async with mcp_pool(mcp_server) as pool:
            workbench = PooledWorkbench(
                McpWorkbench(StreamableHttpServerParams(url=mcp_server.url)), pool
            )
            try:
                with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                    r = await workbench.call_tool("slow_add", {"a": 2, "b": 3, "delay": 0})
                    w = await workbench.call_tool("whoami", {})
                    tools = {t["name"] for t in await workbench.list_tools()}
            finally:
                await workbench.stop()
            assert not r.is_error and r.to_text() == "5"
            assert json.loads(w.to_text()) == {"tenant": "acme"}
            assert {"slow_add", "whoami", "grow"} <= tools

    asyncio.run(asyncio.wait_for(go(), HARD_TIMEOUT))
