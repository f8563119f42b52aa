"""`PooledWorkbench`: an AutoGen workbench whose tool calls run on a toolpool `Pool`.

AutoGen 0.7 fans a model turn's tool calls out with an unbounded `asyncio.gather`, each call
going to `workbench.call_tool_stream(...)` (for a `StaticStreamWorkbench`) or
`workbench.call_tool(...)`. This workbench is therefore the one place where a call can be
gated: per call it

1. waits for a slot of the agent's adaptive (AIMD) tool-call limit,
2. holds a place in the pool's admission for the tool's destinations (waiting, boundedly,
   while they are saturated),
3. runs the tool inside `toolpool.adapters.atool_call_scope`: the call's `AuthContext` is
   current and `httpx.Client()` / `httpx.AsyncClient()` built by the tool use the pool,
4. turns a busy destination (`PoolSaturated`, `PoolTimeout`, `DestinationUnavailable`) into
   `ToolResult(is_error=True)` with a "retry in N s" text the model reads, and halves the limit.

It subclasses `StaticStreamWorkbench` so that `AssistantAgent` keeps using its streaming branch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from typing import Any, cast

from autogen_core import CancellationToken, ComponentModel
from autogen_core.tools import (
    StaticStreamWorkbench,
    StaticWorkbench,
    StreamTool,
    TextResultContent,
    ToolResult,
    ToolSchema,
    Workbench,
)
from autogen_core.tools._workbench import StreamWorkbench  # not re-exported by autogen_core.tools

from toolpool import AuthContext, Pool
from toolpool.adapters import (
    AdaptiveToolConcurrency,
    Admission,
    AuthSource,
    Held,
    ToolCall,
    atool_call_scope,
    busy_message,
    denied_message,
    find_busy,
    find_denied,
    resolve_auth,
)
from toolpool.autogen._function_tool import with_thread_context
from toolpool.autogen._mcp import DEFAULT_MAX_MCP_SESSIONS, McpSessions, is_http_mcp_workbench
from toolpool.autogen._schemas import tool_schema
from toolpool.errors import ConfigError

__all__ = ["DEFAULT_MAX_PARALLEL_TOOL_CALLS", "PooledWorkbench"]

log = logging.getLogger("toolpool.autogen")

# Tool calls in flight across the agents `wrap` put on one pool (they share the limit), as
# LangChain's middleware allows its runs (64): high enough not to slow a healthy fleet of
# agents, low enough that a storm waits here rather than in the pool's queues, where waiting
# tenants close each other's idle connections. The AIMD limit starts here and halves on every
# busy destination.
DEFAULT_MAX_PARALLEL_TOOL_CALLS = 64

# The same bound as toolpool.adapters.Admission's default: long enough to ride out a burst,
# short enough that the model hears "busy" while retrying still makes sense.
DEFAULT_MAX_WAIT = 5.0

_AUTH_HINT = (
    "pass auth=toolpool.AuthContext(...) to toolpool.autogen.wrap(), a function of the agent "
    "returning one, or run the agent inside `with toolpool.auth_context(ctx):`"
)

_DONE = object()


def _text_result(name: str, text: str, *, is_error: bool) -> ToolResult:
    return ToolResult(name=name, result=[TextResultContent(content=text)], is_error=is_error)


class PooledWorkbench(StaticStreamWorkbench):
    """Wraps a workbench so that every tool call runs on `pool`, for the right tenant.

    ```python
    from autogen_core.tools import StaticStreamWorkbench
    from toolpool.autogen import PooledWorkbench

    workbench = PooledWorkbench(StaticStreamWorkbench(tools), pool)
    agent = AssistantAgent("reviewer", model_client=model, workbench=workbench)
    # or, for an agent (or team) that exists already:  toolpool.autogen.wrap(agent, pool)
    ```

    `auth`: the `AuthContext` the calls act for, a function of `run_input` (the agent, when
    `wrap` built this workbench) returning one, or None for the context current around the
    run (`with toolpool.auth_context(ctx): await agent.run(...)`). The context is resolved
    per tool call.

    `admission` / `concurrency`: share one `toolpool.adapters.Admission` or
    `AdaptiveToolConcurrency` between workbenches (`wrap` shares them across a team); by
    default each workbench makes its own, from `max_wait` and `max_parallel_tool_calls`.
    `destinations` declares which destination names a tool uses, so admission applies from its
    first call (otherwise it learns them from the tool's pooled traffic). `pool_httpx=False`
    leaves httpx clients built by tools alone (they then reach the pool only if they pass a
    toolpool transport themselves).

    Tools of a static workbench run here directly; a sync `FunctionTool` runs in a worker
    thread that keeps the call's context variables. An `McpWorkbench` over HTTP (streamable
    HTTP or SSE) gets one MCP session per `AuthContext`, started on the pool for that tenant
    (at most `max_mcp_sessions`, least recently used idle ones closed; `stop()` closes all).
    Any other workbench (stdio MCP, your own) gets the same admission, limit and auth context
    around its `call_tool`.

    `dump_component()` returns the inner workbench's component: a saved agent loads back
    unpooled (a pool cannot be serialized); wrap it again after loading.
    """

    def __init__(
        self,
        workbench: Workbench,
        pool: Pool,
        *,
        auth: AuthSource = None,
        admission: Admission | None = None,
        concurrency: AdaptiveToolConcurrency | None = None,
        max_parallel_tool_calls: int = DEFAULT_MAX_PARALLEL_TOOL_CALLS,
        max_wait: float = DEFAULT_MAX_WAIT,
        destinations: Mapping[str, Iterable[str]] | None = None,
        pool_httpx: bool = True,
        run_input: Any = None,
        max_mcp_sessions: int = DEFAULT_MAX_MCP_SESSIONS,
    ) -> None:
        if isinstance(workbench, PooledWorkbench):
            raise ConfigError(
                "this workbench is already a toolpool.autogen.PooledWorkbench; wrap its "
                "`.inner` workbench (or call toolpool.autogen.unwrap first)"
            )
        if not isinstance(workbench, Workbench):
            raise ConfigError(
                f"PooledWorkbench wraps an autogen_core.tools.Workbench, not "
                f"{type(workbench).__name__}"
            )
        if not isinstance(pool, Pool):
            raise ConfigError(f"pool must be a toolpool.Pool, not {type(pool).__name__}")
        if isinstance(workbench, StaticWorkbench):
            tools = [with_thread_context(tool) for tool in workbench._tools]
            super().__init__(tools, tool_overrides=dict(workbench._tool_overrides))
            self._static = True
        else:
            super().__init__([])
            self._static = False
        self._inner = workbench
        self._pool = pool
        self._auth = auth
        self._run_input = run_input
        self._pool_httpx = pool_httpx
        self._admission = admission if admission is not None else Admission(pool, max_wait=max_wait)
        self._concurrency = (
            concurrency
            if concurrency is not None
            else AdaptiveToolConcurrency(max_parallel_tool_calls)
        )
        for tool_name, names in (destinations or {}).items():
            self._admission.declare(tool_name, list(names))
        self._mcp: McpSessions | None = None
        if is_http_mcp_workbench(workbench):
            self._mcp = McpSessions(
                workbench,  # type: ignore[arg-type]
                pool,
                self._admission,
                pool_httpx=pool_httpx,
                max_sessions=max_mcp_sessions,
            )

    def __repr__(self) -> str:
        inner = type(self._inner).__name__
        return f"<toolpool.autogen.PooledWorkbench over {inner} {self._pool!r}>"

    # ------------------------------------------------------------------ accessors

    @property
    def inner(self) -> Workbench:
        """The wrapped workbench (what `unwrap` puts back)."""
        return self._inner

    @property
    def pool(self) -> Pool:
        """The pool the tool calls run on."""
        return self._pool

    @property
    def admission(self) -> Admission:
        """The admission gate asked before each tool call."""
        return self._admission

    @property
    def concurrency(self) -> AdaptiveToolConcurrency:
        """The AIMD limit on this workbench's parallel tool calls."""
        return self._concurrency

    @property
    def mcp_sessions(self) -> McpSessions | None:
        """The per-tenant sessions when the inner workbench is an HTTP `McpWorkbench`."""
        return self._mcp

    def current_auth(self) -> AuthContext | None:
        """The `AuthContext` a tool call starting now acts for."""
        return resolve_auth(self._auth, self._run_input, framework="autogen", hint=_AUTH_HINT)

    # ------------------------------------------------------------------ Workbench API

    async def list_tools(self) -> list[ToolSchema]:
        """The inner workbench's tools, unchanged.

        A static workbench's schemas are computed once per tool (`StaticWorkbench` rebuilds
        them through pydantic on each call, and AutoGen lists the tools before every model
        turn and every tool call), with the workbench's name and description overrides
        applied as `StaticWorkbench.list_tools` applies them.
        """
        if self._static:
            return [self._with_override(tool_schema(tool), tool.name) for tool in self._tools]
        if self._mcp is not None:
            return await self._mcp.list_tools(self.current_auth())
        return await self._inner.list_tools()

    def _with_override(self, schema: ToolSchema, tool_name: str) -> ToolSchema:
        override = self._tool_overrides.get(tool_name)
        if override is None:
            return schema
        out: ToolSchema = {
            "name": override.name if override.name is not None else schema["name"],
            "description": override.description
            if override.description is not None
            else schema.get("description", ""),
        }
        if "parameters" in schema:
            out["parameters"] = schema["parameters"]
        if "strict" in schema:
            out["strict"] = schema["strict"]
        return out

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> ToolResult:
        """Run one tool call on the pool; a busy destination gives an error `ToolResult`."""
        token = cancellation_token or CancellationToken()
        task = asyncio.ensure_future(self._gated_call(name, arguments or {}, token, call_id, None))
        token.link_future(task)
        return await task

    async def call_tool_stream(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        cancellation_token: CancellationToken | None = None,
        call_id: str | None = None,
    ) -> AsyncGenerator[Any | ToolResult, None]:
        """`call_tool`, yielding a stream tool's intermediate results before the `ToolResult`.

        The call runs in its own task so that its auth context and pooling scope never
        leak into the agent's code between two yields.
        """
        token = cancellation_token or CancellationToken()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def run() -> ToolResult:
            try:
                return await self._gated_call(
                    name, arguments or {}, token, call_id, queue.put_nowait
                )
            finally:
                queue.put_nowait(_DONE)

        task = asyncio.ensure_future(run())
        token.link_future(task)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                yield item
            result = await task
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
        yield result

    async def start(self) -> None:
        """Start the inner workbench (an HTTP `McpWorkbench`: sessions start per tenant,
        on first use)."""
        if self._mcp is None:
            await self._inner.start()

    async def stop(self) -> None:
        """Stop the inner workbench (an HTTP `McpWorkbench`: every tenant's session)."""
        if self._mcp is None:
            await self._inner.stop()
            return
        await self._mcp.stop()
        if getattr(self._inner, "_actor", None) is not None:  # started by its owner
            await self._inner.stop()

    async def reset(self) -> None:
        """Reset the inner workbench."""
        await self._inner.reset()

    async def save_state(self) -> Mapping[str, Any]:
        """The inner workbench's state."""
        return await self._inner.save_state()

    async def load_state(self, state: Mapping[str, Any]) -> None:
        """Load state into the inner workbench."""
        await self._inner.load_state(state)

    def dump_component(self) -> ComponentModel:
        """The inner workbench's component: pools do not serialize; wrap again after loading."""
        return self._inner.dump_component()

    # ------------------------------------------------------------------ one tool call

    async def _gated_call(
        self,
        name: str,
        arguments: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None,
        emit: Callable[[Any], None] | None,
    ) -> ToolResult:
        try:
            ctx = self.current_auth()
        except ConfigError as exc:
            # An exception escaping a workbench makes AutoGen 0.7's run wait forever (its
            # tool-call task dies before signalling the end of its stream), so a
            # misconfiguration is reported as the call's error result and logged.
            log.error("tool %r not run: %s", name, exc)
            return _text_result(name, str(exc), is_error=True)
        async with self._concurrency.slot(ctx.label if ctx is not None else None) as slot:
            call: ToolCall | None = None
            held = Held()
            try:
                async with (
                    self._admission.hold(name, ctx) as held,
                    atool_call_scope(
                        self._pool,
                        ctx,
                        tool_name=name,
                        pool_httpx=self._pool_httpx,
                        admission=self._admission,
                    ) as call,
                ):
                    result = await self._run(
                        name, arguments, cancellation_token, call_id, emit, call
                    )
            except Exception as exc:
                # Tool errors are already error results (as in AutoGen); what arrives here is
                # a busy destination, or a failure of the gate itself, which must not escape
                # either (see above): it becomes the call's error result.
                busy = find_busy(exc) or (call.busy if call is not None else None)
                if busy is None:
                    denied = find_denied(exc)
                    if denied is not None:  # e.g. an MCP session's connect was refused
                        return _text_result(name, denied_message(denied, name), is_error=True)
                    log.exception("tool %r failed outside its body", name)
                    return _text_result(name, self._format_errors(exc), is_error=True)
                slot.busy()
                text = busy_message(busy, name)
                log.debug("%s", text)
                return _text_result(name, text, is_error=True)
            if held.waited or (call is not None and (call.busy is not None or call.waited)):
                # The tool waited at a saturated destination, or met a busy one and handled
                # it itself: fewer parallel tool calls until it recovers.
                slot.busy()
            else:
                slot.success()
            return result

    async def _run(
        self,
        name: str,
        arguments: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None,
        emit: Callable[[Any], None] | None,
        call: ToolCall,
    ) -> ToolResult:
        if not self._static:
            return await self._run_inner(name, arguments, cancellation_token, call_id, emit, call)
        original = self._override_name_to_original.get(name, name)
        tool = next((t for t in self._tools if t.name == original), None)
        if tool is None:
            return _text_result(name, f"Tool {name} not found.", is_error=True)
        try:
            # Not isinstance(tool, StreamTool): a runtime protocol check reads every member of
            # the protocol on the instance, `schema` included, which rebuilds the schema.
            if emit is not None and callable(getattr(type(tool), "run_json_stream", None)):
                output = await self._run_stream_tool(
                    cast(StreamTool, tool), arguments, cancellation_token, call_id, emit
                )
            else:
                # Awaited in this task, which the caller linked to the cancellation token.
                output = await tool.run_json(arguments, cancellation_token, call_id=call_id)
        except Exception as exc:
            if find_busy(exc) is not None or call.busy is not None:
                raise  # the caller turns it into the "busy, retry in N s" result
            denied = find_denied(exc)
            if denied is not None:
                return _text_result(name, denied_message(denied, name), is_error=True)
            return _text_result(name, self._format_errors(exc), is_error=True)
        return _text_result(name, tool.return_value_as_string(output), is_error=False)

    @staticmethod
    async def _run_stream_tool(
        tool: StreamTool,
        arguments: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None,
        emit: Callable[[Any], None],
    ) -> Any:
        # The last value a stream tool yields is its return value; the ones before it are
        # progress the agent forwards to its own stream.
        last: Any = None
        have_last = False
        try:
            async for item in tool.run_json_stream(arguments, cancellation_token, call_id=call_id):
                if have_last:
                    emit(last)
                last, have_last = item, True
        except Exception:
            if have_last:
                emit(last)
            raise
        return last

    async def _run_inner(
        self,
        name: str,
        arguments: Mapping[str, Any],
        cancellation_token: CancellationToken,
        call_id: str | None,
        emit: Callable[[Any], None] | None,
        call: ToolCall,
    ) -> ToolResult:
        if self._mcp is not None:
            return await self._mcp.call_tool(name, arguments, cancellation_token, call_id, call.ctx)
        inner = self._inner
        if emit is None or not isinstance(inner, StreamWorkbench):
            return await inner.call_tool(name, arguments, cancellation_token, call_id)
        result: ToolResult | None = None
        async for item in inner.call_tool_stream(name, arguments, cancellation_token, call_id):
            if isinstance(item, ToolResult):
                result = item
            else:
                emit(item)
        if result is None:
            return _text_result(name, f"Tool {name} returned no result.", is_error=True)
        return result
