"""Tool schemas are built once per tool, not on every `list_tools` (issue 25): AutoGen lists an
agent's tools before every model turn and every tool call, and builds each schema through
pydantic each time; agents made and wrapped per task paid that for every run."""

from __future__ import annotations

from typing import Any

import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_core.tools import FunctionTool, StaticStreamWorkbench, StaticWorkbench, ToolOverride

import toolpool
from tests._support.autogen_replay import replay_model
from toolpool.autogen import ContextFunctionTool, PooledWorkbench, wrap
from toolpool.autogen._function_tool import with_thread_context

ACME = toolpool.AuthContext(tenant="acme")


def count_schema_builds(monkeypatch: pytest.MonkeyPatch, tool: FunctionTool) -> list[int]:
    """A counter of the pydantic JSON-schema builds of `tool`'s arguments model."""
    builds = [0]
    args_type = tool.args_type()
    real = args_type.model_json_schema

    def counting(*args: Any, **kwargs: Any) -> Any:
        builds[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(args_type, "model_json_schema", counting)
    return builds


async def test_schemas_are_built_once_across_runs_and_wraps_of_new_agents(
    pool: toolpool.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def lookup(query: str) -> str:
        """Look something up."""
        return "ok:" + query

    tool = FunctionTool(lookup, description="Look something up.")
    builds = count_schema_builds(monkeypatch, tool)
    expected = await StaticStreamWorkbench([tool]).list_tools()
    # Unwrapped, a run lists the tools before its model turn and again before its tool call
    # (no second turn: reflect_on_tool_use is off), and StaticStreamWorkbench's
    # isinstance(tool, StreamTool) may read `schema` once more (a runtime protocol check
    # reads the members in set order): two or three builds.
    plain = AssistantAgent(
        "a", model_client=replay_model([("lookup", {"query": "x"})], "done"), tools=[tool]
    )
    await plain.run(task="go")
    assert builds[0] in (1 + 2, 1 + 3)
    builds[0] = 0
    for i in range(3):  # a new agent per task, wrapped each time, as applications do
        agent = AssistantAgent(
            "a", model_client=replay_model([("lookup", {"query": str(i)})], "done"), tools=[tool]
        )
        wrap(agent, pool, auth=ACME)
        result = await agent.run(task="go")
        assert any("ok:" + str(i) in str(m.content) for m in result.messages)
        assert await agent._workbench[0].list_tools() == expected
    # Wrapped: one build for all three agents' runs.
    assert builds[0] == 1


async def test_each_caller_gets_its_own_copy(pool: toolpool.Pool) -> None:
    def lookup(query: str) -> str:
        """Look something up."""
        return query

    wb = PooledWorkbench(StaticWorkbench([FunctionTool(lookup, description="x")]), pool)
    first = await wb.list_tools()
    first[0]["parameters"]["properties"].clear()
    first[0]["name"] = "changed"
    second = await wb.list_tools()
    assert second[0]["name"] == "lookup"
    assert list(second[0]["parameters"]["properties"]) == ["query"]


async def test_a_changed_description_or_name_gives_a_new_schema(pool: toolpool.Pool) -> None:
    async def lookup(query: str) -> str:  # async: the workbench runs this very tool object
        return query

    tool = FunctionTool(lookup, description="old")
    wb = PooledWorkbench(StaticWorkbench([tool]), pool)
    assert (await wb.list_tools())[0]["description"] == "old"
    tool._description = "new"
    assert (await wb.list_tools())[0]["description"] == "new"
    tool._name = "find"
    assert (await wb.list_tools())[0]["name"] == "find"


async def test_overrides_apply_to_the_cached_schemas(pool: toolpool.Pool) -> None:
    def a(query: str) -> str:
        return query

    def b(n: int) -> str:
        return str(n)

    inner = StaticWorkbench(
        [FunctionTool(a, description="A"), FunctionTool(b, description="B")],
        tool_overrides={
            "a": ToolOverride(name="find"),
            "b": ToolOverride(description="Count"),
        },
    )
    wb = PooledWorkbench(inner, pool)
    for _ in range(2):  # the second time from the cache
        assert await wb.list_tools() == await inner.list_tools()
    names = [(t["name"], t.get("description")) for t in await wb.list_tools()]
    assert names == [("find", "A"), ("b", "Count")]


async def test_a_tool_computing_its_own_schema_is_asked_every_time(pool: toolpool.Pool) -> None:
    class Dynamic(FunctionTool):
        asked = 0

        @property
        def schema(self) -> Any:
            Dynamic.asked += 1
            base = dict(super().schema)
            base["description"] = f"asked {Dynamic.asked}"
            return base

    async def lookup(query: str) -> str:
        return query

    wb = PooledWorkbench(StaticWorkbench([Dynamic(lookup, description="x")]), pool)
    assert (await wb.list_tools())[0]["description"] == "asked 1"
    assert (await wb.list_tools())[0]["description"] == "asked 2"


def test_a_sync_tool_gets_one_context_copy_until_it_changes() -> None:
    def lookup(query: str) -> str:
        return query

    tool = FunctionTool(lookup, description="x")
    first = with_thread_context(tool)
    assert isinstance(first, ContextFunctionTool)
    assert first.original is tool
    assert with_thread_context(tool) is first
    tool._description = "y"
    changed = with_thread_context(tool)
    assert changed is not first
    assert changed.description == "y"
