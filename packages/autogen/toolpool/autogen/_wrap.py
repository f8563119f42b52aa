"""`wrap` / `unwrap`: put an existing AutoGen agent or team on a pool in one call.

AutoGen 0.7 has no public hook around tool calls; `AssistantAgent` reads its private
`_workbench` list at the start of every `on_messages_stream`, so replacing that list after
construction is enough, inside teams as well (a team holds the same agent objects). The
private names used here are pinned by tests/autogen/test_version_pin.py, per supported version.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import autogen_agentchat
from autogen_agentchat.agents import AssistantAgent, MessageFilterAgent, SocietyOfMindAgent
from autogen_agentchat.teams import BaseGroupChat

from toolpool import Pool
from toolpool.adapters import AdaptiveToolConcurrency, Admission, AuthSource
from toolpool.autogen._mcp import DEFAULT_MAX_MCP_SESSIONS
from toolpool.autogen._workbench import (
    DEFAULT_MAX_PARALLEL_TOOL_CALLS,
    DEFAULT_MAX_WAIT,
    PooledWorkbench,
)
from toolpool.errors import ConfigError

__all__ = ["TESTED_AUTOGEN_VERSIONS", "assistant_agents", "unwrap", "wrap"]

log = logging.getLogger("toolpool.autogen")

#: autogen-agentchat versions whose private hooks (`AssistantAgent._workbench`,
#: `_execute_tool_call`, `StaticWorkbench._tools`, `FunctionTool._func`, team `_participants`)
#: the test suite has verified. Other 0.7.x versions get a warning at `wrap`.
TESTED_AUTOGEN_VERSIONS: tuple[str, ...] = ("0.7.5",)

T = TypeVar("T")

_warned_version = False


def _check_version() -> None:
    global _warned_version
    version = autogen_agentchat.__version__
    if version in TESTED_AUTOGEN_VERSIONS or _warned_version:
        return
    _warned_version = True
    log.warning(
        "toolpool.autogen was tested with autogen-agentchat %s, not %s; it relies on "
        "AssistantAgent._workbench, run tests/autogen/test_version_pin.py to check this version",
        ", ".join(TESTED_AUTOGEN_VERSIONS),
        version,
    )


# The gates of the agents wrapped on one pool, per (max_parallel_tool_calls, max_wait): AutoGen
# agents are stateful, so applications build one per conversation or task and wrap each; had
# every wrap its own limit, the limit would bound one turn and nothing else, and a storm of
# agents would queue every call in the pool (issue 25: 2.5-3.6x the connections of LangChain's
# one middleware per agent, whose limit all its runs share). Kept on the pool itself: a global
# map would keep every pool alive (each Admission refers to its pool).
_GATES_ATTR = "_toolpool_autogen_gates"
_gates_lock = threading.Lock()


def _shared_gates(
    pool: Pool, max_parallel_tool_calls: int, max_wait: float
) -> tuple[Admission, AdaptiveToolConcurrency]:
    """The admission gate and adaptive tool-call limit that `wrap` gives every agent it wraps
    on `pool` with these settings: one of each, shared across wraps."""
    with _gates_lock:
        by_settings: dict[tuple[int, float], tuple[Admission, AdaptiveToolConcurrency]]
        by_settings = pool.__dict__.setdefault(_GATES_ATTR, {})
        key = (max_parallel_tool_calls, float(max_wait))
        gates = by_settings.get(key)
        if gates is None:
            gates = by_settings[key] = (
                Admission(pool, max_wait=max_wait),
                AdaptiveToolConcurrency(max_parallel_tool_calls),
            )
        return gates


def assistant_agents(target: Any) -> Iterator[AssistantAgent]:
    """Every `AssistantAgent` in `target`: itself, a team's participants (nested teams too),
    a `SocietyOfMindAgent`'s inner team, a `MessageFilterAgent`'s wrapped agent."""
    seen: set[int] = set()
    todo: list[Any] = [target]
    while todo:
        node = todo.pop(0)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, AssistantAgent):
            yield node
        elif isinstance(node, BaseGroupChat):
            todo.extend(node._participants)
        elif isinstance(node, SocietyOfMindAgent):
            todo.append(node._team)
        elif isinstance(node, MessageFilterAgent):
            todo.append(node._wrapped_agent)


def wrap(
    target: T,
    pool: Pool,
    *,
    auth: AuthSource = None,
    max_parallel_tool_calls: int = DEFAULT_MAX_PARALLEL_TOOL_CALLS,
    max_wait: float = DEFAULT_MAX_WAIT,
    destinations: Mapping[str, Iterable[str]] | None = None,
    pool_httpx: bool = True,
    max_mcp_sessions: int = DEFAULT_MAX_MCP_SESSIONS,
) -> T:
    """Run every tool call of an AutoGen agent or team on `pool`; returns `target` itself.

    ```python
    agent = toolpool.autogen.wrap(agent, pool)              # or a team
    with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
        await agent.run(task="...")
    ```

    `target`: an `AssistantAgent`, or a team (`RoundRobinGroupChat`, `SelectorGroupChat`,
    `Swarm`, `GraphFlow`, ...; nested teams, `SocietyOfMindAgent` and `MessageFilterAgent`
    included): every `AssistantAgent` in it gets `PooledWorkbench`es over its workbenches.
    Other agents have no tools and are left alone.

    `auth`: the `AuthContext` tool calls act for; or a function called with the agent making
    the call, returning it; or None (default) for the context current around the run. AutoGen
    has no per-run context object, so a per-run tenant is set with `toolpool.auth_context`.

    Every agent wrapped on the same pool (with the same `max_parallel_tool_calls` and
    `max_wait`) shares one admission gate and one adaptive tool-call limit: at most
    `max_parallel_tool_calls` tool calls of these agents in flight, halved on each busy
    destination, so agents built and wrapped per task are held back together, as the runs of
    one wrapped LangChain agent are; `max_wait` bounds how long a call waits for a
    saturated destination before the model reads "busy, retry in N s". `destinations` declares
    `{tool name: [destination names]}` for admission from the first call. An `McpWorkbench`
    over HTTP gets one session per tenant (at most `max_mcp_sessions`); stop them with
    `await workbench.stop()` on the agent's workbenches. Wrapping a wrapped agent replaces its
    previous wrapping. The new workbench is used from the agent's next run.
    """
    if not isinstance(pool, Pool):
        raise ConfigError(f"wrap() needs a toolpool.Pool, not {type(pool).__name__}")
    _check_version()
    agents = list(assistant_agents(target))
    if not agents:
        raise ConfigError(
            f"toolpool.autogen.wrap() found no AssistantAgent in {type(target).__name__}; pass "
            f"an autogen_agentchat AssistantAgent or a team (RoundRobinGroupChat, "
            f"SelectorGroupChat, ...) that contains one"
        )
    admission, concurrency = _shared_gates(pool, max_parallel_tool_calls, max_wait)
    for agent in agents:
        inner = [_unwrapped(wb) for wb in agent._workbench]
        agent._workbench = [
            PooledWorkbench(
                wb,
                pool,
                auth=auth,
                admission=admission,
                concurrency=concurrency,
                destinations=destinations,
                pool_httpx=pool_httpx,
                run_input=agent,
                max_mcp_sessions=max_mcp_sessions,
            )
            for wb in inner
        ]
    log.debug("wrapped %d AssistantAgent(s) of %s on %r", len(agents), type(target).__name__, pool)
    return target


def unwrap(target: T) -> T:
    """Undo `wrap`: every `AssistantAgent` in `target` gets its own workbenches back."""
    for agent in assistant_agents(target):
        agent._workbench = [_unwrapped(wb) for wb in agent._workbench]
    return target


def _unwrapped(workbench: Any) -> Any:
    return workbench.inner if isinstance(workbench, PooledWorkbench) else workbench
