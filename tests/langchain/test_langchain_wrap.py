"""An existing agent with naive httpx tools, wrapped in one call: pooled, per tenant, in every
invocation style (async/sync, context=/configurable, post-hoc/middleware, nested)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict

import httpx
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware
from langchain.tools import ToolRuntime, tool
from langchain_core.messages import ToolMessage
from langgraph.graph import START, StateGraph
from langgraph.prebuilt.tool_node import ToolCallRequest

import toolpool
from tests._support.langchain_tools import (
    Ctx,
    by_configurable,
    by_context,
    calls,
    naive_tools,
    tenant_of,
)
from toolpool.langchain import ToolpoolMiddleware, middleware_of, tool_nodes, wrap
from toolpool.langchain.testing import ScriptedChatModel
from toolpool.testing import Downstream

TENANTS = ("acme", "globex")
PARALLEL = calls(("crm_lookup", 5), ("search_docs", 5))
PARALLEL_SYNC = calls(("crm_lookup_sync", 5), ("search_docs", 5))


def _results(output: dict[str, Any]) -> list[dict[str, Any]]:
    """The tool results of one run, parsed."""
    return [json.loads(str(m.content)) for m in output["messages"] if isinstance(m, ToolMessage)]


def _check_affinity(ds: Downstream, *, per_destination: int) -> None:
    for name in ("crm", "search"):
        stats = ds.stats(name)
        assert stats.mixed_connections() == {}, f"{name}: a connection carried two tenants"
        assert stats.connections_accepted <= per_destination, (
            f"{name}: {stats.connections_accepted} connections for {stats.requests_total} calls"
        )


async def test_wrap_pools_an_existing_agent_async(ds: Downstream, pool: toolpool.Pool) -> None:
    model = ScriptedChatModel(tool_calls=PARALLEL)
    agent = create_agent(model, naive_tools(ds), context_schema=Ctx)

    # Control: unwrapped, every tool call opens its own connection.
    out = await agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("acme"))
    assert [r["pooled"] for r in _results(out)] == [False] * 10
    assert ds.stats("crm").connections_accepted == 5
    assert ds.stats("search").connections_accepted == 5
    ds.reset_stats()

    assert wrap(agent, pool, auth=by_context) is agent
    for _round in range(3):
        outs = await asyncio.gather(
            *(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS)
        )
        for tenant, output in zip(TENANTS, outs, strict=True):
            results = _results(output)
            assert len(results) == 10
            assert {r["tenant"] for r in results} == {tenant}
            assert all(r["pooled"] for r in results)
    assert ds.stats("crm").requests_total == 30
    assert ds.stats("search").requests_total == 30
    # 30 calls per destination; without the pool, 30 connections each. With it, at most one
    # per call in flight of each tenant (5 + 5), reused across the runs.
    _check_affinity(ds, per_destination=10)
    stats = pool.stats()
    assert stats["crm"].reused_total >= 20
    assert stats.in_use == 0
    assert stats.waiting == 0


def test_wrap_pools_sync_invocation_with_configurable_tenant(ds: Downstream) -> None:
    from tests._support.langchain_tools import make_pool

    with make_pool(ds) as pool:
        model = ScriptedChatModel(tool_calls=PARALLEL_SYNC)
        agent = wrap(create_agent(model, naive_tools(ds)), pool, auth=by_configurable)

        def run(tenant: str) -> dict[str, Any]:
            return agent.invoke(
                {"messages": [("user", "go")]}, config={"configurable": {"tenant_id": tenant}}
            )

        with ThreadPoolExecutor(2) as runner:
            for _round in range(3):
                outs = list(runner.map(run, TENANTS))
                for tenant, output in zip(TENANTS, outs, strict=True):
                    results = _results(output)
                    assert len(results) == 10
                    assert {r["tenant"] for r in results} == {tenant}
                    assert all(r["pooled"] for r in results)
        assert ds.stats("crm").requests_total == 30
        _check_affinity(ds, per_destination=10)
        assert pool.stats().in_use == 0


async def test_middleware_form_async_and_sync(ds: Downstream, pool: toolpool.Pool) -> None:
    model = ScriptedChatModel(tool_calls=calls(("crm_lookup_sync", 3), ("search_docs", 3)))
    middleware = ToolpoolMiddleware(pool, auth=by_context)
    agent = create_agent(model, naive_tools(ds), context_schema=Ctx, middleware=[middleware])
    outs = await asyncio.gather(
        *(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS)
    )
    sync_outs = await asyncio.to_thread(
        lambda: [agent.invoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS]
    )
    for tenant, output in zip(TENANTS * 2, outs + sync_outs, strict=True):
        results = _results(output)
        assert len(results) == 6
        assert {r["tenant"] for r in results} == {tenant}
        assert all(r["pooled"] for r in results)
    _check_affinity(ds, per_destination=12)
    assert middleware.admission.destinations("search_docs") == frozenset({"search"})
    assert middleware.admission.destinations("crm_lookup_sync") == frozenset({"crm"})
    assert middleware.busy_total == 0


async def test_ambient_auth_context_is_used_when_auth_is_none(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    model = ScriptedChatModel(tool_calls=calls(("crm_lookup", 4)))
    agent = wrap(create_agent(model, naive_tools(ds), context_schema=Ctx), pool)

    async def run(tenant: str) -> dict[str, Any]:
        with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
            return await agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(tenant))

    # One after the other: a wrong identity would reuse the first tenant's idle connections.
    outs = [await run(t) for t in TENANTS * 2]
    for tenant, output in zip(TENANTS * 2, outs, strict=True):
        assert {r["tenant"] for r in _results(output)} == {tenant}
        assert all(r["pooled"] for r in _results(output))
    assert ds.stats("crm").mixed_connections() == {}
    assert ds.stats("crm").connections_accepted <= 8


async def test_missing_tenant_fails_with_what_to_pass(ds: Downstream, pool: toolpool.Pool) -> None:
    agent = wrap(
        create_agent(ScriptedChatModel(tool_calls=calls(("crm_lookup", 1))), naive_tools(ds)),
        pool,
        auth=by_context,
    )
    with pytest.raises(toolpool.ConfigError) as info:
        await agent.ainvoke({"messages": [("user", "go")]})
    assert "context=" in str(info.value)
    assert "AttributeError" in str(info.value)
    assert ds.stats("crm").requests_total == 0


async def test_other_tool_errors_behave_as_without_toolpool(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    @tool
    def broken(q: str) -> str:
        """Always fails."""
        raise ValueError("broken tool")

    agent = wrap(
        create_agent(ScriptedChatModel(tool_calls=calls(("broken", 1))), [broken]),
        pool,
        auth=toolpool.AuthContext(tenant="acme"),
    )
    with pytest.raises(ValueError, match="broken tool"):
        await agent.ainvoke({"messages": [("user", "go")]})
    with pytest.raises(ValueError, match="broken tool"):
        await asyncio.to_thread(agent.invoke, {"messages": [("user", "go")]})


async def test_opt_out_of_httpx_pooling(ds: Downstream, pool: toolpool.Pool) -> None:
    model = ScriptedChatModel(tool_calls=calls(("crm_lookup", 2)))
    agent = wrap(
        create_agent(model, naive_tools(ds), context_schema=Ctx),
        pool,
        auth=by_context,
        pool_httpx=False,
    )
    out = await agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("acme"))
    assert [r["pooled"] for r in _results(out)] == [False, False]
    assert pool.stats().created_total == 0


async def test_wrap_goes_outside_the_agents_own_tool_middleware(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    """The agent's own tool middleware runs inside the tenant's scope."""
    seen: list[str | None] = []
    lock = threading.Lock()

    class Recorder(AgentMiddleware):
        def wrap_tool_call(
            self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]
        ) -> Any:
            ctx = toolpool.current_auth()
            with lock:
                seen.append(ctx.tenant if ctx else None)
            return handler(request)

        async def awrap_tool_call(
            self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
        ) -> Any:
            ctx = toolpool.current_auth()
            with lock:
                seen.append(ctx.tenant if ctx else None)
            return await handler(request)

    model = ScriptedChatModel(tool_calls=calls(("crm_lookup_sync", 2)))
    agent = create_agent(model, naive_tools(ds), context_schema=Ctx, middleware=[Recorder()])
    wrap(agent, pool, auth=by_context)
    out = await agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("globex"))
    await asyncio.to_thread(agent.invoke, {"messages": [("user", "go")]}, context=Ctx("acme"))
    assert all(r["pooled"] for r in _results(out))
    assert sorted(seen, key=str) == ["acme", "acme", "globex", "globex"]


async def test_tool_concurrency_caps_parallel_tool_calls(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    """10 tool calls in one turn, tool_concurrency=3: at most 3 tool bodies run at once."""
    lock = threading.Lock()
    running = 0
    peak = 0
    three_in = asyncio.Event()
    loop = asyncio.get_running_loop()
    crm = ds.url("crm")

    @tool
    async def counted(q: str) -> str:
        """Counts how many of its calls run at once."""
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            if running == 3:
                loop.call_soon_threadsafe(three_in.set)
        try:
            # The first three wait for each other: with the cap they all get in (and no
            # fourth joins them); with a cap below 3 this would time out.
            await asyncio.wait_for(three_in.wait(), 30)
            async with httpx.AsyncClient() as client:
                await client.get(f"{crm}/anything", headers={"X-Tenant": "acme"})
        finally:
            with lock:
                running -= 1
        return "ok"

    agent = wrap(
        create_agent(ScriptedChatModel(tool_calls=calls(("counted", 10))), [counted]),
        pool,
        auth=toolpool.AuthContext(tenant="acme"),
        tool_concurrency=3,
    )
    out = await agent.ainvoke({"messages": [("user", "go")]})
    assert [m.content for m in out["messages"] if isinstance(m, ToolMessage)] == ["ok"] * 10
    assert peak == 3
    limiter = middleware_of(agent).concurrency  # type: ignore[union-attr]
    assert limiter is not None
    assert limiter.in_flight == 0


def test_wrap_refuses_what_it_cannot_wrap(ds: Downstream) -> None:
    pool = toolpool.Pool()
    with pytest.raises(toolpool.ConfigError, match="compiled LangGraph agent"):
        wrap(object(), pool)
    bare = create_agent(ScriptedChatModel(), [])
    with pytest.raises(toolpool.ConfigError, match="no ToolNode"):
        wrap(bare, pool)
    agent = create_agent(ScriptedChatModel(), naive_tools(ds))
    wrap(agent, pool)
    assert isinstance(middleware_of(agent), ToolpoolMiddleware)
    with pytest.raises(toolpool.ConfigError, match="already wrapped"):
        wrap(agent, pool)
    with pytest.raises(toolpool.ConfigError, match=r"toolpool\.Pool"):
        ToolpoolMiddleware("not a pool")  # type: ignore[arg-type]
    with pytest.raises(toolpool.ConfigError, match="auth="):
        ToolpoolMiddleware(pool, auth="acme")  # type: ignore[arg-type]


class _Outer(TypedDict):
    messages: list[Any]


async def test_agent_inside_a_parent_graph_is_found_and_pooled(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    inner = create_agent(
        ScriptedChatModel(tool_calls=calls(("crm_lookup", 4))),
        naive_tools(ds),
        context_schema=Ctx,
    )
    parent_graph = StateGraph(_Outer, context_schema=Ctx)
    parent_graph.add_node("agent", inner)
    parent_graph.add_edge(START, "agent")
    parent = parent_graph.compile()
    assert len(tool_nodes(parent)) == 1
    wrap(parent, pool, auth=by_context)
    # One after the other: a wrong identity would reuse the first tenant's idle connections.
    outs = [await parent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS]
    for tenant, output in zip(TENANTS, outs, strict=True):
        results = _results(output)
        assert len(results) == 4
        assert {r["tenant"] for r in results} == {tenant}
        assert all(r["pooled"] for r in results)
    assert ds.stats("crm").mixed_connections() == {}


async def test_an_agent_called_by_a_tool_inherits_the_scope(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    """Only the outer agent is wrapped; the specialist it calls from a tool is not, yet its
    tools' clients are pooled for the same tenant (the scope is a context variable)."""
    specialist = create_agent(
        ScriptedChatModel(tool_calls=calls(("crm_lookup", 3))),
        naive_tools(ds),
        context_schema=Ctx,
    )

    @tool
    async def ask_specialist(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Ask the CRM specialist agent."""
        out = await specialist.ainvoke({"messages": [("user", q)]}, context=Ctx(tenant_of(runtime)))
        return json.dumps(_results(out))

    outer = wrap(
        create_agent(
            ScriptedChatModel(tool_calls=calls(("ask_specialist", 2))),
            [ask_specialist],
            context_schema=Ctx,
        ),
        pool,
        auth=by_context,
    )
    outs = await asyncio.gather(
        *(outer.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)) for t in TENANTS)
    )
    for tenant, output in zip(TENANTS, outs, strict=True):
        nested = [r for batch in _results(output) for r in batch]  # type: ignore[attr-defined]
        assert len(nested) == 6
        assert {r["tenant"] for r in nested} == {tenant}
        assert all(r["pooled"] for r in nested)
    assert ds.stats("crm").mixed_connections() == {}
    assert ds.stats("crm").connections_accepted <= 12
    assert middleware_of(outer) is not None
    assert middleware_of(outer).admission.destinations("ask_specialist") == {"crm"}  # type: ignore[union-attr]


def test_wrapped_client_is_not_the_pool(ds: Downstream) -> None:
    """Sanity: a tool's client built outside any run is untouched by wrap."""
    with httpx.Client() as client:
        r = client.get(ds.url("crm") + "/anything")
    assert "toolpool" not in r.extensions
