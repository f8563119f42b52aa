"""Issue 19's MCP scenarios with CrewAI: a wrapped crew whose agent gets its tools from
`mcps=[MCPServerHTTP(...)]`, against real FastMCP servers (stateful and stateless). Its MCP
tools run on pooled sessions, one per tenant; every call is answered or told "busy"; no
kickoff raises or hangs (each runs under a hard timeout); no connection carries two tenants."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

from crewai import Agent, Crew, Task
from crewai.mcp import MCPServerHTTP
from crewai.utilities.string_utils import sanitize_tool_name

import toolpool
from tests._support.mcp_servers import McpTestServer
from toolpool.auth import Bearer
from toolpool.crewai import wrap
from toolpool.crewai.testing import ScriptedLLM, is_busy_result

HARD_TIMEOUT = 120


def _tool_name(server: McpTestServer, tool: str) -> str:
    """CrewAI's name for an MCP tool: mcp_<host:port>_<path>_<tool>, sanitized."""
    parts = urlsplit(server.url)
    raw = f"mcp_{parts.netloc.replace('.', '_')}{parts.path.replace('/', '_')}_{tool}"
    return sanitize_tool_name(raw)


def _crew(server: McpTestServer, llm: ScriptedLLM) -> Crew:
    agent = Agent(
        role="adder",
        goal="Add numbers",
        backstory="Careful.",
        llm=llm,
        mcps=[MCPServerHTTP(url=server.url)],
    )
    task = Task(description="Add for {tenant_id}.", expected_output="sums", agent=agent)
    return Crew(agents=[agent], tasks=[task])


def _plan(server: McpTestServer, n: int, delay: float = 0.2) -> list[list[dict[str, Any]]]:
    name = _tool_name(server, "slow_add")
    return [[{"tool": name, "args": {"a": i, "b": 1, "delay": delay}} for i in range(n)]]


def _kickoffs(crews: list[Crew], tenants: list[str]) -> list[Any]:
    """One kickoff per tenant at once, each on its own crew (CrewAI's `crew.copy()` drops
    an agent's `mcps`, so concurrent runs get crews of their own here)."""
    with ThreadPoolExecutor(len(tenants)) as executor:
        futures = [
            executor.submit(crew.kickoff, inputs={"tenant_id": t})
            for crew, t in zip(crews, tenants, strict=True)
        ]
        return [f.result(timeout=HARD_TIMEOUT) for f in futures]


def _wrapped(server: McpTestServer, llm: ScriptedLLM, pool: toolpool.Pool, **kw: Any) -> Crew:
    return wrap(
        _crew(server, llm),
        pool,
        auth=lambda inputs: toolpool.AuthContext(tenant=inputs["tenant_id"]),
        **kw,
    )


def _pool(server: McpTestServer, **kw: Any) -> toolpool.Pool:
    dest = toolpool.Destination(
        "mcp", server.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"), **kw
    )
    return toolpool.Pool([dest], warmup=0)


def test_mcp_tools_run_on_one_pooled_session_per_tenant(mcp_server: McpTestServer) -> None:
    """Scenario 3 for CrewAI: cap 4, 2 tenants x 6 parallel MCP calls: all answered, one
    pooled session per tenant (CrewAI's own tool discovery is not a tool call: unpooled)."""
    llm = ScriptedLLM(plan=_plan(mcp_server, 6), busy_retries=3)
    with _pool(mcp_server, max_connections=4, queue_factor=10) as pool:
        crews = [_wrapped(mcp_server, llm, pool) for _ in range(2)]
        outputs = _kickoffs(crews, ["acme", "globex"])
        assert len(outputs) == 2
        results = [o for o in llm.observations if not is_busy_result(o)]
        assert sorted(results) == sorted([str(i + 1) for i in range(6)] * 2)
        # Calls went through pooled sessions: one initialize per tenant, with its token.
        tenants_initialized = [t for m, t in mcp_server.methods if m == "initialize" and t]
        assert sorted(tenants_initialized) == ["acme", "globex"]
        assert sum(1 for m, t in mcp_server.methods if m == "tools/call" and t) == 12
        assert mcp_server.mixed_connections() == {}
        assert pool.stats()["mcp"].streams <= 2


def test_a_saturated_pool_gives_busy_text_not_an_exception(mcp_server: McpTestServer) -> None:
    """Scenario 2 for CrewAI: a short queue; busy calls read "busy, retry", are repeated by
    the model, and both kickoffs complete."""
    # 16 one-second calls at once on 4 connections and no queue: some must be refused.
    llm = ScriptedLLM(plan=_plan(mcp_server, 8, delay=1.0), busy_retries=3)
    with _pool(mcp_server, max_connections=4, queue_factor=0, acquire_timeout=2) as pool:
        crews = [_wrapped(mcp_server, llm, pool, max_wait=0.0) for _ in range(2)]
        outputs = _kickoffs(crews, ["acme", "globex"])
        assert len(outputs) == 2
        assert any(is_busy_result(o) for o in llm.observations)
        assert mcp_server.mixed_connections() == {}


def test_a_server_gone_is_tool_error_text(mcp_server: McpTestServer) -> None:
    llm = ScriptedLLM(plan=_plan(mcp_server, 2), busy_retries=0)
    with _pool(mcp_server) as pool:
        crew = _wrapped(mcp_server, llm, pool)
        # CrewAI discovers the tools at kickoff without credentials (unpooled); the pooled
        # calls carry the tenant's token, and those the server refuses.
        mcp_server.down_for_tenants = True
        _kickoffs([crew], ["acme"])
        unavailable = [o for o in llm.observations if "unavailable" in o]
        assert len(unavailable) == 2, llm.observations


def test_a_server_stopped_mid_run_is_tool_error_text(mcp_server: McpTestServer) -> None:
    """Calls in flight when the server stops (cut after uvicorn's 1 s graceful shutdown)
    come back to the model as the tool's error text; the kickoff completes, nothing raises."""
    llm = ScriptedLLM(plan=_plan(mcp_server, 2, delay=30.0), busy_retries=0)
    with _pool(mcp_server) as pool, ThreadPoolExecutor(1) as executor:
        crew = _wrapped(mcp_server, llm, pool)
        run = executor.submit(crew.kickoff, inputs={"tenant_id": "acme"})
        deadline = time.monotonic() + 60
        while mcp_server.count("tools/call") < 2:
            assert time.monotonic() < deadline, "the calls did not reach the server"
            assert not run.done(), run.exception()
            time.sleep(0.01)
        mcp_server.stop()
        assert run.result(timeout=HARD_TIMEOUT) is not None  # no exception, no hang
        unavailable = [o for o in llm.observations if "unavailable" in o]
        assert len(unavailable) == 2, llm.observations
        assert not any("t-acme" in o for o in llm.observations)
