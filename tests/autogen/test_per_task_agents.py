"""Agents built and wrapped per task on one pool (issue 25): they share one tool-call limit
and what admission learned, so a storm of them waits at the workbench instead of piling into
the pool's queues, where waiting tenants close each other's idle connections."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_core.tools import FunctionTool

import toolpool
from tests._support.autogen_replay import replay_model, tenant_headers
from toolpool.autogen import PooledWorkbench, wrap
from toolpool.testing import Downstream

TENANTS = [toolpool.AuthContext(tenant=t) for t in ("acme", "globex", "initech")]


async def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.005)


def _workbench(agent: AssistantAgent) -> PooledWorkbench:
    (wb,) = agent._workbench
    assert isinstance(wb, PooledWorkbench)
    return wb


async def test_agents_wrapped_per_task_share_one_tool_call_limit(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    url = downstream.url("crm") + "/anything"
    release = asyncio.Event()
    inside = 0
    peak = 0

    async def lookup(n: int) -> str:
        """One CRM request, held until the test lets it finish."""
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        try:
            await release.wait()
            async with httpx.AsyncClient() as client:
                return (await client.get(url, headers=tenant_headers())).text
        finally:
            inside -= 1

    tool = FunctionTool(lookup, description="Look up one item.")
    agents = []
    for ctx in TENANTS:  # one agent per task, each wrapped on its own, as applications do
        model = replay_model([("lookup", {"n": i}) for i in range(2)], "done")
        agents.append(
            wrap(
                AssistantAgent(ctx.tenant, model_client=model, tools=[tool]),
                pool,
                max_parallel_tool_calls=2,
            )
        )
    limiter = _workbench(agents[0]).concurrency
    assert all(_workbench(a).concurrency is limiter for a in agents)
    assert all(_workbench(a).admission is _workbench(agents[0]).admission for a in agents)

    async def run(agent: AssistantAgent, ctx: toolpool.AuthContext) -> None:
        with toolpool.auth_context(ctx):
            result = await agent.run(task="look everything up")
        # Without reflection the run ends with its tool results: both ran, for its tenant.
        assert str(result.messages[-1].content).count(f'"tenant":"{ctx.tenant}"') == 2

    runs = [asyncio.create_task(run(a, ctx)) for a, ctx in zip(agents, TENANTS, strict=True)]
    try:
        # Six calls arrived: two run, four wait for a slot of the shared limit (each agent's
        # own limit of 2 would have let all six in).
        await _until(lambda: limiter.in_flight + limiter.waiting == 6)
        assert (limiter.in_flight, limiter.waiting, inside) == (2, 4, 2)
        release.set()
        await asyncio.wait_for(asyncio.gather(*runs), timeout=60)
    finally:
        release.set()
        for task in runs:
            task.cancel()
    assert peak == 2
    assert (limiter.in_flight, limiter.waiting) == (0, 0)
    assert pool.stats()["crm"].acquired_total == 6
    # Agents wrapped with other settings get gates of their own.
    other = wrap(AssistantAgent("x", model_client=replay_model("done"), tools=[tool]), pool)
    assert _workbench(other).concurrency is not limiter


async def test_an_agent_wrapped_later_knows_the_destinations_earlier_agents_used(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    url = downstream.url("crm") + "/anything"

    async def lookup() -> str:
        """One CRM request."""
        async with httpx.AsyncClient() as client:
            return (await client.get(url, headers=tenant_headers())).text

    tool = FunctionTool(lookup, description="Look up.")
    first = wrap(
        AssistantAgent("first", model_client=replay_model([("lookup", {})], "done"), tools=[tool]),
        pool,
        max_wait=1.0,
    )
    with toolpool.auth_context(TENANTS[0]):
        await asyncio.wait_for(first.run(task="go"), timeout=60)
    # A new agent for the next task, wrapped with other settings (its own gates): admission
    # still applies to its first call, from what the first agent's traffic taught the pool.
    later = wrap(AssistantAgent("later", model_client=replay_model("done"), tools=[tool]), pool)
    assert _workbench(later).admission is not _workbench(first).admission
    assert _workbench(later).admission.destinations("lookup") == {"crm"}


async def test_shared_gates_do_not_keep_a_pool_alive(downstream: Downstream) -> None:
    # The gates live on the pool (a module-level map would keep every pool ever wrapped on).
    pool = toolpool.Pool([toolpool.Destination("crm", downstream.url("crm"))], warmup=0)
    agent = wrap(AssistantAgent("a", model_client=replay_model("done")), pool)
    assert _workbench(agent).pool is pool
    gone = weakref.ref(pool)
    del pool, agent
    gc.collect()
    assert gone() is None
