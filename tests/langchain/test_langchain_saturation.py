"""A saturated destination: the model reads "busy, retry in N s" results, the run goes on,
nothing leaks, and the tool-call concurrency backs off once per burst."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime, tool
from langchain_core.messages import ToolMessage

import toolpool
from tests._support.langchain_tools import Ctx, by_context, calls, make_pool, tenant_of
from toolpool.langchain import ToolpoolMiddleware
from toolpool.langchain.testing import ScriptedChatModel
from toolpool.testing import Downstream


async def _until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        await asyncio.sleep(0.005)


def _until_sync(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for: {what}")
        time.sleep(0.005)


@pytest.fixture
async def tight_pool(ds: Downstream) -> AsyncIterator[toolpool.Pool]:
    """'crm' with 2 connections and a wait queue of 4."""
    pool = make_pool(ds, max_connections=2, queue_factor=2)
    async with pool:
        yield pool


def _tool_messages(output: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in output["messages"] if isinstance(m, ToolMessage)]


async def test_saturation_turns_into_busy_results(
    ds: Downstream, tight_pool: toolpool.Pool
) -> None:
    hold = asyncio.Event()
    crm = ds.url("crm")

    @tool
    async def held_lookup(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Look up, holding the connection until the test lets go."""
        async with httpx.AsyncClient(timeout=30.0) as client:
            headers = {"X-Tenant": tenant_of(runtime)}
            async with client.stream("GET", f"{crm}/anything", headers=headers) as r:
                await hold.wait()
                await r.aread()
        return json.dumps({"tenant": r.json()["tenant"]})

    model = ScriptedChatModel(tool_calls=calls(("held_lookup", 10)))
    middleware = ToolpoolMiddleware(tight_pool, auth=by_context, max_wait=1.0)
    agent = create_agent(model, [held_lookup], context_schema=Ctx, middleware=[middleware])
    runs = [
        asyncio.create_task(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)))
        for t in ("acme", "globex")
    ]
    # 20 calls at once: 2 hold the connections; the other 18 wait at the gate (a tool call
    # does not take a place in the pool's queue, which would go in arrival order, not
    # tenant by tenant) and are answered busy when max_wait runs out.
    dest = tight_pool.destination("crm")
    await _until(lambda: middleware.busy_total == 18, "18 busy answers")
    await _until(lambda: dest.state.in_use == 2 and dest.state.waiting == 0, "2 in use")
    assert not all(run.done() for run in runs)  # the held calls keep a run going
    hold.set()
    outs = await asyncio.gather(*runs)  # no exception escapes the runs

    messages = [m for out in outs for m in _tool_messages(out)]
    assert len(messages) == 20
    busy = [m for m in messages if m.status == "error"]
    done = [m for m in messages if m.status != "error"]
    assert len(busy) == 18
    assert len(done) == 2
    for m in busy:
        text = str(m.content)
        assert text.startswith("tool 'held_lookup' could not run: destination 'crm' is busy")
        assert "retry in" in text
        assert m.tool_call_id
    for tenant, out in zip(("acme", "globex"), outs, strict=True):
        for m in _tool_messages(out):
            if m.status != "error":
                assert json.loads(str(m.content)) == {"tenant": tenant}
        # The model read every result, busy ones included, and answered.
        answer = str(out["messages"][-1].content)
        busy_here = sum(1 for m in _tool_messages(out) if m.status == "error")
        assert answer.count("could not run") == busy_here
    assert len(model.tool_results) == 20
    assert sum(1 for m in model.tool_results if "is busy" in str(m.content)) == 18

    # Nothing leaks: no connection in use, no waiter, no tool slot held.
    stats = tight_pool.stats()["crm"]
    assert stats.in_use == 0
    assert stats.waiting == 0
    assert ds.stats("crm").peak_connections <= 2
    limiter = middleware.concurrency
    assert limiter is not None
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
    # A burst of refusals is one congestion signal, not one per refusal: each run's burst
    # halves the limit at most once (twice if the second run's calls started after the first
    # halving), where 14 separate signals would have driven it down to 1.
    assert 1 <= limiter.decreases_total <= 2
    assert limiter.limit == 64 >> limiter.decreases_total


