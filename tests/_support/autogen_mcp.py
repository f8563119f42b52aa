"""AutoGen against real FastMCP servers: a pool for the server (a bearer token per tenant), a
wrapped agent's run with N tool calls, and what each call came back as ("ok", "busy",
"unavailable"). Used by tests/autogen/test_mcp_scenarios.py and test_mcp_sse.py."""

from __future__ import annotations

from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent

import toolpool
from tests._support.autogen_replay import replay_model
from tests._support.mcp_servers import McpTestServer
from toolpool.auth import Bearer
from toolpool.autogen import PooledWorkbench

# A run that has not returned by then hangs.
HARD_TIMEOUT = 90


def mcp_pool(server: McpTestServer, **kw: float) -> toolpool.Pool:
    dest = toolpool.Destination(
        "mcp", server.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"), **kw
    )
    return toolpool.Pool([dest], warmup=0)


def call_outcomes(result: object) -> list[str]:
    """'ok', 'busy' or 'unavailable' per tool call of the run."""
    events = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]  # type: ignore[attr-defined]
    out = []
    for r in (r for e in events for r in e.content):
        if not r.is_error:
            out.append("ok")
        elif "busy" in r.content:
            out.append("busy")
        else:
            assert "unavailable" in r.content, r.content
            out.append("unavailable")
    return out


async def run_agent(
    workbench: PooledWorkbench, tenant: str, calls: int, *, tool: str = "slow_add"
) -> list[str]:
    args = {"a": 1, "b": 2, "delay": 0.2} if tool == "slow_add" else {}
    agent = AssistantAgent(
        f"{tenant}_agent",
        model_client=replay_model([(tool, args)] * calls, "done"),
        workbench=workbench,
        max_tool_iterations=1,
    )
    with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
        result = await agent.run(task="add")
    seen = call_outcomes(result)
    assert len(seen) == calls
    return seen
