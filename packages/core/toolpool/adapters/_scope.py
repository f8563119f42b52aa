"""One tool call as a scope: its auth context, its name, and transparent pooling of the httpx
clients that the tool body creates itself.

Theory of operation: `tool_call_scope` sets two context variables (the auth context and the
current `ToolCall`) for the duration of the tool body. With an `Admission`, a request to a
destination the call was not admitted to up front (a cold tool, a URL from the arguments)
first waits at that destination's admission gate, within the call's `max_wait`, and the call
stays admitted there until it ends: its requests then never meet a full queue, so the tool
call waits instead of failing while waiting could serve it. A destination behind a pool
service's overflow tier (whose capacity the local gate does not see) is not gated here;
a saturated answer from the service is waited out (its retry-after, within `max_wait`) and
the request sent again when its body can be. A one-time, idempotent patch of
`httpx.Client.__init__` and `httpx.AsyncClient.__init__` reads the second: a client built
inside a scope with no transport of its own (the naive `httpx.AsyncClient()` that opens one
connection per call) gets a toolpool transport on the scope's pool instead. Outside a scope the
patch does nothing but one context-variable read. Because context variables follow asyncio
tasks and are copied into worker threads by the frameworks (and by
`run_in_thread_with_context`), the patch reaches tool bodies wherever they run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from toolpool import _auth_context
from toolpool._auth_context import AuthContext
from toolpool._transport import AsyncTransport, Transport
from toolpool.adapters._busy import BUSY_ERRORS
from toolpool.errors import PoolSaturated

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool._pool import Pool
    from toolpool.adapters._admission import Admission
    from toolpool.resilience import PolicyRuntime

__all__ = [
    "ToolCall",
    "atool_call_scope",
    "current_tool_call",
    "run_in_thread_with_context",
    "tool_call_scope",
]

log = logging.getLogger("toolpool.adapters")

monotonic = time.monotonic

T = TypeVar("T")

_current_call: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar(
    "toolpool_tool_call", default=None
)


class ToolCall:
    """One tool call in progress: what it acts for and what it touched.

    `destinations` collects the names of the destinations its pooled traffic went to;
    `busy` is the last busy error (`BUSY_ERRORS`) its traffic met, even if the tool caught it;
    `waited` is True once it had to wait at a saturated destination's gate.
    """

    __slots__ = (
        "_gates",
        "_lock",
        "admission",
        "busy",
        "ctx",
        "destinations",
        "pool",
        "pool_httpx",
        "started",
        "tool_name",
        "waited",
    )

    def __init__(
        self,
        pool: Pool,
        ctx: AuthContext | None,
        tool_name: str,
        pool_httpx: bool,
        admission: Admission | None,
    ) -> None:
        self.pool = pool
        self.ctx = ctx
        self.tool_name = tool_name
        self.pool_httpx = pool_httpx
        self.admission = admission
        self.destinations: set[str] = set()
        self.busy: BaseException | None = None
        self.waited = False
        self.started = monotonic()
        # Gates this call passed on first use of a destination (released when it ends).
        self._gates: dict[int, PolicyRuntime] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        who = self.ctx.label if self.ctx is not None else None
        return f"<ToolCall {self.tool_name!r} for {who!r} destinations={sorted(self.destinations)}>"

    def used(self, destination: str) -> None:
        """The call's traffic goes to `destination` (teaches the admission, if any)."""
        if destination not in self.destinations:
            self.destinations.add(destination)
            if self.admission is not None:
                self.admission.learn(self.tool_name, destination)

    def met_busy(self, exc: BaseException) -> None:
        """The call's traffic met a busy destination."""
        self.busy = exc
        where = getattr(exc, "destination", None)
        if isinstance(where, str):
            self.used(where)

    def note_wait(self) -> None:
        """The call had to queue at a saturated destination."""
        self.waited = True

    # ------------------------------------------------------------------ the gate

    def _remaining(self) -> float:
        assert self.admission is not None
        return self.admission.remaining(self.started)

    def _gate_of(self, dest: DestinationPool) -> PolicyRuntime | None:
        """The gate to pass before sending to `dest`, or None (no admission, an overflow
        tier's destination, or passed already: up front, or earlier in this call)."""
        if self.admission is None:
            return None
        if self.pool.overflow is not None and dest.settings.listed:
            return None  # the service's capacity is not the local gate's
        from toolpool.resilience._admission_control import admitted_here

        runtime = self.pool.policy_runtime(dest)
        if admitted_here(runtime):
            return None
        return runtime

    def _keep(self, runtime: PolicyRuntime) -> None:
        with self._lock:
            twice = id(runtime) in self._gates
            if not twice:
                self._gates[id(runtime)] = runtime
        if twice:  # two tasks of this call were admitted at once: one place is enough
            runtime.release_admission()

    def _label(self) -> str | None:
        return self.ctx.label if self.ctx is not None else None

    async def send_async(
        self, dest: DestinationPool, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """Send one of the call's requests, passing `dest`'s gate on first use."""
        from toolpool.resilience._admission_control import mark_admitted, unmark_admitted

        runtime = self._gate_of(dest)
        if runtime is None:
            return await self._send_waiting_async(dest, request, ctx)
        if id(runtime) not in self._gates:
            await runtime.admit_async(self._remaining(), self._label(), self.note_wait, strict=True)
            self._keep(runtime)
        mark = mark_admitted(runtime)
        try:
            return await self._send_waiting_async(dest, request, ctx)
        finally:
            unmark_admitted(mark)

    def send_sync(
        self, dest: DestinationPool, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """`send_async` for sync clients (blocks the thread while waiting)."""
        from toolpool.resilience._admission_control import mark_admitted, unmark_admitted

        runtime = self._gate_of(dest)
        if runtime is None:
            return self._send_waiting_sync(dest, request, ctx)
        if id(runtime) not in self._gates:
            runtime.admit_blocking(self._remaining(), self._label(), self.note_wait, strict=True)
            self._keep(runtime)
        mark = mark_admitted(runtime)
        try:
            return self._send_waiting_sync(dest, request, ctx)
        finally:
            unmark_admitted(mark)

    def _wait_for(self, exc: PoolSaturated, request: httpx.Request) -> float | None:
        """Seconds to wait before sending again after a full queue (a pool service's, the
        only one an admitted call can still meet), or None: give up with the error."""
        if (
            self.admission is None
            or exc.reason != "queue_full"
            or not isinstance(request.stream, httpx.ByteStream)
        ):
            return None
        remaining = self._remaining()
        if remaining <= 0:
            return None
        self.waited = True
        return min(remaining, max(0.05, exc.retry_after))

    async def _send_waiting_async(
        self, dest: DestinationPool, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        while True:
            try:
                return await dest.async_send(request, ctx)
            except PoolSaturated as exc:
                pause = self._wait_for(exc, request)
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    def _send_waiting_sync(
        self, dest: DestinationPool, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        while True:
            try:
                return dest.sync_send(request, ctx)
            except PoolSaturated as exc:
                pause = self._wait_for(exc, request)
                if pause is None:
                    raise
            time.sleep(pause)

    def end(self) -> None:
        """The call is over: leave the gates it passed, and settle what it learned."""
        with self._lock:
            gates = list(self._gates.values())
            self._gates.clear()
        for runtime in gates:
            runtime.release_admission()
        if self.admission is not None:
            self.admission.settle(self.tool_name, self.destinations)


def current_tool_call() -> ToolCall | None:
    """The tool call the running code belongs to, or None outside any tool-call scope."""
    return _current_call.get()


# ---------------------------------------------------------------------- transports


class _ScopedAsyncTransport(AsyncTransport):
    """The pool's async transport, reporting destinations and busy errors to the tool call."""

    def __init__(self, pool: Pool, call: ToolCall) -> None:
        super().__init__(pool)
        self._tool_pool = pool
        self._call = call
        self._mcp: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if _is_mcp(request):
            # An MCP client's session (built inside the tool call, not over
            # toolpool.langchain.mcp_client_factory): a failure must answer its request, not
            # vanish in the client's own tasks and leave the call waiting (see mcp._transport).
            if self._mcp is None:
                from toolpool.mcp._transport import CURRENT, SessionTransport

                self._mcp = SessionTransport(self._tool_pool, CURRENT, inner=_Direct(self))
            return await self._mcp.handle_async_request(request)
        return await self._send(request)

    async def _send(self, request: httpx.Request) -> httpx.Response:
        dest = self.pool.route(request.url)
        call = _current_call.get() or self._call
        call.used(dest.name)
        # A thread started without copying the context loses the auth context; the client
        # was made for this call's identity, so it keeps acting for it.
        ctx = _auth_context._current.get() or self._call.ctx
        try:
            return await call.send_async(dest, request, ctx)
        except BUSY_ERRORS as exc:
            call.met_busy(exc)
            raise


class _Direct(httpx.AsyncBaseTransport):
    """A scoped transport's own sending, under the MCP session transport."""

    def __init__(self, scoped: _ScopedAsyncTransport) -> None:
        self._scoped = scoped

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._scoped._send(request)


def _is_mcp(request: httpx.Request) -> bool:
    """Whether `request` is an MCP streamable HTTP client's: its POSTs are JSON-RPC and
    accept both JSON and an event stream (the specification requires it), its GET stream and
    DELETE carry the session's `mcp-session-id`."""
    headers = request.headers
    if request.method == "POST":
        accept = headers.get("accept", "")
        if not ("text/event-stream" in accept and "application/json" in accept):
            return False
        try:
            return b'"jsonrpc"' in request.content
        except httpx.RequestNotRead:
            return False
    return "mcp-session-id" in headers


class _ScopedTransport(Transport):
    """The pool's sync transport, reporting destinations and busy errors to the tool call."""

    def __init__(self, pool: Pool, call: ToolCall) -> None:
        super().__init__(pool)
        self._call = call

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        dest = self.pool.route(request.url)
        call = _current_call.get() or self._call
        call.used(dest.name)
        ctx = _auth_context._current.get() or self._call.ctx
        try:
            return call.send_sync(dest, request, ctx)
        except BUSY_ERRORS as exc:
            call.met_busy(exc)
            raise


# ---------------------------------------------------------------------- the httpx patch

_patch_lock = threading.Lock()
_patched = False


def _env_proxies() -> bool:
    proxies = urllib.request.getproxies()
    return any(scheme != "no" and value for scheme, value in proxies.items())


def _poolable(kwargs: dict[str, Any]) -> bool:
    """Whether a client built with `kwargs` may get the pool's transport.

    Clients that choose their own connection behaviour keep it: a transport, mounts or a
    proxy of their own, TLS settings of their own (`verify=` other than the default, a
    client `cert=`: the pool's destination decides TLS, and silently changing what a tool
    trusts or presents is worse than not pooling it), or proxies from the environment.
    """
    if kwargs.get("transport") is not None or kwargs.get("mounts") or kwargs.get("proxy"):
        return False
    if kwargs.get("cert") is not None or kwargs.get("verify", True) is not True:
        return False
    return not (kwargs.get("trust_env", True) and _env_proxies())


def _patch_init(cls: type[Any], transport_cls: type[Any]) -> None:
    original = cls.__init__
    if getattr(original, "_toolpool_original", None) is not None:
        return  # already patched (idempotent)

    @functools.wraps(original)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        call = _current_call.get()
        if call is not None and call.pool_httpx and not args:
            if _poolable(kwargs):
                kwargs["transport"] = transport_cls(call.pool, call)
            else:
                log.debug(
                    "tool %r built an %s with its own transport, TLS or proxy settings; "
                    "it is not pooled",
                    call.tool_name,
                    cls.__name__,
                )
        original(self, *args, **kwargs)

    __init__._toolpool_original = original  # type: ignore[attr-defined]
    cls.__init__ = __init__


def install_httpx_patch() -> None:
    """Patch `httpx.Client` / `httpx.AsyncClient` construction once (idempotent).

    The patch only acts inside a `tool_call_scope(..., pool_httpx=True)`.
    """
    global _patched
    if _patched:
        return
    with _patch_lock:
        if not _patched:
            _patch_init(httpx.Client, _ScopedTransport)
            _patch_init(httpx.AsyncClient, _ScopedAsyncTransport)
            _patched = True


def _install_requests_patch() -> None:
    """Pool `requests` sessions built inside scopes too, when `requests` is installed
    (every adapter's tools may use it, not only CrewAI's)."""
    global _requests_checked
    if _requests_checked:
        return
    _requests_checked = True
    try:
        from toolpool.adapters._requests import install_requests_patch
    except ImportError:  # requests is not installed: nothing to pool
        return
    install_requests_patch()


_requests_checked = False


# ---------------------------------------------------------------------- scopes


@contextlib.contextmanager
def tool_call_scope(
    pool: Pool,
    ctx: AuthContext | None,
    *,
    tool_name: str,
    pool_httpx: bool = True,
    admission: Admission | None = None,
) -> Iterator[ToolCall]:
    """Run the enclosed tool body as one tool call acting for `ctx`.

    Inside, `toolpool.current_auth()` is `ctx`, and (with `pool_httpx`) every
    `httpx.Client()` / `httpx.AsyncClient()` built without its own transport, mounts, proxy
    or TLS settings sends through `pool`, and so does every `requests.Session` (and
    `requests.get(...)`) when `requests` is installed; closing such a client does not close
    the pool. The
    destinations the body's pooled traffic reaches are recorded on the yielded `ToolCall`
    and taught to `admission`.

    ```python
    with tool_call_scope(pool, toolpool.AuthContext(tenant="acme"), tool_name="lookup"):
        httpx.Client().get("https://crm.internal/contacts")   # pooled, for acme
    ```
    """
    if pool_httpx:
        install_httpx_patch()
        _install_requests_patch()
    call = ToolCall(pool, ctx, tool_name, pool_httpx, admission)
    call_token = _current_call.set(call)
    auth_token = _auth_context._current.set(ctx)
    try:
        yield call
    except BUSY_ERRORS as exc:
        call.met_busy(exc)
        raise
    finally:
        _auth_context._current.reset(auth_token)
        _current_call.reset(call_token)
        call.end()


@contextlib.asynccontextmanager
async def atool_call_scope(
    pool: Pool,
    ctx: AuthContext | None,
    *,
    tool_name: str,
    pool_httpx: bool = True,
    admission: Admission | None = None,
) -> AsyncIterator[ToolCall]:
    """`tool_call_scope` as an async context manager, for async tool bodies."""
    with tool_call_scope(
        pool, ctx, tool_name=tool_name, pool_httpx=pool_httpx, admission=admission
    ) as call:
        yield call


async def run_in_thread_with_context(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run the sync `fn(*args, **kwargs)` in a worker thread with the caller's context
    variables (auth context, tool call) copied, and return its result."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def mcp_transport(pool: Pool) -> httpx.AsyncBaseTransport:
    """The transport of an MCP client an adapter builds over `pool`: inside a tool call, the
    call's own transport (it answers MCP failures itself and reports busy errors and
    destinations to the call); outside one, the pooled MCP session transport."""
    call = current_tool_call()
    if call is not None:
        return _ScopedAsyncTransport(pool, call)
    from toolpool.mcp._transport import CURRENT, SessionTransport

    return SessionTransport(pool, CURRENT)
