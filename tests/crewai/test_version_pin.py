"""Pins the CrewAI internals `toolpool.crewai` relies on. If one of these fails after a CrewAI
upgrade, the adapter may silently stop pooling: re-check the facts in
`toolpool/crewai/_tools.py` and `_wrap.py` against the new release before changing a test."""

from __future__ import annotations

import inspect
import re

import crewai
from crewai import Agent, Crew
from crewai.agents.agent_executor import AgentExecutor
from crewai.flow import runtime as flow_runtime
from crewai.tools import BaseTool
from crewai.tools.base_tool import Tool
from crewai.tools.structured_tool import CrewStructuredTool
from crewai.utilities import agent_utils

import toolpool
from toolpool.crewai import TESTED_CREWAI, is_wrapped, unwrap, wrap
from toolpool.crewai._compat import check_crewai


def source(obj: object) -> str:
    return inspect.getsource(obj)  # type: ignore[arg-type]


def test_crewai_is_the_tested_release() -> None:
    assert crewai.__version__ == TESTED_CREWAI, (
        f"CrewAI {crewai.__version__} is installed; the adapter was verified against "
        f"{TESTED_CREWAI}. Re-check the facts pinned in this file, then update TESTED_CREWAI."
    )
    assert check_crewai() == crewai.__version__


def test_native_path_calls_tool_run() -> None:
    # Native function calling maps each tool name to the tool's bound `run`, looked up when
    # the executor sets up native tools (at kickoff, after wrap).
    assert "available_functions[sanitized_name] = tool.run" in source(
        agent_utils.convert_tools_to_openai_schema
    )
    body = source(AgentExecutor._execute_single_native_tool_call)
    assert "tool_func = self._available_functions[func_name]" in body
    assert "raw_result = tool_func(**args_dict)" in body
    # ... and an exception becomes the text the model reads.
    assert 'result = f"Error executing tool: {e}"' in body


def test_base_tool_run_calls_run_and_tool_run_calls_func() -> None:
    assert "result = self._run(*args, **kwargs)" in source(BaseTool.run)
    # The @tool decorator's class calls its function directly (so `run` is wrapped too).
    assert "result = self.func(*args, **kwargs)" in source(Tool.run)
    assert "result = asyncio.run(result)" in source(Tool.run)


def test_text_path_captures_run_at_conversion() -> None:
    assert "func=self._run" in source(BaseTool.to_structured_tool)
    assert "result = self.func(**parsed_args, **kwargs)" in source(CrewStructuredTool.invoke)


def test_parallel_native_calls_copy_the_context() -> None:
    body = source(AgentExecutor.execute_native_tool)
    assert "max_workers = min(8, len(runnable_tool_calls))" in body
    assert "contextvars.copy_context().run" in body
    # Sync flow methods (the executor's steps) run in threads with the context copied.
    assert re.search(
        r"ctx = contextvars\.copy_context\(\)\s+result = await asyncio\.to_thread\(ctx\.run",
        source(flow_runtime),
    )


def test_executor_and_copies_keep_the_wrapped_tools() -> None:
    assert "tools: list[BaseTool] | None = None" in source(Agent.create_agent_executor)
    assert "tools=self.tools," in source(Agent.copy)
    assert "cloned_agents = [agent.copy() for agent in self.agents]" in source(Crew.copy)
    assert "crew = self.copy()" in source(Crew.kickoff_for_each)
    assert "await asyncio.to_thread(self.kickoff, inputs, input_files)" in source(
        Crew.kickoff_async
    )


def test_hooks_reach_both_paths_of_a_real_tool() -> None:
    """Behaviour, not source: a wrapped tool's `run` (native path) and the structured tool
    CrewAI builds from it (text path) both run inside the auth context of the wrap."""

    class Who(BaseTool):
        name: str = "who"
        description: str = "Who am I acting for?"

        def _run(self) -> str:
            ctx = toolpool.current_auth()
            return ctx.tenant if ctx is not None else "nobody"

    tool = Who()
    agent = Agent(role="r", goal="g", backstory="b", tools=[tool], llm=_offline_llm())
    pool = toolpool.Pool()
    wrap(agent, pool, auth=toolpool.AuthContext(tenant="acme"))
    assert is_wrapped(tool)
    assert tool.run() == "acme"
    assert tool.to_structured_tool().invoke({}) == "acme"
    unwrap(agent)
    assert not is_wrapped(tool)
    assert tool.run() == "nobody"
    assert tool.to_structured_tool().invoke({}) == "nobody"
    pool.close()


def _offline_llm() -> object:
    from toolpool.crewai.testing import ScriptedLLM

    return ScriptedLLM()
