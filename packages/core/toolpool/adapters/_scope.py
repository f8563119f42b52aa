"""One tool call as a scope: its auth context, its name, and transparent pooling of the httpx
clients that the tool body creates itself.

Theory of operation: `tool_call_scope` sets two context variables (the auth context and the
current `ToolCall`) for the duration of the tool body. A one-time, idempotent patch of
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
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from toolpool import _auth_context
from toolpool._auth_context import AuthContext
from toolpool._transport import AsyncTransport, Transport
from toolpool.adapters._busy import BUSY_ERRORS

if TYPE_CHECKING:
    from toolpool._pool import Pool
    from toolpool.adapters._admission import Admission

__all__ = [
    "ToolCall",
    "atool_call_scope",
    "current_tool_call",
    "run_in_thread_with_context",
    "tool_call_scope",
]

log = logging.getLogger("toolpool.adapters")

T = TypeVar("T")

_current_call: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar(
    "toolpool_tool_call", default=None
)


class ToolCall:
    """One tool call in progress: what it acts for and what it touched.

    `destinations` collects the names of the destinations its pooled traffic went to;
    `busy` is the last busy error (`BUSY_ERRORS`) its traffic met, even if the tool caught it.
    """

    __slots__ = ("admission", "busy", "ctx", "destinations", "pool", "pool_httpx", "tool_name")

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


def current_tool_call() -> ToolCall | None:
    """The tool call the running code belongs to, or None outside any tool-call scope."""
    return _current_call.get()


# ---------------------------------------------------------------------- transports


class _ScopedAsyncTransport(AsyncTransport):
    """The pool's async transport, reporting destinations and busy errors to the tool call."""

    def __init__(self, pool: Pool, call: ToolCall) -> None:
        super().__init__(pool)
        self._call = call

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        dest = self.pool._route(request.url)
        call = _current_call.get() or self._call
        call.used(dest.name)
        # A thread started without copying the context loses the auth context; the client
        # was made for this call's identity, so it keeps acting for it.
        ctx = _auth_context._current.get() or self._call.ctx
        try:
            return await dest.async_send(request, ctx)
        except BUSY_ERRORS as exc:
            call.met_busy(exc)
            raise


class _ScopedTransport(Transport):
    """The pool's sync transport, reporting destinations and busy errors to the tool call."""

    def __init__(self, pool: Pool, call: ToolCall) -> None:
        super().__init__(pool)
        self._call = call

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        dest = self.pool._route(request.url)
        call = _current_call.get() or self._call
        call.used(dest.name)
        ctx = _auth_context._current.get() or self._call.ctx
        try:
            return dest.sync_send(request, ctx)
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
