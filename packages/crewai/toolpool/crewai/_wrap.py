"""`wrap` / `unwrap`: turn an existing CrewAI `Crew` or `Agent` into one whose tool calls are
pooled, tenant-affine and gated by pool saturation, in place and reversibly.

What is replaced, on the instances only (never on CrewAI's classes):

- every tool of the crew's agents, tasks and manager (`_tools.wrap_tool`);
- on each agent, `create_agent_executor` (wraps the tools a task hands it, so tools a crew
  adds at run time, such as a task's own tools, are covered), `get_mcp_tools` and
  `get_platform_tools` (tools built from `mcps=` / `apps=` at kickoff), and `copy`;
- on a crew: `kickoff`, `kickoff_async`, `akickoff` (bind the run's auth context, resolved from
  the kickoff `inputs`, and a fresh tool-call concurrency limit) and `copy` (copies, as
  `kickoff_for_each*` make them, are wrapped too);
- on a standalone agent: `kickoff`, `kickoff_async`, `akickoff` (auth from the messages).

CrewAI's own helper tools (delegation, memory, file reading, skills, images) are not wrapped:
they make no tool traffic of their own, and the coworker a delegation runs calls its own,
wrapped, tools.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from toolpool import Pool
from toolpool.adapters import Admission, AuthSource, resolve_auth
from toolpool.crewai._compat import check_crewai
from toolpool.crewai._tools import (
    Binding,
    RunState,
    current_run,
    run_scope,
    unwrap_tool,
    wrap_tool,
)
from toolpool.errors import ConfigError

__all__ = ["unwrap", "wrap"]

log = logging.getLogger("toolpool.crewai")

T = TypeVar("T")

_MISSING: Any = object()

# CrewAI's own tools: they call no destination themselves (a delegation runs a coworker whose
# tools are wrapped; wrapping the delegation would put the coworker's model calls in a tool
# call's scope).
_INTERNAL_TOOLS = frozenset(
    {
        "BaseAgentTool",
        "DelegateWorkTool",
        "AskQuestionTool",
        "AddImageTool",
        "DeferredToolResultReader",
        "ReadFileTool",
        "RecallMemoryTool",
        "RememberTool",
        "LoadSkillTool",
    }
)

_CREW_HINT = (
    "pass what your auth function reads in crew.kickoff(inputs={...}), or give wrap() a fixed "
    "auth=toolpool.AuthContext(...)"
)
_AGENT_HINT = (
    "an agent's auth function receives the kickoff messages; give wrap() a fixed "
    "auth=toolpool.AuthContext(...) or set one around kickoff with toolpool.auth_context(...)"
)


def _is_internal(tool: Any) -> bool:
    return any(cls.__name__ in _INTERNAL_TOOLS for cls in type(tool).__mro__)


def _wrap_tools(tools: Iterable[Any] | None, binding: Binding) -> None:
    from crewai.tools import BaseTool

    for tool in tools or ():
        if isinstance(tool, BaseTool) and not _is_internal(tool):
            wrap_tool(tool, binding)


# ---------------------------------------------------------------------- instance hooks


def _set_hook(
    obj: Any, attr: str, make: Callable[[Callable[..., Any]], Callable[..., Any]], binding: Binding
) -> None:
    """Replace `obj.attr` by `make(original)`, once; a second wrap only rebinds."""
    current = vars(obj).get(attr)
    holder = getattr(current, "__toolpool_binding__", None)
    if isinstance(holder, list):
        holder[0] = binding
        return
    saved = vars(obj).get(attr, _MISSING)
    original = getattr(obj, attr)
    cell: list[Binding] = [binding]
    hooked = make(original)
    hooked.__toolpool_binding__ = cell  # type: ignore[attr-defined]
    hooked.__toolpool_saved__ = saved  # type: ignore[attr-defined]
    object.__setattr__(obj, attr, hooked)


def _binding_cell(obj: Any, attr: str) -> list[Binding]:
    cell = getattr(vars(obj).get(attr), "__toolpool_binding__", None)
    assert isinstance(cell, list)
    return cell


def _clear_hook(obj: Any, attr: str) -> bool:
    current = vars(obj).get(attr)
    if getattr(current, "__toolpool_binding__", None) is None:
        return False
    saved = getattr(current, "__toolpool_saved__", _MISSING)
    if saved is _MISSING:
        object.__delattr__(obj, attr)
    else:
        object.__setattr__(obj, attr, saved)
    return True


def _run_state(owner: object, binding: Binding, run_input: Any, hint: str) -> RunState:
    """The run state of a kickoff of `owner`: reuse the enclosing one for a nested kickoff of
    the same object (kickoff_async runs kickoff in a thread), else resolve a new one."""
    outer = current_run()
    if outer is not None and outer.owner is owner and outer.binding is binding:
        return outer
    from toolpool.adapters import AdaptiveToolConcurrency

    ctx = resolve_auth(binding.auth, run_input, framework="crewai", hint=hint)
    limiter = (
        AdaptiveToolConcurrency(binding.tool_concurrency) if binding.tool_concurrency else None
    )
    return RunState(owner, binding, ctx, limiter)


def _kickoff_hooks(obj: Any, binding: Binding, input_name: str, hint: str) -> None:
    """Hook `kickoff`, `kickoff_async` and `akickoff` of a crew or standalone agent."""

    def run_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value = kwargs[input_name] if input_name in kwargs else (args[0] if args else None)
        if value is None and input_name == "inputs":
            return {}
        return value

    def sync_hook(attr: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def kickoff(*args: Any, **kwargs: Any) -> Any:
                bound = _binding_cell(obj, attr)[0]
                with run_scope(_run_state(obj, bound, run_input(args, kwargs), hint)):
                    return original(*args, **kwargs)

            return kickoff

        return make

    def async_hook(attr: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            async def kickoff(*args: Any, **kwargs: Any) -> Any:
                bound = _binding_cell(obj, attr)[0]
                with run_scope(_run_state(obj, bound, run_input(args, kwargs), hint)):
                    return await original(*args, **kwargs)

            return kickoff

        return make

    _set_hook(obj, "kickoff", sync_hook("kickoff"), binding)
    for attr in ("kickoff_async", "akickoff"):
        if callable(getattr(obj, attr, None)):
            _set_hook(obj, attr, async_hook(attr), binding)


def _copy_hook(obj: Any, binding: Binding, wrap_copy: Callable[[Any, Binding], None]) -> None:
    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def copy(*args: Any, **kwargs: Any) -> Any:
            clone = original(*args, **kwargs)
            wrap_copy(clone, _binding_cell(obj, "copy")[0])
            return clone

        return copy

    _set_hook(obj, "copy", make, binding)


def _tool_list_hook(obj: Any, attr: str, binding: Binding) -> None:
    """Wrap the tools a method returns (`get_mcp_tools`, `get_platform_tools`)."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def tools(*args: Any, **kwargs: Any) -> Any:
            made = original(*args, **kwargs)
            _wrap_tools(made, _binding_cell(obj, attr)[0])
            return made

        return tools

    _set_hook(obj, attr, make, binding)


