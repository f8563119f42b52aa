"""toolpool.mcp against real FastMCP servers (stateful and stateless) on loopback: sessions
pooled per (server, tenant), tools/list cached, failures answered, never a hang."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import pytest

import toolpool
from tests._support.mcp_servers import McpTestServer
from tests._support.resilience_probes import eventually
from toolpool.auth import Bearer
from toolpool.mcp import McpServer, McpSessions, McpUnavailable, sessions_of

ACME = toolpool.AuthContext(tenant="acme")
GLOBEX = toolpool.AuthContext(tenant="globex")
BUSY = (toolpool.PoolSaturated, toolpool.PoolTimeout)


def _dest(server: McpTestServer, **kw: Any) -> toolpool.Destination:
    return toolpool.Destination(
        "mcp", server.origin, auth=Bearer(lambda ctx: f"t-{ctx.tenant}"), **kw
    )


def _tenant(result: Any) -> str:
    assert not result.isError, result
    tenant: str = json.loads(result.content[0].text)["tenant"]
    return tenant


async def test_one_session_per_tenant_reused_and_tools_list_cached(
    mcp_server: McpTestServer,
) -> None:
    async with toolpool.Pool([_dest(mcp_server, max_connections=8)], warmup=0) as pool:
        sessions = McpSessions(pool)
        crm = McpServer(mcp_server.url)
        try:
            for _round in range(3):
                for ctx in (ACME, GLOBEX):
                    with toolpool.auth_context(ctx):
                        tools = await sessions.list_tools(crm)
                        assert {"whoami", "slow_add", "grow"} <= {t.name for t in tools}
                        results = await asyncio.wait_for(
                            asyncio.gather(*(sessions.call_tool(crm, "whoami") for _ in range(5))),
                            timeout=60,
                        )
                    assert {_tenant(r) for r in results} == {ctx.tenant}
            stats = sessions.stats()
            # One initialize per (server, tenant) for 30 calls and 6 tool listings.
            assert mcp_server.count("initialize") == 2 == stats.initialized_total
            assert mcp_server.count("tools/list") == 2 == stats.tools_list_fetched_total
            assert stats.tools_list_cached_total == 4
            assert mcp_server.count("tools/call") == 30 == stats.calls_total
            assert set(sessions.contexts(crm)) == {ACME, GLOBEX}
            if mcp_server.stateful:
                # One GET event stream each. A session opens it in the background once
                # initialized, when its destination has room (right away, or after a busy
                # moment): wait for both. The POSTs' SSE answers are closed by the MCP client
                # just after it hands their result over: once they are, the pool's only
                # long-lived responses are the two streams.
                await eventually(lambda: sessions.stats().streams == 2, "both GET streams open")
                await eventually(
                    lambda: pool.stats()["mcp"].in_use == 2, "only the two streams in use"
                )
                assert sessions.stats().streams == 2 == pool.stats()["mcp"].streams
                assert mcp_server.gets == 2
        finally:
            await sessions.aclose()
        assert sessions.stats().open == 0
        assert mcp_server.mixed_connections() == {}
        if mcp_server.stateful:
            assert mcp_server.deletes == 2  # each session ended on the server
        # The streams' connections come back as their sessions' tasks end.
        await eventually(lambda: pool.stats()["mcp"].in_use == 0, "every connection back")
        assert pool.stats()["mcp"].streams == 0


async def test_tools_list_changed_invalidates_the_cache(mcp_server: McpTestServer) -> None:
    async with toolpool.Pool([_dest(mcp_server)], warmup=0) as pool:
        # Stateless servers cannot notify: the cache is trusted for tools_ttl instead.
        sessions = McpSessions(pool, tools_ttl=0.3)
        crm = McpServer(mcp_server.url)
        try:
            with toolpool.auth_context(ACME):
                before = {t.name for t in await sessions.list_tools(crm)}
                result = await sessions.call_tool(crm, "grow", {"name": "fresh_tool"})
                assert not result.isError
                seen: set[str] = set()
                for _ in range(200):
                    seen = {t.name for t in await sessions.list_tools(crm)}
                    if "fresh_tool" in seen:
                        break
                    await asyncio.sleep(0.05)
            assert "fresh_tool" not in before and "fresh_tool" in seen
            assert sessions.stats().initialized_total == 1
        finally:
            await sessions.aclose()


async def test_a_saturated_pool_answers_every_call_busy_or_done(
    mcp_server: McpTestServer,
) -> None:
    """Cap 4, a short queue, 2 tenants x 10 concurrent slow calls: every call returns or
    raises the pool's busy error promptly; sessions survive busy answers."""
    dest = _dest(mcp_server, max_connections=4, queue_factor=0.5, acquire_timeout=2.0)
    async with toolpool.Pool([dest], warmup=0) as pool:
        sessions = McpSessions(pool)
        crm = McpServer(mcp_server.url, timeout=20)

        async def call(ctx: toolpool.AuthContext) -> str:
            with toolpool.auth_context(ctx):
                try:
                    r = await sessions.call_tool(crm, "slow_add", {"a": 1, "b": 2, "delay": 0.3})
                except BUSY:
                    return "busy"
            assert not r.isError
            return "done"

        try:
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(call(c) for c in (ACME, GLOBEX) for _ in range(10))), timeout=60
            )
            assert len(outcomes) == 20 and set(outcomes) <= {"busy", "done"}
            # 20 calls at once on 4 connections and a queue of 2: both kinds happen.
            assert "done" in outcomes and "busy" in outcomes
            # Busy answers did not cost sessions: still one per tenant, none discarded for it.
            assert sessions.stats().discarded_total.get("error", 0) == 0
            with toolpool.auth_context(ACME):
                r = await asyncio.wait_for(sessions.call_tool(crm, "whoami"), timeout=30)
            assert _tenant(r) == "acme"
            assert sessions.stats().initialized_total == 2
        finally:
            await sessions.aclose()
        assert mcp_server.mixed_connections() == {}


