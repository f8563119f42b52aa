"""`PooledWorkbench` call by call: busy results, errors, admission, auth, cancellation,
streaming, serialization; and `wrap` / `unwrap` over agents and teams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from autogen_agentchat.agents import (
    AssistantAgent,
    MessageFilterAgent,
    MessageFilterConfig,
    PerSourceFilter,
    SocietyOfMindAgent,
    UserProxyAgent,
)
from autogen_agentchat.messages import TextMessage, ToolCallExecutionEvent, ToolCallRequestEvent
from autogen_agentchat.teams import RoundRobinGroupChat, SelectorGroupChat
from autogen_core import CancellationToken
from autogen_core.tools import (
    BaseStreamTool,
    FunctionTool,
    StaticStreamWorkbench,
    StaticWorkbench,
    TextResultContent,
    ToolOverride,
    ToolResult,
    ToolSchema,
    Workbench,
)
from pydantic import BaseModel

import toolpool
from tests._support.autogen_replay import replay_model, tenant_headers
from toolpool.autogen import ContextFunctionTool, PooledWorkbench, unwrap, wrap
from toolpool.testing import Downstream

ACME = toolpool.AuthContext(tenant="acme")


@asynccontextmanager
async def full_pool(ds: Downstream) -> AsyncIterator[toolpool.Pool]:
    """A pool whose "crm" destination is saturated: its one connection is held by a slow
    streaming response and its queue holds no waiter, so any other request is refused."""
    pool = toolpool.Pool(
        [toolpool.Destination("crm", ds.url("crm"), max_connections=1, queue_factor=0)],
        warmup=0,
    )
    async with pool:
        client = pool.client()
        url = ds.url("crm") + "/stream?chunks=2&size=1&delay=30"
        async with client.stream("GET", url) as held:
            assert held.status_code == 200
            assert pool.stats()["crm"].in_use == 1
            yield pool
    assert pool.stats()["crm"].in_use == 0


def workbench(pool: toolpool.Pool, *tools: Any, **kwargs: Any) -> PooledWorkbench:
    return PooledWorkbench(
        StaticStreamWorkbench([FunctionTool(t, description=t.__doc__ or "") for t in tools]),
        pool,
        **kwargs,
    )


def text(result: ToolResult) -> str:
    return result.to_text()


# ---------------------------------------------------------------------- busy destinations


async def test_busy_destination_becomes_an_error_result_the_model_can_act_on(
    downstream: Downstream,
) -> None:
    url = downstream.url("crm") + "/anything"

    async def lookup() -> str:
        """Raises the pool's PoolSaturated as is."""
        async with httpx.AsyncClient() as client:
            return (await client.get(url)).text

    def lookup_sync() -> str:
        """The same from a worker thread (httpx.Client)."""
        with httpx.Client() as client:
            return client.get(url).text

    async def wrapped_error() -> str:
        """Re-raises its own error from the transport error."""
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url)).text
        except httpx.HTTPError as exc:
            raise RuntimeError("crm lookup failed") from exc

    async with full_pool(downstream) as pool:
        for tool in (lookup, lookup_sync, wrapped_error):
            # max_wait=0: refused at the gate at once instead of waiting there first.
            wb = workbench(pool, tool, max_wait=0)
            result = await wb.call_tool(tool.__name__, {})
            assert result.is_error
            assert text(result).startswith(
                f"tool '{tool.__name__}' could not run: destination 'crm' is busy"
            )
            assert "retry in" in text(result)
            assert wb.concurrency.decreases_total == 1
        assert pool.destination("crm").policy.stats().rejections_total["queue_full"] == 3


async def test_tool_that_handles_busy_itself_keeps_its_result_but_lowers_the_limit(
    downstream: Downstream,
) -> None:
    url = downstream.url("crm") + "/anything"

    async def cached_lookup() -> str:
        """Falls back to a cached answer when the CRM is busy."""
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url)).text
        except toolpool.PoolSaturated:
            return "cached answer"

    async with full_pool(downstream) as pool:
        wb = workbench(pool, cached_lookup, max_wait=0)
        result = await wb.call_tool("cached_lookup", {})
        assert (result.is_error, text(result)) == (False, "cached answer")
        assert wb.concurrency.decreases_total == 1


