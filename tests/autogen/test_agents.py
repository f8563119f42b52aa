"""Real AutoGen agents and teams (replay models) on a pool, against the loopback downstream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat
from autogen_core.models import FunctionExecutionResult
from autogen_core.tools import StaticStreamWorkbench

import toolpool
from tests._support.autogen_replay import describe, replay_model, tenant_headers
from toolpool.autogen import PooledWorkbench, unwrap, wrap
from toolpool.testing import Downstream

ACME = toolpool.AuthContext(tenant="acme")
GLOBEX = toolpool.AuthContext(tenant="globex")


def crm_tools(ds: Downstream) -> list[Callable[..., Any]]:
    """Two tools written the naive way: a new httpx client per call, async and sync."""
    url = ds.url("crm") + "/anything"

    async def fetch_async(n: int) -> str:
        """Look up record n (async tool, its own httpx.AsyncClient)."""
        async with httpx.AsyncClient() as client:
            return describe(await client.get(url, params={"n": n}, headers=tenant_headers()))

    def fetch_sync(n: int) -> str:
        """Look up record n (sync tool, its own httpx.Client, run in a worker thread)."""
        with httpx.Client() as client:
            return describe(client.get(url, params={"n": n}, headers=tenant_headers()))

    return [fetch_async, fetch_sync]


# One model turn: four parallel tool calls, two of each kind.
TURN = [("fetch_async", {"n": 1}), ("fetch_async", {"n": 2})]
TURN += [("fetch_sync", {"n": 3}), ("fetch_sync", {"n": 4})]


def agent(name: str, ds: Downstream, *turns: Any, iterations: int = 1) -> AssistantAgent:
    return AssistantAgent(
        name,
        model_client=replay_model(*turns),
        tools=crm_tools(ds),
        max_tool_iterations=iterations,
        reflect_on_tool_use=True,
    )


async def run_as(target: Any, ctx: toolpool.AuthContext, task: str = "go") -> TaskResult:
    with toolpool.auth_context(ctx):
        result: TaskResult = await target.run(task=task)
        return result


def tool_results(result: TaskResult, source: str | None = None) -> list[FunctionExecutionResult]:
    return [
        r
        for m in result.messages
        if isinstance(m, ToolCallExecutionEvent) and (source is None or m.source == source)
        for r in m.content
    ]


def served_tenants(results: Sequence[FunctionExecutionResult]) -> list[str | None]:
    """The tenant the downstream says it served, per tool call (errors fail the test)."""
    assert results
    assert not [r for r in results if r.is_error], [r.content for r in results]
    return [json.loads(r.content)["tenant"] for r in results]


async def test_two_tenants_concurrently_few_connections_each_serving_one_tenant(
    downstream: Downstream,
) -> None:
    pool = toolpool.Pool([toolpool.Destination("crm", downstream.url("crm"))], warmup=0)
    async with pool:
        acme = wrap(agent("acme_agent", downstream, TURN, TURN, TURN, "done", iterations=3), pool)
        globex = wrap(
            agent("globex_agent", downstream, TURN, TURN, TURN, "done", iterations=3), pool
        )
        res_acme, res_globex = await asyncio.gather(run_as(acme, ACME), run_as(globex, GLOBEX))

        assert served_tenants(tool_results(res_acme)) == ["acme"] * 12
        assert served_tenants(tool_results(res_globex)) == ["globex"] * 12
        stats = downstream.stats("crm")
        assert stats.requests_total == 24
        assert stats.mixed_connections() == {}
        assert set().union(*stats.connection_tenants.values()) == {"acme", "globex"}
        # At most 2 calls of one kind run at once per tenant: 2 tenants x 2 drivers
        # (asyncio, threads) x 2 connections, reused across the three turns.
        assert len(stats.connection_tenants) <= 8
        assert pool.stats()["crm"].reused_total >= 24 - 8
        assert (pool.stats().in_use, pool.stats().waiting) == (0, 0)


async def test_without_wrap_every_call_opens_a_connection_and_sync_tools_lose_the_tenant(
    downstream: Downstream,
) -> None:
    """The baseline the test above improves on (and the AutoGen behaviour wrap fixes)."""
    plain = agent("plain_agent", downstream, TURN, TURN, "done", iterations=2)
    result = await run_as(plain, ACME)

    tenants = served_tenants(tool_results(result))
    # Async tools see the ambient context; sync ones run in run_in_executor without it.
    assert tenants == ["acme", "acme", None, None] * 2
    stats = downstream.stats("crm")
    assert stats.requests_total == 8
    assert stats.connections_accepted == 8


async def test_sync_function_tool_keeps_the_auth_context_and_is_pooled(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    url = downstream.url("crm") + "/anything"

    def whoami() -> str:
        """Report the auth context and pooling seen inside the worker thread."""
        ctx = toolpool.current_auth()
        with httpx.Client() as client:
            response = client.get(url, headers=tenant_headers())
        return json.dumps(
            {
                "ctx": ctx.tenant if ctx is not None else None,
                "pooled": "toolpool" in response.extensions,
                "served": response.json()["tenant"],
            }
        )

    def make() -> AssistantAgent:
        return AssistantAgent(
            "who",
            model_client=replay_model([("whoami", {})], "done"),
            tools=[whoami],
            reflect_on_tool_use=True,
        )

    wrapped = await run_as(wrap(make(), pool), ACME)
    plain = await run_as(make(), ACME)

    assert json.loads(tool_results(wrapped)[0].content) == {
        "ctx": "acme",
        "pooled": True,
        "served": "acme",
    }
    assert json.loads(tool_results(plain)[0].content) == {
        "ctx": None,
        "pooled": False,
        "served": None,
    }


async def test_round_robin_team_with_two_wrapped_agents(downstream: Downstream) -> None:
    def team() -> RoundRobinGroupChat:
        tools = crm_tools(downstream)
        alice = AssistantAgent(
            "alice",
            model_client=replay_model(
                [("fetch_async", {"n": 1}), ("fetch_async", {"n": 2})], "alice done"
            ),
            tools=tools,
            reflect_on_tool_use=True,
        )
        bob = AssistantAgent(
            "bob",
            model_client=replay_model(
                [("fetch_async", {"n": 3}), ("fetch_async", {"n": 4}), ("fetch_sync", {"n": 5})],
                "bob done",
            ),
            tools=tools,
            reflect_on_tool_use=True,
        )
        return RoundRobinGroupChat([alice, bob], max_turns=2)

    pool = toolpool.Pool([toolpool.Destination("crm", downstream.url("crm"))], warmup=0)
    async with pool:
        teams = {"acme": wrap(team(), pool), "globex": wrap(team(), pool)}
        for t in teams.values():
            alice, bob = t._participants
            assert isinstance(alice, AssistantAgent)
            assert isinstance(bob, AssistantAgent)
            (wb_a,) = alice._workbench
            (wb_b,) = bob._workbench
            assert isinstance(wb_a, PooledWorkbench)
            assert isinstance(wb_b, PooledWorkbench)
            # One team, one admission gate and one adaptive limit.
            assert wb_a.admission is wb_b.admission
            assert wb_a.concurrency is wb_b.concurrency

        results = await asyncio.gather(run_as(teams["acme"], ACME), run_as(teams["globex"], GLOBEX))

        for tenant, result in zip(teams, results, strict=True):
            assert [m.source for m in result.messages if m.source != "user"][-1] == "bob"
            assert served_tenants(tool_results(result, "alice")) == [tenant] * 2
            assert served_tenants(tool_results(result, "bob")) == [tenant] * 3
        stats = downstream.stats("crm")
        assert stats.requests_total == 10
        assert stats.mixed_connections() == {}
        # Per tenant: 2 asyncio connections (alice opens them, bob reuses them) + 1 thread one.
        assert len(stats.connection_tenants) <= 6
        assert pool.stats()["crm"].reused_total >= 4
        assert (pool.stats().in_use, pool.stats().waiting) == (0, 0)

    for t in teams.values():
        unwrap(t)
        for member in t._participants:
            assert isinstance(member, AssistantAgent)
            assert [type(wb) for wb in member._workbench] == [StaticStreamWorkbench]


async def test_auth_sources_fixed_context_and_function_of_the_agent(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    fixed = wrap(agent("fixed", downstream, TURN, "done"), pool, auth=GLOBEX)
    by_agent = wrap(
        agent("initech", downstream, TURN, "done"),
        pool,
        auth=lambda a: toolpool.AuthContext(tenant=a.name),
    )
    # The fixed context wins over the ambient one; the function receives the agent.
    assert served_tenants(tool_results(await run_as(fixed, ACME))) == ["globex"] * 4
    assert served_tenants(tool_results(await run_as(by_agent, ACME))) == ["initech"] * 4


async def test_auth_function_that_finds_no_tenant_gives_error_results_not_a_hung_run(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    """AutoGen 0.7 waits forever when a workbench raises, so the ConfigError is the result."""
    broken = wrap(agent("broken", downstream, TURN, "done"), pool, auth=lambda a: a.tenant)
    result = await asyncio.wait_for(run_as(broken, ACME), timeout=60)

    results = tool_results(result)
    assert len(results) == 4
    for r in results:
        assert r.is_error
        assert "could not find the tenant" in r.content
        assert "toolpool.autogen.wrap()" in r.content
    assert downstream.stats("crm").requests_total == 0


async def test_selector_group_chat_with_wrapped_agents(downstream: Downstream) -> None:
    def member(name: str, n: int) -> AssistantAgent:
        return AssistantAgent(
            name,
            model_client=replay_model([("fetch_sync", {"n": n})], f"{name} done"),
            tools=crm_tools(downstream),
            reflect_on_tool_use=True,
        )

    # The selector's model picks bob, then alice.
    members = [member("alice", 1), member("bob", 2)]
    team = SelectorGroupChat(members, model_client=replay_model("bob", "alice"), max_turns=2)
    pool = toolpool.Pool([toolpool.Destination("crm", downstream.url("crm"))], warmup=0)
    async with pool:
        result = await run_as(wrap(team, pool), ACME)

    assert [m.source for m in result.messages if isinstance(m, ToolCallExecutionEvent)] == [
        "bob",
        "alice",
    ]
    served = [json.loads(r.content) for r in tool_results(result)]
    assert [s["tenant"] for s in served] == ["acme", "acme"]
    # Alice's sync call reused the connection bob's opened: one connection for the team.
    assert served[0]["connection_id"] == served[1]["connection_id"]
    assert downstream.stats("crm").connections_accepted == 1
