"""`wrap` and `unwrap` as operations: idempotent, reversible, covering standalone agents,
tools handed over at run time and delegation, and refusing what they cannot wrap."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from crewai import Agent, Crew, Task
from crewai.tools import BaseTool
from pydantic import Field

import toolpool
from tests._support.crewai_crews import CallLog, CrmLookup, tenant_ctx
from toolpool.crewai import is_wrapped, unwrap, wrap
from toolpool.crewai._tools import TOOL_METHODS
from toolpool.crewai.testing import ScriptedLLM
from toolpool.testing import Downstream


class Who(BaseTool):
    """Reports whom the call acts for and which toolpool tool call it runs in."""

    name: str = "who"
    description: str = "Who am I acting for?"
    seen: list[Any] = Field(default_factory=list)

    def _run(self, n: int = 0) -> str:
        from toolpool.adapters import current_tool_call

        ctx = toolpool.current_auth()
        call = current_tool_call()
        self.seen.append((ctx.tenant if ctx else None, call.tool_name if call else None))
        return f"tenant={ctx.tenant if ctx else None}"


def who_crew(tool: BaseTool, calls: int = 1) -> Crew:
    agent = Agent(
        role="r",
        goal="g",
        backstory="b",
        tools=[tool],
        llm=ScriptedLLM(plan=[[{"tool": tool.name, "args": {"n": i}} for i in range(calls)]]),
    )
    return Crew(agents=[agent], tasks=[Task(description="d", expected_output="x", agent=agent)])


def by_tenant(inputs: dict[str, Any]) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=inputs["tenant_id"])


def test_wrap_twice_is_one_layer(pool: toolpool.Pool) -> None:
    tool = Who(seen=[])
    crew = who_crew(tool, calls=2)
    assert wrap(crew, pool, auth=by_tenant) is crew
    first = {attr: vars(tool)[attr] for attr in TOOL_METHODS}
    kickoff = vars(crew)["kickoff"]
    wrap(crew, pool, auth=by_tenant)
    # The same wrappers, rebound: not a wrapper around a wrapper.
    assert {attr: vars(tool)[attr] for attr in TOOL_METHODS} == first
    assert vars(crew)["kickoff"] is kickoff
    crew.kickoff(inputs={"tenant_id": "acme"})
    assert tool.seen == [("acme", "who"), ("acme", "who")]


def test_unwrap_restores_the_originals(pool: toolpool.Pool) -> None:
    tool = Who(seen=[])
    crew = who_crew(tool)
    before_tool, before_crew = dict(vars(tool)), set(vars(crew))
    before_agent = set(vars(crew.agents[0]))
    wrap(crew, pool, auth=by_tenant)
    assert is_wrapped(tool)
    assert {"kickoff", "kickoff_async", "akickoff", "copy"} <= set(vars(crew))
    assert unwrap(crew) is crew
    assert not is_wrapped(tool)
    assert vars(tool) == before_tool
    assert set(vars(crew)) == before_crew
    assert set(vars(crew.agents[0])) == before_agent
    crew.kickoff(inputs={"tenant_id": "acme"})
    assert tool.seen == [(None, None)]  # no auth context, no toolpool tool call


def test_rewrap_with_another_pool_rebinds(
    pool: toolpool.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    tool = Who(seen=[])
    crew = who_crew(tool)
    wrap(crew, pool, auth=by_tenant)
    with toolpool.Pool() as other, caplog.at_level(logging.WARNING, "toolpool.crewai"):
        wrap(crew, other, auth=toolpool.AuthContext(tenant="globex"))
        crew.kickoff(inputs={"tenant_id": "acme"})
    assert tool.seen == [("globex", "who")]
    assert "wrapped for another toolpool.Pool" in caplog.text


def test_wrap_refuses_what_it_cannot_wrap(pool: toolpool.Pool) -> None:
    with pytest.raises(toolpool.ConfigError, match=r"takes a crewai\.Crew or crewai\.Agent"):
        wrap(Who(seen=[]), pool)
    with pytest.raises(toolpool.ConfigError, match=r"needs a toolpool\.Pool"):
        wrap(who_crew(Who(seen=[])), "pool")  # type: ignore[arg-type]
    with pytest.raises(toolpool.ConfigError, match="tool_concurrency="):
        wrap(who_crew(Who(seen=[])), pool, tool_concurrency=0)


def test_auth_function_returning_wrong_type(pool: toolpool.Pool) -> None:
    crew = wrap(who_crew(Who(seen=[])), pool, auth=lambda inputs: inputs["tenant_id"])
    with pytest.raises(toolpool.ConfigError, match=r"returned str, not a toolpool\.AuthContext"):
        crew.kickoff(inputs={"tenant_id": "acme"})


def test_standalone_agent(ds: Downstream, pool: toolpool.Pool) -> None:
    """An Agent (no crew): auth receives the kickoff messages."""
    log = CallLog()
    agent = Agent(
        role="analyst",
        goal="g",
        backstory="b",
        tools=[CrmLookup(base_url=ds.url("crm"), log=log)],
        llm=ScriptedLLM(
            plan=[[{"tool": "crm_lookup", "args": {"account": f"a{i}"}} for i in range(3)]]
        ),
    )
    tenant_of_message = {"about acme": "acme", "about globex": "globex"}
    wrap(agent, pool, auth=lambda messages: tenant_ctx(tenant_of_message[messages]))
    result = agent.kickoff("about acme")
    assert '"tenant": "acme"' in result.raw
    result = asyncio.run(agent.kickoff_async("about globex"))
    assert '"tenant": "globex"' in result.raw
    assert [(c["ctx_tenant"], c["server_tenant"]) for c in log.calls] == [("acme", "acme")] * 3 + [
        ("globex", "globex")
    ] * 3


def test_tools_handed_over_at_run_time_are_wrapped(pool: toolpool.Pool) -> None:
    """A task's own tools, set after wrap, are wrapped when the agent's executor gets them."""
    agent_tool, task_tool = Who(seen=[]), Who(name="task_who", seen=[])
    crew = who_crew(agent_tool)
    wrap(crew, pool, auth=by_tenant)
    crew.tasks[0].tools = [task_tool]
    crew.agents[0].llm = ScriptedLLM(plan=[[{"tool": "task_who", "args": {"n": 1}}]])
    assert not is_wrapped(task_tool)
    crew.kickoff(inputs={"tenant_id": "acme"})
    assert is_wrapped(task_tool)
    assert task_tool.seen == [("acme", "task_who")]


def test_delegated_work_runs_the_coworkers_wrapped_tools(pool: toolpool.Pool) -> None:
    """The delegation tool itself is CrewAI's (not wrapped); the coworker it runs calls its
    own tools, which act for the kickoff's tenant."""
    coworker_tool = Who(name="coworker_who", seen=[])
    lead = Agent(
        role="lead",
        goal="g",
        backstory="b",
        allow_delegation=True,
        llm=ScriptedLLM(
            plan=[
                [
                    {
                        "tool": "delegate_work_to_coworker",
                        "args": {"task": "find out", "context": "none", "coworker": "helper"},
                    }
                ]
            ]
        ),
    )
    helper = Agent(
        role="helper",
        goal="g",
        backstory="b",
        tools=[coworker_tool],
        llm=ScriptedLLM(plan=[[{"tool": "coworker_who", "args": {"n": 1}}]]),
    )
    crew = Crew(
        agents=[lead, helper], tasks=[Task(description="d", expected_output="x", agent=lead)]
    )
    wrap(crew, pool, auth=by_tenant)
    output = crew.kickoff(inputs={"tenant_id": "globex"})
    assert coworker_tool.seen == [("globex", "coworker_who")]
    assert "tenant=globex" in output.raw


