"""`ToolpoolMiddleware`: LangChain's tool-call hook, translated into toolpool's adapter helpers.

Every tool call of the agent runs as one toolpool tool call: inside the auth context that
`auth` gives for the run, with the httpx clients the tool builds itself pooled, after
admission on the destinations the tool uses, and inside one slot of an adaptive limit on
parallel tool calls. A busy destination becomes a `ToolMessage(status="error")` that the model
reads ("... busy, retry in N s") instead of an exception that ends the run.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from langchain_core.messages import ToolMessage
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from langchain.agents.middleware import AgentMiddleware
from toolpool import AuthContext, Pool
from toolpool.adapters import (
    AdaptiveToolConcurrency,
    Admission,
    Held,
    ToolCall,
    ToolSlot,
    atool_call_scope,
    busy_message,
    denied_message,
    find_busy,
    find_denied,
    find_mcp_failure,
    is_mcp_tool,
    mcp_failure_message,
    resolve_auth,
    tool_call_scope,
)
from toolpool.errors import ConfigError

__all__ = ["ToolpoolMiddleware"]

log = logging.getLogger("toolpool.langchain")

ToolResult = ToolMessage | Command[Any]

AUTH_HINT = (
    "pass the tenant with the run, e.g. agent.invoke(inputs, context=MyContext(tenant_id=...)) "
    "or config={'configurable': {'tenant_id': ...}}, and read it in auth= "
    "(lambda run: toolpool.AuthContext(tenant=run.context.tenant_id)); or pass a fixed "
    "auth=toolpool.AuthContext(...)"
)

# A cap on parallel tool calls that only matters once destinations saturate: it starts high
# enough not to slow a healthy agent down and halves on each busy signal.
DEFAULT_TOOL_CONCURRENCY = 64
# How long a tool call waits for a saturated destination before the model is told it is busy:
# long enough to ride out a burst, short against a model turn.
DEFAULT_MAX_WAIT = 5.0


class ToolpoolMiddleware(AgentMiddleware):
    """Pools an agent's tool calls and keeps each one on its run's tenant.

    ```python
    from langchain.agents import create_agent
    from toolpool.langchain import ToolpoolMiddleware

    agent = create_agent(model, tools, context_schema=Ctx, middleware=[
        ToolpoolMiddleware(pool, auth=lambda run: toolpool.AuthContext(tenant=run.context.tenant)),
    ])
    agent.invoke({"messages": [...]}, context=Ctx(tenant="acme"))
    ```

    - `auth`: a `toolpool.AuthContext`, a function of the tool call's runtime
      (`run.context`, `run.config["configurable"]`, `run.state`) returning one, or None to use
      the `toolpool.auth_context(...)` around the invocation.
    - `pool_httpx`: give `httpx.Client()` / `httpx.AsyncClient()` built inside tools (without
      their own transport) the pool's transport. False keeps tools' clients as they are.
    - `max_wait`: seconds a call waits for a saturated destination before it is answered
      "busy, retry in N s".
    - `tool_concurrency`: initial (and highest) number of tool calls in flight across this
      middleware's runs; halved on busy signals, grown back on success. None: no limit.
    - `destinations`: `{tool_name: [destination, ...]}` known up front; otherwise learned from
      each tool's traffic.
    """

    def __init__(
        self,
        pool: Pool,
        auth: AuthContext | Callable[[Any], AuthContext | None] | None = None,
        *,
        pool_httpx: bool = True,
        max_wait: float = DEFAULT_MAX_WAIT,
        tool_concurrency: int | None = DEFAULT_TOOL_CONCURRENCY,
        destinations: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        if not isinstance(pool, Pool):
            raise ConfigError(
                f"ToolpoolMiddleware needs a toolpool.Pool as its first argument, "
                f"got {type(pool).__name__}"
            )
        if auth is not None and not isinstance(auth, AuthContext) and not callable(auth):
            raise ConfigError(
                "ToolpoolMiddleware(auth=...) takes a toolpool.AuthContext, a function of the "
                f"tool call's runtime returning one, or None; got {type(auth).__name__}"
            )
        super().__init__()
        self.pool = pool
        self.auth = auth
        self.pool_httpx = pool_httpx
        self.admission = Admission(pool, max_wait=max_wait)
        self._lock = threading.Lock()
        #: Tool calls answered "busy" instead of running to the end.
        self.busy_total = 0
        self.concurrency = (
            AdaptiveToolConcurrency(tool_concurrency) if tool_concurrency is not None else None
        )
        for tool_name, names in (destinations or {}).items():
            self.admission.declare(tool_name, names)

    def __repr__(self) -> str:
        return f"<ToolpoolMiddleware pool={self.pool!r} concurrency={self.concurrency!r}>"

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: ToolCallRequest) -> AuthContext | None:
        return resolve_auth(self.auth, request.runtime, framework="langchain", hint=AUTH_HINT)

    @contextlib.contextmanager
    def _slot_sync(self, ctx: AuthContext | None) -> Iterator[ToolSlot | None]:
        if self.concurrency is None:
            yield None
        else:
            with self.concurrency.slot_sync(_label(ctx)) as slot:
                yield slot

    @contextlib.asynccontextmanager
    async def _slot(self, ctx: AuthContext | None) -> AsyncIterator[ToolSlot | None]:
        if self.concurrency is None:
            yield None
        else:
            async with self.concurrency.slot(_label(ctx)) as slot:
                yield slot

    def _tool_span(self, request: ToolCallRequest) -> contextlib.AbstractContextManager[object]:
        """LangChain opens no OpenTelemetry span for a tool call; when toolpool.otel traces
        the pool, one `execute_tool {name}` span (GenAI conventions) holds the call's
        requests, as AutoGen's own span does (`Pool.tool_span`)."""
        call = request.tool_call
        return self.pool.tool_span(call["name"], call.get("id"), system="langchain")

    @staticmethod
    def _settle(slot: ToolSlot | None, call: ToolCall | None, held: Held) -> None:
        if slot is None:
            return
        if held.waited or (call is not None and (call.busy is not None or call.waited)):
            # The tool waited at a saturated destination, or caught a busy error itself:
            # fewer tool calls at once until it recovers.
            slot.busy()
        else:
            slot.success()

    def _busy_result(
        self, request: ToolCallRequest, exc: BaseException, slot: ToolSlot | None
    ) -> ToolMessage:
        if slot is not None:
            slot.busy()
        with self._lock:
            self.busy_total += 1
        name = request.tool_call["name"]
        text = busy_message(exc, name)
        log.info("%s", text)
        return _error_message(request, text)

    @staticmethod
    def _denied_result(request: ToolCallRequest, exc: Exception) -> ToolMessage:
        """A connect the egress policy refused, or an MCP failure (a server gone, a dead
        session, an MCP error, in whatever exception group the MCP client raised it),
        becomes the tool's error message; any other error propagates unchanged."""
        name = request.tool_call["name"]
        denied = find_denied(exc)
        if denied is not None:
            text = denied_message(denied, name)
        else:
            failure = find_mcp_failure(exc, mcp_tool=is_mcp_tool(request.tool))
            if failure is None:
                raise exc
            text = mcp_failure_message(failure, name)
            log.info("%s", text)
        return _error_message(request, text)

    # ------------------------------------------------------------------ the hooks

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolResult],
    ) -> ToolResult:
        """Run one tool call (sync path) pooled, for its run's tenant, under admission."""
        ctx = self._auth(request)
        name = request.tool_call["name"]
        with self._tool_span(request), self._slot_sync(ctx) as slot:
            call: ToolCall | None = None
            held = Held()
            try:
                with (
                    self.admission.hold_sync(name, ctx) as held,
                    tool_call_scope(
                        self.pool,
                        ctx,
                        tool_name=name,
                        pool_httpx=self.pool_httpx,
                        admission=self.admission,
                    ) as call,
                ):
                    result = handler(request)
            except Exception as exc:
                # The tool's own traffic may have met the busy pool inside an SDK that
                # reports it as its own error (an MCP client's JSON-RPC error, say).
                busy = find_busy(exc) or (call.busy if call is not None else None)
                if busy is None:
                    return self._denied_result(request, exc)
                return self._busy_result(request, busy, slot)
            self._settle(slot, call, held)
            return result

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolResult]],
    ) -> ToolResult:
        """Run one tool call (async path) pooled, for its run's tenant, under admission."""
        ctx = self._auth(request)
        name = request.tool_call["name"]
        with self._tool_span(request):
            return await self._acall(request, handler, ctx, name)

    async def _acall(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolResult]],
        ctx: AuthContext | None,
        name: str,
    ) -> ToolResult:
        async with self._slot(ctx) as slot:
            call: ToolCall | None = None
            held = Held()
            try:
                async with (
                    self.admission.hold(name, ctx) as held,
                    atool_call_scope(
                        self.pool,
                        ctx,
                        tool_name=name,
                        pool_httpx=self.pool_httpx,
                        admission=self.admission,
                    ) as call,
                ):
                    result = await handler(request)
            except Exception as exc:
                # The tool's own traffic may have met the busy pool inside an SDK that
                # reports it as its own error (an MCP client's JSON-RPC error, say).
                busy = find_busy(exc) or (call.busy if call is not None else None)
                if busy is None:
                    return self._denied_result(request, exc)
                return self._busy_result(request, busy, slot)
            self._settle(slot, call, held)
            return result


def _label(ctx: AuthContext | None) -> str | None:
    return ctx.label if ctx is not None else None


def _error_message(request: ToolCallRequest, text: str) -> ToolMessage:
    """The `ToolMessage(status="error")` the model reads instead of the tool's result."""
    return ToolMessage(
        content=text,
        name=request.tool_call["name"],
        tool_call_id=request.tool_call["id"],
        status="error",
    )
