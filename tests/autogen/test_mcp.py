"""A pooled `McpWorkbench`: one MCP session per tenant, its HTTP traffic on the pool with the
tenant's credentials and connections. The MCP server is a real FastMCP (streamable HTTP)
server on loopback, started by the test."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

mcp_server = pytest.importorskip("mcp.server.fastmcp")
uvicorn = pytest.importorskip("uvicorn")

from autogen_agentchat.agents import AssistantAgent  # noqa: E402
from autogen_agentchat.messages import ToolCallExecutionEvent  # noqa: E402
from autogen_ext.tools.mcp import McpWorkbench, StreamableHttpServerParams  # noqa: E402

import toolpool  # noqa: E402
from tests._support.autogen_replay import replay_model  # noqa: E402
from toolpool.auth import Bearer  # noqa: E402
from toolpool.autogen import PooledWorkbench, wrap  # noqa: E402

# autogen-ext 0.7.5 calls mcp's deprecated streamablehttp_client; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Use `streamable_http_client` instead:DeprecationWarning"
)

ACME = toolpool.AuthContext(tenant="acme")
GLOBEX = toolpool.AuthContext(tenant="globex")


@dataclass
class McpServer:
    url: str
    origin: str
    # client port (one TCP connection) -> every Authorization header it carried
    connections: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))


@pytest.fixture
def mcp_crm() -> Iterator[McpServer]:
    server = mcp_server.FastMCP("crm", log_level="CRITICAL")

    @server.tool()
    def whoami(ctx: mcp_server.Context) -> str:  # type: ignore[type-arg]
        """Who the MCP server thinks is calling."""
        request = ctx.request_context.request
        return json.dumps({"authorization": request.headers.get("authorization")})

    app = server.streamable_http_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    info = McpServer(url=f"http://127.0.0.1:{port}/mcp", origin=f"http://127.0.0.1:{port}")

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            info.connections[scope["client"][1]].add(headers.get(b"authorization", b"").decode())
        await app(scope, receive, send)

    runner = uvicorn.Server(uvicorn.Config(recording, log_level="critical", lifespan="on"))
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(3000):
            if runner.started:
                break
            threading.Event().wait(0.01)
        assert runner.started, "the MCP server did not start"
        yield info
    finally:
        runner.should_exit = True
        thread.join(30)
        sock.close()


async def test_one_mcp_session_per_tenant_on_the_pool(mcp_crm: McpServer) -> None:
    mcp = toolpool.Destination(
        "mcp", mcp_crm.origin, auth=Bearer(lambda ctx: f"token-of-{ctx.tenant}")
    )
    async with toolpool.Pool([mcp], warmup=0) as pool:
        # One workbench, shared by two agents that run concurrently for two tenants.
        workbench = PooledWorkbench(McpWorkbench(StreamableHttpServerParams(url=mcp_crm.url)), pool)
        turn = [("whoami", {}), ("whoami", {})]

        async def run(ctx: toolpool.AuthContext) -> list[str | None]:
            agent = AssistantAgent(
                f"{ctx.tenant}_agent",
                model_client=replay_model(turn, turn, "done"),
                workbench=workbench,
                max_tool_iterations=2,
                reflect_on_tool_use=True,
            )
            with toolpool.auth_context(ctx):
                result = await agent.run(task="who am I?")
            events = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]
            results = [r for m in events for r in m.content]
            assert not [r.content for r in results if r.is_error]
            return [json.loads(r.content)["authorization"] for r in results]

        try:
            acme, globex = await asyncio.wait_for(
                asyncio.gather(run(ACME), run(GLOBEX)), timeout=60
            )
            assert acme == ["Bearer token-of-acme"] * 4
            assert globex == ["Bearer token-of-globex"] * 4
            sessions = workbench.mcp_sessions
            assert sessions is not None
            assert set(sessions.contexts()) == {ACME, GLOBEX}
            # Pooled MCP sessions send from their own tasks: their tools are bounded by the
            # pool's queue, not held at admission (see toolpool.autogen._mcp).
            assert workbench.admission.destinations("whoami") == frozenset()
        finally:
            await workbench.stop()

        assert workbench.mcp_sessions is not None
        assert len(workbench.mcp_sessions) == 0
        # Every connection the MCP server saw carried one tenant's credentials only.
        assert mcp_crm.connections
        assert all(len(auths) == 1 for auths in mcp_crm.connections.values())
        assert {a for auths in mcp_crm.connections.values() for a in auths} == {
            "Bearer token-of-acme",
            "Bearer token-of-globex",
        }
        # Reused across the two turns: fewer connections than requests.
        stats = pool.stats()["mcp"]
        assert stats.reused_total > 0
        assert stats.created_total == len(mcp_crm.connections)


async def test_wrap_pools_an_agents_mcp_workbench(mcp_crm: McpServer) -> None:
    mcp = toolpool.Destination("mcp", mcp_crm.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"))
    async with toolpool.Pool([mcp], warmup=0) as pool:
        agent = AssistantAgent(
            "mcp_agent",
            model_client=replay_model([("whoami", {})], "done"),
            workbench=McpWorkbench(StreamableHttpServerParams(url=mcp_crm.url)),
            reflect_on_tool_use=True,
        )
        wrap(agent, pool, auth=GLOBEX)
        (workbench,) = agent._workbench
        assert isinstance(workbench, PooledWorkbench)
        try:
            result = await asyncio.wait_for(agent.run(task="who?"), timeout=60)
        finally:
            await workbench.stop()
        executed = next(m for m in result.messages if isinstance(m, ToolCallExecutionEvent))
        assert json.loads(executed.content[0].content) == {"authorization": "Bearer t-globex"}
        # The saved agent has the plain McpWorkbench config.
        dumped = agent.dump_component().model_dump()
        assert dumped["config"]["workbench"][0]["provider"] == "autogen_ext.tools.mcp.McpWorkbench"


async def test_mcp_sessions_beyond_the_bound_close_the_least_recently_used(
    mcp_crm: McpServer,
) -> None:
    mcp = toolpool.Destination("mcp", mcp_crm.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"))
    async with toolpool.Pool([mcp], warmup=0) as pool:
        workbench = PooledWorkbench(
            McpWorkbench(StreamableHttpServerParams(url=mcp_crm.url)), pool, max_mcp_sessions=1
        )
        sessions = workbench.mcp_sessions
        assert sessions is not None

        async def whoami(ctx: toolpool.AuthContext) -> str:
            with toolpool.auth_context(ctx):
                result = await workbench.call_tool("whoami", {})
            assert not result.is_error, result.to_text()
            authorization: str = json.loads(result.to_text())["authorization"]
            return authorization

        try:
            assert await whoami(ACME) == "Bearer t-acme"
            assert sessions.contexts() == [ACME]
            assert await whoami(GLOBEX) == "Bearer t-globex"
            assert sessions.contexts() == [GLOBEX]  # acme's idle session was closed
            assert await whoami(ACME) == "Bearer t-acme"  # and is opened again on demand
            assert sessions.contexts() == [ACME]
        finally:
            await workbench.stop()
        for _ in range(3000):  # the closed sessions give their connections back
            if pool.stats()["mcp"].in_use == 0:
                break
            await asyncio.sleep(0.01)
        assert pool.stats()["mcp"].in_use == 0