class AsyncWho(BaseTool):
    """An async `_run` (CrewAI runs the coroutine with asyncio.run on its sync paths)."""

    name: str = "async_who"
    description: str = "Who am I acting for, asynchronously?"

    async def _run(self) -> str:
        import threading

        ctx = toolpool.current_auth()
        return f"{ctx.tenant if ctx else None}@{threading.current_thread().name}"


def test_async_bodies_run_on_the_long_lived_tool_loop(pool: toolpool.Pool) -> None:
    """Reached from CrewAI's sync paths, an async body runs on one long-lived loop (so its
    pooled connections can be reused), with the call's auth context."""
    from crewai.tools import tool

    @tool("async_fn")
    async def async_fn(n: int) -> str:
        """Who am I acting for (an async @tool)?"""
        import threading

        ctx = toolpool.current_auth()
        return f"{ctx.tenant if ctx else None}@{threading.current_thread().name}"

    cls_tool = AsyncWho()
    agent = Agent(role="r", goal="g", backstory="b", tools=[cls_tool, async_fn], llm=ScriptedLLM())
    wrap(agent, pool, auth=toolpool.AuthContext(tenant="acme"))
    expected = "acme@toolpool-crewai-async-tools"
    assert cls_tool.run() == expected  # native path, BaseTool with an async _run
    assert async_fn.run(n=1) == expected  # native path, async @tool
    assert async_fn.to_structured_tool().invoke({"n": 1}) == expected  # text path
    # An async entry point awaits the body on the caller's own loop.
    assert asyncio.run(async_fn.arun(n=1)).startswith("acme@")
    unwrap(agent)
    assert async_fn.run(n=1) == "None@MainThread"