async def test_declared_destinations_wait_for_admission_instead(
    ds: Downstream, tight_pool: toolpool.Pool
) -> None:
    """The same burst with the tool's destination declared: admission lets 2 calls in (one
    per connection) and holds the other 18 back at the gate until those finish, so every
    call runs and none is answered busy (also while connections change hands between the
    two tenants: admission counts closing connections against capacity)."""
    hold = asyncio.Event()
    crm = ds.url("crm")

    @tool
    async def held_lookup(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Look up, holding the connection until the test lets go."""
        async with httpx.AsyncClient(timeout=30.0) as client:
            headers = {"X-Tenant": tenant_of(runtime)}
            async with client.stream("GET", f"{crm}/anything", headers=headers) as r:
                await hold.wait()
                await r.aread()
        return json.dumps({"tenant": r.json()["tenant"]})

    middleware = ToolpoolMiddleware(
        tight_pool, auth=by_context, max_wait=30.0, destinations={"held_lookup": ["crm"]}
    )
    agent = create_agent(
        ScriptedChatModel(tool_calls=calls(("held_lookup", 10))),
        [held_lookup],
        context_schema=Ctx,
        middleware=[middleware],
    )
    runs = [
        asyncio.create_task(agent.ainvoke({"messages": [("user", "go")]}, context=Ctx(t)))
        for t in ("acme", "globex")
    ]
    dest = tight_pool.destination("crm")
    await _until(
        lambda: dest.state.in_use == 2 and tight_pool.saturation("crm").queued == 18,
        "2 in use, 18 waiting at the gate",
    )
    assert dest.state.waiting == 0  # nobody in the pool's queue
    assert tight_pool.saturation("crm").state == "busy"
    await ds.wait_stats_async("crm", lambda st: st.requests_total >= 2)
    assert ds.stats("crm").requests_total == 2
    hold.set()
    outs = await asyncio.gather(*runs)
    for tenant, out in zip(("acme", "globex"), outs, strict=True):
        messages = _tool_messages(out)
        assert len(messages) == 10
        assert [m.content for m in messages if m.status != "success"] == []
        assert {json.loads(str(m.content))["tenant"] for m in messages} == {tenant}
    assert middleware.busy_total == 0
    assert tight_pool.stats()["crm"].saturated_total == 0
    assert ds.stats("crm").peak_connections <= 2


def test_saturation_sync_invocation(ds: Downstream) -> None:
    hold = threading.Event()
    crm = ds.url("crm")

    @tool
    def held_lookup(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Look up (blocking), holding the connection until the test lets go."""
        with httpx.Client(timeout=30.0) as client:
            headers = {"X-Tenant": tenant_of(runtime)}
            with client.stream("GET", f"{crm}/anything", headers=headers) as r:
                hold.wait(30)
                r.read()
        return "ok"

    with make_pool(ds, max_connections=1, queue_factor=1) as pool:
        middleware = ToolpoolMiddleware(pool, auth=by_context, max_wait=1.0)
        agent = create_agent(
            ScriptedChatModel(tool_calls=calls(("held_lookup", 6))),
            [held_lookup],
            context_schema=Ctx,
            middleware=[middleware],
        ).with_config(max_concurrency=6)
        result: list[dict[str, Any]] = []
        runner = threading.Thread(
            target=lambda: result.append(
                agent.invoke({"messages": [("user", "go")]}, context=Ctx("acme"))
            )
        )
        runner.start()
        # 6 calls: 1 holds the connection, 5 wait at the gate and are answered busy.
        _until_sync(lambda: middleware.busy_total == 5, "5 busy answers")
        hold.set()
        runner.join(60)
        assert len(result) == 1
        messages = _tool_messages(result[0])
        assert sorted(m.status for m in messages) == ["error"] * 5 + ["success"]
        assert all("is busy" in str(m.content) for m in messages if m.status == "error")
        assert pool.stats()["crm"].in_use == 0
        assert pool.stats()["crm"].waiting == 0


async def test_busy_errors_wrapped_by_the_tool_are_still_busy(pool: toolpool.Pool) -> None:
    def saturated() -> toolpool.PoolSaturated:
        return toolpool.PoolSaturated(
            "crm", in_use=2, waiting=4, max_connections=2, queue_limit=4, retry_after=0.25
        )

    @tool
    def wraps_it(q: str) -> str:
        """Re-raises the busy error as its own error."""
        try:
            raise saturated()
        except httpx.TransportError as exc:
            raise RuntimeError("CRM lookup failed") from exc

    @tool
    def groups_it(q: str) -> str:
        """Raises from a task group, as SDKs that run requests in task groups do."""
        raise ExceptionGroup("unhandled errors in a TaskGroup", [saturated()])

    model = ScriptedChatModel(tool_calls=calls(("wraps_it", 1), ("groups_it", 1)))
    middleware = ToolpoolMiddleware(pool, auth=toolpool.AuthContext(tenant="acme"))
    agent = create_agent(model, [wraps_it, groups_it], middleware=[middleware])
    out = await agent.ainvoke({"messages": [("user", "go")]})
    messages = _tool_messages(out)
    assert [m.status for m in messages] == ["error", "error"]
    for m in messages:
        assert "destination 'crm' is busy (4 waiting); retry in 0.2 s" in str(m.content)
    assert middleware.busy_total == 2


async def test_admission_waits_for_a_saturated_destination_then_runs(
    ds: Downstream, tight_pool: toolpool.Pool
) -> None:
    """A call to a destination that is saturated right now waits (up to max_wait) instead
    of failing, and runs once the queue drains."""
    client = tight_pool.client(timeout=httpx.Timeout(30.0, pool=None))
    with toolpool.auth_context(toolpool.AuthContext(tenant="other")):
        hogs = [asyncio.create_task(client.get(ds.url("crm") + "/hang")) for _ in range(6)]
    dest = tight_pool.destination("crm")
    await _until(lambda: dest.state.in_use == 2 and dest.state.waiting == 4, "saturated")
    await ds.wait_stats_async("crm", lambda st: st.requests_total >= 2)  # both hogs arrived

    crm = ds.url("crm")

    @tool
    async def lookup(q: str) -> str:
        """Look up."""
        async with httpx.AsyncClient(timeout=30.0) as c:
            return str((await c.get(f"{crm}/anything", headers={"X-Tenant": "acme"})).status_code)

    middleware = ToolpoolMiddleware(
        tight_pool,
        auth=toolpool.AuthContext(tenant="acme"),
        max_wait=60.0,
        destinations={"lookup": ["crm"]},
    )
    agent = create_agent(
        ScriptedChatModel(tool_calls=calls(("lookup", 1))), [lookup], middleware=[middleware]
    )
    run = asyncio.create_task(agent.ainvoke({"messages": [("user", "go")]}))
    await asyncio.sleep(0.2)  # a correct admission is still waiting however long this takes
    assert not run.done()
    assert ds.stats("crm").requests_total == 2  # only the two hogs reached the service
    for hog in hogs:
        hog.cancel()  # the destination drains: admission lets the call through
    await asyncio.gather(*hogs, return_exceptions=True)
    out = await asyncio.wait_for(run, 30)
    messages = _tool_messages(out)
    assert [(m.status, m.content) for m in messages] == [("success", "200")]
    assert middleware.busy_total == 0
    await client.aclose()