async def test_a_server_gone_is_unavailable_and_the_session_is_discarded(
    mcp_server: McpTestServer,
) -> None:
    async with toolpool.Pool([_dest(mcp_server)], warmup=0) as pool:
        sessions = McpSessions(pool)
        crm = McpServer(mcp_server.url, timeout=10)
        try:
            with toolpool.auth_context(ACME):
                assert _tenant(await sessions.call_tool(crm, "whoami")) == "acme"
                mcp_server.down = True
                with pytest.raises(McpUnavailable) as err:
                    await asyncio.wait_for(sessions.call_tool(crm, "whoami"), timeout=30)
                assert "crm" not in str(err.value) or "unavailable" in str(err.value)
                assert sessions.stats().discarded_total.get("error") == 1
                mcp_server.down = False
                # A new session is opened, never the errored one.
                assert _tenant(await sessions.call_tool(crm, "whoami")) == "acme"
            assert sessions.stats().initialized_total == 2
        finally:
            await sessions.aclose()


async def test_no_server_at_all_is_unavailable_within_the_timeout() -> None:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    dest = toolpool.Destination("gone", f"http://127.0.0.1:{port}")
    async with toolpool.Pool([dest], warmup=0) as pool:
        sessions = McpSessions(pool)
        try:
            with pytest.raises(McpUnavailable):
                await asyncio.wait_for(
                    sessions.call_tool(McpServer(f"http://127.0.0.1:{port}/mcp", timeout=5), "x"),
                    timeout=30,
                )
        finally:
            await sessions.aclose()


