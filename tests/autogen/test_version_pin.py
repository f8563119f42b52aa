"""Pins the AutoGen internals toolpool.autogen relies on, for the installed version.

autogen-agentchat has no public hook around tool calls, so the adapter uses private names.
When AutoGen moves, this file fails first and says which assumption broke; after checking
the new version, add it to `toolpool.autogen.TESTED_AUTOGEN_VERSIONS`.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
from collections.abc import AsyncGenerator, Mapping
from importlib.metadata import version
from typing import Any

from autogen_agentchat.agents import (
    AssistantAgent,
    MessageFilterAgent,
    MessageFilterConfig,
    SocietyOfMindAgent,
)
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_agentchat.teams import BaseGroupChat, RoundRobinGroupChat
from autogen_core import CancellationToken
from autogen_core.tools import FunctionTool, StaticStreamWorkbench, StaticWorkbench, ToolResult

from tests._support.autogen_replay import replay_model
from toolpool.autogen import TESTED_AUTOGEN_VERSIONS

marker: contextvars.ContextVar[str | None] = contextvars.ContextVar("marker", default=None)


def _noop() -> str:
    """Does nothing."""
    return "ok"


def test_installed_autogen_is_a_tested_version() -> None:
    for dist in ("autogen-agentchat", "autogen-core", "autogen-ext"):
        assert version(dist) in TESTED_AUTOGEN_VERSIONS, (
            f"{dist} {version(dist)} is not in TESTED_AUTOGEN_VERSIONS; run this file and the "
            f"rest of tests/autogen against it, then add it"
        )


def test_private_names_the_adapter_uses_exist() -> None:
    agent = AssistantAgent("a", model_client=replay_model("x"), tools=[_noop])
    # wrap() replaces this list; the default is one StaticStreamWorkbench over the tools.
    assert isinstance(agent._workbench, list)
    (wb,) = agent._workbench
    assert type(wb) is StaticStreamWorkbench
    # PooledWorkbench reads a static workbench's tools and overrides and reuses its helpers.
    assert isinstance(wb, StaticWorkbench)
    assert [t.name for t in wb._tools] == ["_noop"]
    assert wb._tool_overrides == {}
    assert wb._override_name_to_original == {}
    assert wb._format_errors(ValueError("x")) == "x"
    # ContextFunctionTool rebuilds a FunctionTool from these.
    tool = wb._tools[0]
    assert isinstance(tool, FunctionTool)
    assert tool._func is _noop
    assert list(tool._global_imports) == []
    assert tool._strict is False
    assert tool._has_cancellation_support is False
    assert list(tool._signature.parameters) == []
    # assistant_agents() walks these.
    team = RoundRobinGroupChat([agent], max_turns=1)
    assert isinstance(team, BaseGroupChat)
    assert team._participants == [agent]
    society = SocietyOfMindAgent("s", team=team, model_client=replay_model("x"))
    assert society._team is team
    filtered = MessageFilterAgent("f", agent, filter=MessageFilterConfig(per_source=[]))
    assert filtered._wrapped_agent is agent
    # The agent's tool-call hook: a static method taking the workbench list.
    params = inspect.signature(AssistantAgent._execute_tool_call).parameters
    assert {"tool_call", "workbench", "cancellation_token", "stream"} <= set(params)


class RecordingWorkbench(StaticStreamWorkbench):
    """Records which entry point the agent used."""

    def __init__(self, tools: list[Any]) -> None:
        super().__init__(tools)
        self.used: list[str] = []

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> ToolResult:
        self.used.append("call_tool")
        return await super().call_tool(name, arguments, cancellation_token, call_id)

    async def call_tool_stream(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> AsyncGenerator[Any, None]:
        self.used.append("call_tool_stream")
        async for item in super().call_tool_stream(name, arguments, cancellation_token, call_id):
            yield item


async def test_workbench_replaced_after_construction_is_used_by_the_next_run() -> None:
    agent = AssistantAgent("a", model_client=replay_model([("_noop", {})], "done"), tools=[_noop])
    recording = RecordingWorkbench([FunctionTool(_noop, description="x")])
    agent._workbench = [recording]
    await agent.run(task="go")
    # A StaticStreamWorkbench (PooledWorkbench is one) is called through its stream branch.
    assert recording.used == ["call_tool_stream"]


async def test_a_turns_tool_calls_run_concurrently_and_sync_tools_lose_contextvars() -> None:
    """The two facts that make the workbench the only concurrency control and make
    ContextFunctionTool necessary."""
    arrived = 0
    all_here = asyncio.Event()
    seen_in_thread: list[tuple[str | None, bool]] = []

    async def gather_point(i: int) -> str:
        """Returns once all three calls of the turn have started."""
        nonlocal arrived
        arrived += 1
        if arrived == 3:
            all_here.set()
        await asyncio.wait_for(all_here.wait(), timeout=30)
        return f"call {i}"

    def sync_probe() -> str:
        """Reports the context variable seen in the executor thread."""
        seen_in_thread.append((marker.get(), threading.current_thread() is threading.main_thread()))
        return "probed"

    agent = AssistantAgent(
        "a",
        model_client=replay_model(
            [("gather_point", {"i": i}) for i in range(3)] + [("sync_probe", {})], "done"
        ),
        tools=[gather_point, sync_probe],
    )
    marker.set("set by the caller")
    result = await asyncio.wait_for(agent.run(task="go"), timeout=60)

    executed = next(m for m in result.messages if isinstance(m, ToolCallExecutionEvent))
    assert [r.content for r in executed.content] == ["call 0", "call 1", "call 2", "probed"]
    assert not [r for r in executed.content if r.is_error]
    # run_in_executor: another thread, without the caller's context variables.
    assert seen_in_thread == [(None, False)]
