"""Pins the private LangGraph API that `toolpool.langchain.wrap` relies on.

If one of these fails after a LangChain / LangGraph upgrade, `wrap()` may no longer hook
tool calls. Re-verify the facts below against the new langgraph-prebuilt source
(langgraph/prebuilt/tool_node.py: ToolNode.__init__, _run_one, _arun_one) and
langchain/agents/factory.py (create_agent's "tools" node), then add the version to
TESTED_LANGGRAPH_PREBUILT. `ToolpoolMiddleware` (public API) does not depend on any of it.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.tools import tool
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest

import toolpool
from toolpool.langchain import TESTED_LANGGRAPH_PREBUILT, check_tool_node_hooks, tool_nodes
from toolpool.langchain.testing import ScriptedChatModel


@tool
def echo(text: str) -> str:
    """Echo the text."""
    return text


def _call_message() -> dict[str, Any]:
    return {
        "messages": [
            AIMessage(
                content="",
                tool_calls=[
                    {"name": "echo", "args": {"text": "hi"}, "id": "c1", "type": "tool_call"}
                ],
            )
        ]
    }


def _graph(node: ToolNode) -> Any:
    """A one-node graph running `node` (a ToolNode needs a graph runtime)."""
    graph = StateGraph(MessagesState)
    graph.add_node("tools", node)
    graph.add_edge(START, "tools")
    return graph.compile()


def test_langgraph_prebuilt_version_is_one_wrap_was_verified_with() -> None:
    version = importlib.metadata.version("langgraph-prebuilt")
    major_minor = ".".join(version.split(".")[:2])
    assert major_minor in TESTED_LANGGRAPH_PREBUILT, (
        f"langgraph-prebuilt {version} is installed, but toolpool.langchain.wrap() was "
        f"verified with {TESTED_LANGGRAPH_PREBUILT}: re-check ToolNode's private hooks (see "
        f"this module's docstring), then add {major_minor!r} to TESTED_LANGGRAPH_PREBUILT"
    )


def test_tool_node_keeps_its_hooks_as_instance_attributes() -> None:
    params = inspect.signature(ToolNode.__init__).parameters
    assert "wrap_tool_call" in params
    assert "awrap_tool_call" in params
    node = ToolNode([echo])
    assert node._wrap_tool_call is None
    assert node._awrap_tool_call is None

    def hook(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]) -> Any:
        return execute(request)

    with_hooks = ToolNode([echo], wrap_tool_call=hook, awrap_tool_call=None)
    assert with_hooks._wrap_tool_call is hook
    check_tool_node_hooks(node)


def test_tool_node_reads_the_hooks_on_every_call() -> None:
    """Hooks set after construction are used: what wrap() composes over."""
    node = ToolNode([echo])
    seen: list[str] = []

    def hook(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]) -> Any:
        seen.append("sync:" + request.tool_call["name"])
        return execute(request)

    async def ahook(
        request: ToolCallRequest, execute: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Any:
        seen.append("async:" + request.tool_call["name"])
        return await execute(request)

    node._wrap_tool_call = hook
    node._awrap_tool_call = ahook
    out = _graph(node).invoke(_call_message())
    assert isinstance(out["messages"][-1], ToolMessage)
    assert out["messages"][-1].content == "hi"
    asyncio.run(_graph(node).ainvoke(_call_message()))
    assert seen == ["sync:echo", "async:echo"]


def test_only_a_sync_hook_also_serves_the_async_path() -> None:
    """ToolNode runs a lone sync hook on the async path (wrap() keeps that case as is)."""
    node = ToolNode([echo])
    seen: list[str] = []

    def hook(request: ToolCallRequest, execute: Callable[[ToolCallRequest], Any]) -> Any:
        seen.append("sync")
        return execute(request)

    node._wrap_tool_call = hook
    asyncio.run(_graph(node).ainvoke(_call_message()))
    assert seen == ["sync"]


def test_create_agent_puts_its_tools_in_a_tool_node() -> None:
    agent = create_agent(ScriptedChatModel(), [echo])
    assert isinstance(agent.nodes["tools"].bound, ToolNode)
    assert tool_nodes(agent) == [agent.nodes["tools"].bound]


def test_a_changed_tool_node_is_refused_with_a_clear_message() -> None:
    class Changed(ToolNode):
        """A ToolNode whose tool-call path no longer reads the hooks."""

        def _run_one(self, *args: Any, **kwargs: Any) -> Any:
            return super()._run_one(*args, **kwargs)

    with pytest.raises(toolpool.ConfigError) as info:
        check_tool_node_hooks(Changed([echo]))
    message = str(info.value)
    assert "_run_one() reading self._wrap_tool_call" in message
    assert "ToolpoolMiddleware" in message
    node = ToolNode([echo])
    del node._awrap_tool_call
    with pytest.raises(toolpool.ConfigError, match="_awrap_tool_call"):
        check_tool_node_hooks(node)
