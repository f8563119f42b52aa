"""`wrap`: add toolpool to an agent that is already compiled, in one call.

A compiled LangGraph agent has no public way to add middleware. Its tools run in `ToolNode`s,
and a `ToolNode` reads its private `_wrap_tool_call` / `_awrap_tool_call` hooks on every tool
call; `wrap` composes the `ToolpoolMiddleware` hooks over them (outermost, so the tool call
and every middleware the agent already had run inside the tenant's scope). That is private
API of langgraph-prebuilt: `check_tool_node_hooks` verifies its shape before anything is
changed, and tests/langchain pins it per supported version. When you build the agent
yourself, prefer `create_agent(..., middleware=[ToolpoolMiddleware(...)])`.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from langgraph.prebuilt.tool_node import ToolCallRequest, ToolNode
from langgraph.pregel import Pregel

from toolpool import AuthContext, Pool
from toolpool.errors import ConfigError
from toolpool.langchain._middleware import (
    DEFAULT_MAX_WAIT,
    DEFAULT_TOOL_CONCURRENCY,
    ToolpoolMiddleware,
    ToolResult,
)

__all__ = ["TESTED_LANGGRAPH_PREBUILT", "check_tool_node_hooks", "tool_nodes", "wrap"]

log = logging.getLogger("toolpool.langchain")

A = TypeVar("A")

#: langgraph-prebuilt versions (major.minor) whose private ToolNode hooks `wrap` was verified
#: against (tests/langchain/test_langchain_version_pin.py).
TESTED_LANGGRAPH_PREBUILT = ("1.1",)

SyncWrapper = Callable[[ToolCallRequest, Callable[[ToolCallRequest], ToolResult]], ToolResult]
AsyncWrapper = Callable[
    [ToolCallRequest, Callable[[ToolCallRequest], Awaitable[ToolResult]]], Awaitable[ToolResult]
]

_MARK = "_toolpool_middleware"
_warned_version = False


def _prebuilt_version() -> str:
    try:
        return importlib.metadata.version("langgraph-prebuilt")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - vendored installs
        return "unknown"


def check_tool_node_hooks(node: ToolNode) -> None:
    """Raise `ConfigError` unless `node` has the private hooks `wrap` composes over.

    The hooks are instance attributes set by `ToolNode.__init__` and read by `_run_one` /
    `_arun_one` on every tool call.
    """
    version = _prebuilt_version()
    missing = [name for name in ("_wrap_tool_call", "_awrap_tool_call") if not hasattr(node, name)]
    readers = {"_run_one": "self._wrap_tool_call", "_arun_one": "self._awrap_tool_call"}
    for method, attribute in readers.items():
        try:
            source = inspect.getsource(getattr(type(node), method))
        except (AttributeError, OSError, TypeError):
            missing.append(f"{method}()")
            continue
        if attribute not in source:
            missing.append(f"{method}() reading {attribute}")
    if missing:
        raise ConfigError(
            f"toolpool.langchain.wrap() cannot hook this agent: langgraph-prebuilt {version} "
            f"changed ToolNode's private tool-call hooks (missing: {', '.join(missing)}; "
            f"verified versions: {', '.join(TESTED_LANGGRAPH_PREBUILT)}). Build the agent with "
            f"create_agent(..., middleware=[toolpool.langchain.ToolpoolMiddleware(pool, "
            f"auth=...)]) instead, or install a verified langgraph-prebuilt version"
        )
    global _warned_version
    if not _warned_version and ".".join(version.split(".")[:2]) not in TESTED_LANGGRAPH_PREBUILT:
        _warned_version = True
        log.warning(
            "toolpool.langchain.wrap() was verified with langgraph-prebuilt %s, not %s; the "
            "hooks it uses are present, so it proceeds",
            "/".join(TESTED_LANGGRAPH_PREBUILT),
            version,
        )


def _graphs(agent: Any) -> Iterator[Any]:
    """The agent's graph and every subgraph it contains (a runnable binding is unwrapped)."""
    graph = agent
    while not isinstance(graph, Pregel) and hasattr(graph, "bound"):
        graph = graph.bound
    if not isinstance(graph, Pregel):
        raise ConfigError(
            f"toolpool.langchain.wrap() takes a compiled LangGraph agent (from create_agent() "
            f"or StateGraph.compile()), got {type(agent).__name__}"
        )
    yield graph
    for _namespace, subgraph in graph.get_subgraphs(recurse=True):
        yield subgraph