async def test_idle_sessions_close_after_their_ttl(mcp_server: McpTestServer) -> None:
    async with toolpool.Pool([_dest(mcp_server)], warmup=0) as pool:
        sessions = McpSessions(pool, idle_ttl=0.2)
        crm = McpServer(mcp_server.url)
        try:
            with toolpool.auth_context(GLOBEX):
                await sessions.call_tool(crm, "whoami")
            for _ in range(300):
                if sessions.stats().open == 0:
                    break
                await asyncio.sleep(0.02)
            assert sessions.stats().open == 0
            assert sessions.stats().discarded_total == {"idle_ttl": 1}
            with toolpool.auth_context(GLOBEX):
                assert _tenant(await sessions.call_tool(crm, "whoami")) == "globex"
            assert sessions.stats().initialized_total == 2
        finally:
            await sessions.aclose()


def test_server_config_is_checked_and_headers_stay_out_of_reprs() -> None:
    with pytest.raises(toolpool.ConfigError):
        McpServer("ftp://x")
    with pytest.raises(toolpool.ConfigError):
        McpServer("http://127.0.0.1/mcp", timeout=0)
    server = McpServer("http://127.0.0.1/mcp", headers={"X-Api-Key": "s3cret"})
    assert "s3cret" not in repr(server)


async def test_sessions_of_a_pool_end_before_it_closes(
    mcp_server: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`await pool.aclose()` ends `sessions_of(pool)`'s sessions first: each stateful one
    with its DELETE (sent while the pool is still open), their tasks done, nothing sent after
    the pool closed, no warning from the MCP client or toolpool."""
    caplog.set_level(logging.WARNING)
    pool = toolpool.Pool([_dest(mcp_server, max_connections=8)], warmup=0)
    sessions = sessions_of(pool)
    crm = McpServer(mcp_server.url)
    for ctx in (ACME, GLOBEX):
        result = await asyncio.wait_for(sessions.call_tool(crm, "whoami", ctx=ctx), 60)
        assert _tenant(result) == ctx.tenant
    tasks = [s.task for s in sessions._sessions.values()]
    assert len(tasks) == 2 and not any(t is None or t.done() for t in tasks)
    await asyncio.wait_for(pool.aclose(), 60)
    assert all(t is not None and t.done() for t in tasks)
    assert sessions.stats().open == 0
    assert sessions.stats().discarded_total == {"closed": 2}
    sent = len(mcp_server.methods), mcp_server.gets, mcp_server.deletes
    assert mcp_server.deletes == (2 if mcp_server.stateful else 0)
    with pytest.raises(McpUnavailable, match="closed"):
        await sessions.call_tool(crm, "whoami", ctx=ACME)
    assert (len(mcp_server.methods), mcp_server.gets, mcp_server.deletes) == sent
    assert _client_warnings(caplog) == []


async def test_sessions_end_when_their_pool_is_closed_from_sync_code(
    mcp_server: McpTestServer, caplog: pytest.LogCaptureFixture
) -> None:
    """`pool.close()` (sync, here from another thread) stops the sessions on their loop;
    their DELETEs are not sent (the pool is closed) and nothing warns."""
    caplog.set_level(logging.WARNING)
    pool = toolpool.Pool([_dest(mcp_server, max_connections=8)], warmup=0)
    sessions = sessions_of(pool)
    crm = McpServer(mcp_server.url)
    result = await asyncio.wait_for(sessions.call_tool(crm, "whoami", ctx=ACME), 60)
    assert _tenant(result) == "acme"
    tasks = [s.task for s in sessions._sessions.values()]
    assert len(tasks) == 1 and tasks[0] is not None
    await asyncio.to_thread(pool.close)
    await asyncio.wait_for(asyncio.gather(*(t for t in tasks if t is not None)), 30)
    assert sessions.stats().open == 0
    assert mcp_server.deletes == 0
    assert _client_warnings(caplog) == []


def _client_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Warnings and errors logged on the client side (the FastMCP server in the same process
    logs its own "Error in standalone SSE writer" when a session's DELETE ends its stream)."""
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith(("mcp.server", "uvicorn"))
    ]