async def test_other_tool_errors_stay_ordinary_error_results(pool: toolpool.Pool) -> None:
    def fails(record: str) -> str:
        """Always fails."""
        raise ValueError(f"no record {record!r}")

    wb = workbench(pool, fails)
    result = await wb.call_tool("fails", {"record": "42"})
    assert (result.is_error, text(result)) == (True, "no record '42'")
    assert wb.concurrency.decreases_total == 0
    missing = await wb.call_tool("nope", {})
    assert (missing.is_error, text(missing)) == (True, "Tool nope not found.")


async def test_admission_refuses_before_the_tool_body_runs(downstream: Downstream) -> None:
    entered = 0

    async def lookup() -> str:
        """Counts its runs."""
        nonlocal entered
        entered += 1
        return "ran"

    async with full_pool(downstream) as pool:
        wb = workbench(pool, lookup, max_wait=0.0, destinations={"lookup": ["crm"]})
        result = await wb.call_tool("lookup", {})
        assert result.is_error
        assert "destination 'crm' is" in text(result)
        assert "retry in" in text(result)
        assert entered == 0
    # Once the destination has room again, the same call runs.
    assert text(await wb.call_tool("lookup", {})) == "ran"
    assert entered == 1


async def test_admission_learns_the_destinations_of_a_tool_from_its_traffic(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    url = downstream.url("crm") + "/anything"

    async def lookup() -> str:
        """One request to the CRM."""
        async with httpx.AsyncClient() as client:
            return (await client.get(url)).text

    wb = workbench(pool, lookup)
    assert wb.admission.destinations("lookup") == frozenset()
    assert not (await wb.call_tool("lookup", {})).is_error
    assert wb.admission.destinations("lookup") == {"crm"}


# ---------------------------------------------------------------------- auth and threads


async def test_sync_function_tools_run_with_the_calls_context(pool: toolpool.Pool) -> None:
    def whoami(cancellation_token: CancellationToken) -> str:
        """A sync tool that also takes AutoGen's cancellation token."""
        ctx = toolpool.current_auth()
        assert isinstance(cancellation_token, CancellationToken)
        return ctx.tenant if ctx is not None and ctx.tenant else "nobody"

    def plain() -> str:
        """A sync tool without a cancellation token."""
        ctx = toolpool.current_auth()
        return ctx.tenant if ctx is not None and ctx.tenant else "nobody"

    wb = workbench(pool, whoami, plain, auth=ACME)
    assert all(isinstance(t, ContextFunctionTool) for t in wb._tools)
    assert text(await wb.call_tool("whoami", {})) == "acme"
    assert text(await wb.call_tool("plain", {})) == "acme"
    # AutoGen's own workbench loses the context in its executor thread.
    with toolpool.auth_context(ACME):
        inner = await wb.inner.call_tool("plain", {})
    assert text(inner) == "nobody"


class RecordingWorkbench(Workbench):
    """A workbench that is not a StaticWorkbench (like McpWorkbench): it answers with the
    auth context it runs in."""

    def __init__(self) -> None:
        self.calls = 0

    async def list_tools(self) -> list[ToolSchema]:
        return [ToolSchema(name="remote", description="a remote tool")]

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> ToolResult:
        self.calls += 1
        ctx = toolpool.current_auth()
        who = ctx.tenant if ctx is not None else None
        return ToolResult(name=name, result=[TextResultContent(content=f"{name} for {who}")])

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def reset(self) -> None:
        pass

    async def save_state(self) -> Mapping[str, Any]:
        return {"calls": self.calls}

    async def load_state(self, state: Mapping[str, Any]) -> None:
        self.calls = state["calls"]


async def test_any_other_workbench_gets_the_auth_context_and_admission(
    downstream: Downstream,
) -> None:
    inner = RecordingWorkbench()
    async with full_pool(downstream) as pool:
        wb = PooledWorkbench(inner, pool, auth=ACME, max_wait=0.0, destinations={"remote": ["crm"]})
        assert await wb.list_tools() == await inner.list_tools()
        refused = await wb.call_tool("remote", {})
        assert refused.is_error
        assert "destination 'crm' is" in text(refused)
        assert inner.calls == 0
    result = await wb.call_tool("remote", {})
    assert (result.is_error, text(result)) == (False, "remote for acme")
    assert await wb.save_state() == {"calls": 1}


# ---------------------------------------------------------------------- cancellation


async def test_cancelled_tool_call_releases_its_connection_and_slot(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    url = downstream.url("crm") + "/hang"
    started = asyncio.Event()

    async def hangs() -> str:
        """A request the downstream never answers."""
        async with httpx.AsyncClient(timeout=httpx.Timeout(60.0)) as client:
            started.set()
            return (await client.get(url)).text

    wb = workbench(pool, hangs)
    token = CancellationToken()
    call = asyncio.ensure_future(wb.call_tool("hangs", {}, token))
    await asyncio.wait_for(started.wait(), timeout=30)
    for _ in range(3000):  # until the request holds its connection (counters, not time)
        if pool.stats()["crm"].in_use == 1:
            break
        await asyncio.sleep(0.01)
    assert pool.stats()["crm"].in_use == 1
    token.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, timeout=30)
    stats = pool.stats()["crm"]
    assert (stats.in_use, stats.waiting) == (0, 0)
    assert (wb.concurrency.in_flight, wb.concurrency.waiting) == (0, 0)


# ---------------------------------------------------------------------- the agent's branches


class Progress(BaseModel):
    step: int


class Fetched(BaseModel):
    tenant: str | None


class StreamingFetch(BaseStreamTool[Progress, TextMessage, Fetched]):
    """A stream tool: reports progress to the agent's stream, then returns."""

    def __init__(self, url: str) -> None:
        super().__init__(Progress, Fetched, "streaming_fetch", "fetch with progress")
        self.url = url

    async def run_stream(
        self, args: Progress, cancellation_token: CancellationToken
    ) -> AsyncGenerator[TextMessage | Fetched, None]:
        yield TextMessage(content=f"progress {args.step}", source="streaming_fetch")
        async with httpx.AsyncClient() as client:
            body = (await client.get(self.url, headers=tenant_headers())).json()
        yield Fetched(tenant=body["tenant"])

    async def run(self, args: Progress, cancellation_token: CancellationToken) -> Fetched:
        raise AssertionError("the agent must use the streaming branch")


async def test_wrapped_agent_keeps_the_streaming_branch(
    downstream: Downstream, pool: toolpool.Pool
) -> None:
    agent = AssistantAgent(
        "streamer",
        model_client=replay_model([("streaming_fetch", {"step": 7})], "done"),
        tools=[StreamingFetch(downstream.url("crm") + "/anything")],
        reflect_on_tool_use=True,
    )
    wrap(agent, pool)
    with toolpool.auth_context(ACME):
        result = await agent.run(task="go")
    kinds = [(type(m).__name__, getattr(m, "content", None)) for m in result.messages]
    request = next(i for i, m in enumerate(result.messages) if isinstance(m, ToolCallRequestEvent))
    progress = kinds.index(("TextMessage", "progress 7"))
    execution = next(
        i for i, m in enumerate(result.messages) if isinstance(m, ToolCallExecutionEvent)
    )
    assert request < progress < execution
    executed = result.messages[execution]
    assert isinstance(executed, ToolCallExecutionEvent)
    assert json.loads(executed.content[0].content) == {"tenant": "acme"}


async def test_tool_overrides_are_kept(downstream: Downstream, pool: toolpool.Pool) -> None:
    def lookup() -> str:
        """Original name."""
        ctx = toolpool.current_auth()
        return ctx.tenant if ctx is not None and ctx.tenant else "nobody"

    inner = StaticWorkbench(
        [FunctionTool(lookup, description="x")],
        tool_overrides={"lookup": ToolOverride(name="find_customer", description="Find one")},
    )
    wb = PooledWorkbench(inner, pool, auth=ACME)
    assert await wb.list_tools() == await inner.list_tools()
    assert [t["name"] for t in await wb.list_tools()] == ["find_customer"]
    result = await wb.call_tool("find_customer", {})
    assert (result.name, text(result)) == ("find_customer", "acme")
    # The branch AssistantAgent uses (AutoGen 0.7.5's own stream branch ignores overrides
    # and answers "Tool find_customer not found.").
    streamed = [item async for item in wb.call_tool_stream("find_customer", {})]
    assert len(streamed) == 1
    assert isinstance(streamed[0], ToolResult)
    assert (streamed[0].name, text(streamed[0])) == ("find_customer", "acme")


# ---------------------------------------------------------------------- serialization


def _lookup_tool() -> str:
    """A module-level tool, so that AutoGen can serialize its source."""
    return "ok"


async def test_dump_component_serializes_the_inner_workbench(pool: toolpool.Pool) -> None:
    agent = AssistantAgent(
        "saver", model_client=replay_model("done"), tools=[_lookup_tool], reflect_on_tool_use=True
    )
    before = agent.dump_component().model_dump()
    wrap(agent, pool)
    (wb,) = agent._workbench
    assert isinstance(wb, PooledWorkbench)
    assert agent.dump_component().model_dump() == before
    assert wb.dump_component().provider == "autogen_core.tools.StaticStreamWorkbench"
    with pytest.warns(UserWarning, match="SECURITY WARNING"):
        loaded = Workbench.load_component(wb.dump_component())
    assert type(loaded) is StaticStreamWorkbench
    assert [t["name"] for t in await loaded.list_tools()] == ["_lookup_tool"]


# ---------------------------------------------------------------------- wrap / unwrap


def assistant(name: str) -> AssistantAgent:
    return AssistantAgent(name, model_client=replay_model("done"), tools=[_lookup_tool])


def pooled(agent: AssistantAgent) -> bool:
    return bool(agent._workbench) and all(
        isinstance(wb, PooledWorkbench) for wb in agent._workbench
    )


async def test_wrap_reaches_every_assistant_agent_in_nested_teams(pool: toolpool.Pool) -> None:
    a, b, c, d = (assistant(n) for n in "abcd")
    user = UserProxyAgent("user", input_func=lambda prompt: "ok")
    inner_team = RoundRobinGroupChat([c], max_turns=1)
    society = SocietyOfMindAgent("society", team=inner_team, model_client=replay_model("x"))
    filtered = MessageFilterAgent(
        "d_filtered",
        d,
        filter=MessageFilterConfig(per_source=[PerSourceFilter(source="user", position="last")]),
    )
    team = SelectorGroupChat(
        [a, RoundRobinGroupChat([b], max_turns=1, name="nested"), society, filtered, user],
        model_client=replay_model("a"),
    )
    assert wrap(team, pool) is team
    assert all(pooled(x) for x in (a, b, c, d))
    admissions = {id(x._workbench[0].admission) for x in (a, b, c, d)}  # type: ignore[attr-defined]
    assert len(admissions) == 1

    unwrap(team)
    assert not any(pooled(x) for x in (a, b, c, d))
    assert all(type(x._workbench[0]) is StaticStreamWorkbench for x in (a, b, c, d))


async def test_wrapping_twice_replaces_the_first_wrapping(pool: toolpool.Pool) -> None:
    agent = assistant("twice")
    original = agent._workbench[0]
    wrap(agent, pool, max_parallel_tool_calls=4)
    wrap(agent, pool, max_parallel_tool_calls=2)
    (wb,) = agent._workbench
    assert isinstance(wb, PooledWorkbench)
    assert wb.inner is original
    assert wb.concurrency.limit == 2
    assert unwrap(agent)._workbench == [original]


async def test_wrap_rejects_what_it_cannot_pool(pool: toolpool.Pool) -> None:
    user = UserProxyAgent("user", input_func=lambda prompt: "ok")
    with pytest.raises(toolpool.ConfigError, match="found no AssistantAgent"):
        wrap(user, pool)
    with pytest.raises(toolpool.ConfigError, match=r"needs a toolpool\.Pool"):
        wrap(assistant("x"), object())  # type: ignore[arg-type]
    wb = PooledWorkbench(StaticStreamWorkbench([]), pool)
    with pytest.raises(toolpool.ConfigError, match=r"already a toolpool\.autogen\.PooledWorkbench"):
        PooledWorkbench(wb, pool)