def tool_nodes(agent: Any) -> list[ToolNode]:
    """Every `ToolNode` of a compiled agent, subgraphs included."""
    found: list[ToolNode] = []
    for graph in _graphs(agent):
        for node in graph.nodes.values():
            bound = getattr(node, "bound", None)
            if isinstance(bound, ToolNode) and not any(bound is f for f in found):
                found.append(bound)
    return found


def _compose(node: ToolNode, middleware: ToolpoolMiddleware) -> None:
    inner_sync: SyncWrapper | None = node._wrap_tool_call
    inner_async: AsyncWrapper | None = node._awrap_tool_call

    def wrap_tool_call(
        request: ToolCallRequest, execute: Callable[[ToolCallRequest], ToolResult]
    ) -> ToolResult:
        if inner_sync is None:
            return middleware.wrap_tool_call(request, execute)
        sync_inner = inner_sync
        return middleware.wrap_tool_call(request, lambda req: sync_inner(req, execute))

    async def awrap_tool_call(
        request: ToolCallRequest, execute: Callable[[ToolCallRequest], Awaitable[ToolResult]]
    ) -> ToolResult:
        if inner_async is None:
            return await middleware.awrap_tool_call(request, execute)
        async_inner = inner_async

        async def call_inner(req: ToolCallRequest) -> ToolResult:
            return await async_inner(req, execute)

        return await middleware.awrap_tool_call(request, call_inner)

    node._wrap_tool_call = wrap_tool_call
    if inner_sync is not None and inner_async is None:
        # A node with only a sync wrapper runs it (with a sync tool execution) on the async
        # path too; an async hook here would have no sync execution to hand it. Keep that.
        return
    node._awrap_tool_call = awrap_tool_call


def wrap(
    agent: A,
    pool: Pool,
    auth: AuthContext | Callable[[Any], AuthContext | None] | None = None,
    *,
    pool_httpx: bool = True,
    max_wait: float = DEFAULT_MAX_WAIT,
    tool_concurrency: int | None = DEFAULT_TOOL_CONCURRENCY,
    destinations: Mapping[str, Iterable[str]] | None = None,
) -> A:
    """Pool the tool calls of an already compiled agent, each on its run's tenant.

    ```python
    agent = create_agent(model, tools, context_schema=Ctx)          # unchanged tools
    agent = toolpool.langchain.wrap(
        agent, pool, auth=lambda run: toolpool.AuthContext(tenant=run.context.tenant_id)
    )
    agent.invoke({"messages": [...]}, context=Ctx(tenant_id="acme"))
    ```

    Changes the agent in place (and returns it; copies such as `agent.with_config(...)` share
    its tool nodes, so they are wrapped too): every `ToolNode` in it, subgraphs included,
    runs its tool calls through a `ToolpoolMiddleware(pool, auth, ...)` (see it for the
    arguments) placed outside the agent's own tool middleware. Raises `ConfigError` if the
    agent has no tool node, is already wrapped, or langgraph changed the hooks this uses.
    """
    nodes = tool_nodes(agent)
    if not nodes:
        raise ConfigError(
            "toolpool.langchain.wrap() found no ToolNode in this agent: it has no tools to "
            "pool. Create it with tools (create_agent(model, tools=[...]))"
        )
    for node in nodes:
        check_tool_node_hooks(node)
        if getattr(node, _MARK, None) is not None:
            raise ConfigError(
                "this agent is already wrapped by toolpool.langchain.wrap(); wrap it once "
                "(build the agent again to change the pool or auth)"
            )
    middleware = ToolpoolMiddleware(
        pool,
        auth,
        pool_httpx=pool_httpx,
        max_wait=max_wait,
        tool_concurrency=tool_concurrency,
        destinations=destinations,
    )
    for node in nodes:
        _compose(node, middleware)
        setattr(node, _MARK, middleware)
    log.debug("wrapped %d tool node(s) with %r", len(nodes), middleware)
    return agent


def middleware_of(agent: Any) -> ToolpoolMiddleware | None:
    """The `ToolpoolMiddleware` that `wrap` installed on `agent`, or None."""
    for node in tool_nodes(agent):
        found = getattr(node, _MARK, None)
        if isinstance(found, ToolpoolMiddleware):
            return found
    return None