def _executor_hook(agent: Any, binding: Binding) -> None:
    """Wrap the tools handed to `create_agent_executor` (a task's tools and those a crew
    injects at run time) before CrewAI captures their methods."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def create_agent_executor(*args: Any, **kwargs: Any) -> Any:
            tools = kwargs.get("tools", args[0] if args else None)
            _wrap_tools(
                tools if tools is not None else agent.tools,
                _binding_cell(agent, "create_agent_executor")[0],
            )
            return original(*args, **kwargs)

        return create_agent_executor

    _set_hook(agent, "create_agent_executor", make, binding)


# ---------------------------------------------------------------------- targets

_AGENT_HOOKS = ("create_agent_executor", "get_mcp_tools", "get_platform_tools", "copy")
_KICKOFF_HOOKS = ("kickoff", "kickoff_async", "akickoff")


def _wrap_agent(agent: Any, binding: Binding, *, standalone: bool) -> None:
    _wrap_tools(agent.tools, binding)
    if callable(getattr(agent, "create_agent_executor", None)):
        _executor_hook(agent, binding)
    for attr in ("get_mcp_tools", "get_platform_tools"):
        if callable(getattr(agent, attr, None)):
            _tool_list_hook(agent, attr, binding)
    _copy_hook(agent, binding, lambda clone, b: _wrap_agent(clone, b, standalone=standalone))
    if standalone:
        _kickoff_hooks(agent, binding, "messages", _AGENT_HINT)


def _wrap_crew(crew: Any, binding: Binding) -> None:
    for agent in crew.agents:
        _wrap_agent(agent, binding, standalone=False)
    if crew.manager_agent is not None:
        _wrap_agent(crew.manager_agent, binding, standalone=False)
    for task in crew.tasks:
        _wrap_tools(task.tools, binding)
        if task.agent is not None and not any(task.agent is a for a in crew.agents):
            _wrap_agent(task.agent, binding, standalone=False)
    _kickoff_hooks(crew, binding, "inputs", _CREW_HINT)
    _copy_hook(crew, binding, _wrap_crew)


def wrap(
    target: T,
    pool: Pool,
    *,
    auth: AuthSource = None,
    max_wait: float = 5.0,
    tool_concurrency: int | None = 8,
    destinations: Mapping[str, Iterable[str]] | None = None,
    pool_httpx: bool = True,
    admission: Admission | bool = True,
) -> T:
    """Make every tool call of a CrewAI `Crew` (or `Agent`) pooled, tenant-affine and gated
    by pool saturation. Changes `target` in place and returns it.

    ```python
    crew = toolpool.crewai.wrap(
        crew, pool, auth=lambda inputs: toolpool.AuthContext(tenant=inputs["tenant_id"])
    )
    crew.kickoff(inputs={"tenant_id": "acme", "topic": "renewals"})   # or kickoff_async / akickoff
    ```

    - `auth`: a function of the kickoff `inputs` (for an `Agent`: of the kickoff messages)
      returning the run's `toolpool.AuthContext`; or a fixed `AuthContext`; or None to use
      the context set around kickoff with `toolpool.auth_context(...)`.
    - `max_wait`: before a tool runs it is admitted to the destinations it uses (learned from
      its traffic, or declared in `destinations={"crm_lookup": ["crm"]}`); while one is
      saturated it waits up to `max_wait` seconds, then the model reads "busy, retry in N s"
      as the tool's error instead of the run failing. An admitted call counts against the
      destination's capacity while it runs.
    - `tool_concurrency`: initial cap on one kickoff's tool calls in flight, halved on each
      busy signal and grown back on success (CrewAI itself runs up to 8 native calls in
      parallel); None: no cap.
    - `pool_httpx`: pool the `httpx.Client()` / `httpx.AsyncClient()` / `requests` sessions
      that tool bodies build themselves (default). With False only clients built on
      `pool.client()` / `pool.sync_client()` / `toolpool.Transport(pool)` are pooled.
    - `admission`: an `Admission` to share (what it learned, across crews), or False for no
      admission at all (busy errors met by the tool's requests still reach the model).

    Wrapping again is harmless (it rebinds); `unwrap(target)` restores the original methods.
    Wrap after the crew is built: agents or tools added to it later are not wrapped.
    """
    check_crewai()
    from crewai import Crew
    from crewai.agents.agent_builder.base_agent import BaseAgent

    if not isinstance(pool, Pool):
        raise ConfigError(
            f"toolpool.crewai.wrap() needs a toolpool.Pool, got {type(pool).__name__}"
        )
    if isinstance(admission, Admission):
        gate: Admission | None = admission
    elif admission is True:
        gate = Admission(pool, max_wait=max_wait)
    elif admission is False or admission is None:
        gate = None
    else:
        raise ConfigError(
            f"admission= must be True, False or a toolpool.adapters.Admission, not {admission!r}"
        )
    if destinations:
        if gate is None:
            raise ConfigError("destinations= declares what admission waits for; keep admission on")
        for tool_name, names in destinations.items():
            gate.declare(tool_name, names)
    concurrency = tool_concurrency
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ConfigError(f"tool_concurrency= must be an int >= 1 or None, not {concurrency!r}")
    if pool_httpx:
        from toolpool.adapters import install_requests_patch

        install_requests_patch()
    binding = Binding(pool, auth, gate, concurrency, pool_httpx)
    if isinstance(target, Crew):
        _wrap_crew(target, binding)
    elif isinstance(target, BaseAgent):
        _wrap_agent(target, binding, standalone=True)
    else:
        raise ConfigError(
            f"toolpool.crewai.wrap() takes a crewai.Crew or crewai.Agent, got "
            f"{type(target).__name__}; for a single tool use wrap(Agent(..., tools=[tool]))"
        )
    log.debug("wrapped %s for %r", type(target).__name__, pool)
    return target


def unwrap(target: T) -> T:
    """Undo `wrap`: restore the tools and methods of a crew or agent (and its agents/tasks).

    Copies made while it was wrapped stay wrapped. Returns `target`.
    """
    from crewai import Crew

    if isinstance(target, Crew):
        for agent in [*target.agents, target.manager_agent, *(t.agent for t in target.tasks)]:
            if agent is not None:
                _unwrap_agent(agent)
        for task in target.tasks:
            for tool in task.tools or ():
                unwrap_tool(tool)
        for attr in (*_KICKOFF_HOOKS, "copy"):
            _clear_hook(target, attr)
    else:
        _unwrap_agent(target)
    return target


def _unwrap_agent(agent: Any) -> None:
    for tool in getattr(agent, "tools", None) or ():
        unwrap_tool(tool)
    for attr in (*_AGENT_HOOKS, *_KICKOFF_HOOKS):
        _clear_hook(agent, attr)
