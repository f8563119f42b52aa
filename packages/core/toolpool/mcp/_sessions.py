"""Initialized MCP sessions pooled per (MCP server, auth context), on a toolpool `Pool`.

A session is the MCP handshake (`initialize`, `notifications/initialized`) and, for a
stateful server, state the server keeps under the `mcp-session-id` it handed out. Opening
one per tool call (what MCP clients of agent frameworks do) costs three or four extra round
trips and, on a stateful server, a long-lived GET event stream per call: the new connection
storm. Here a session is opened once per (server, auth context, event loop), kept while it
is used, and shared by the concurrent calls of that context (MCP multiplexes requests on a
session):

- `tools/list` is answered from the session's cache, dropped when the server sends
  `notifications/tools/list_changed`, and refetched after `tools_ttl` when the session has
  no event stream to hear that notification on;
- a session idle for `idle_ttl`, or older than `max_lifetime` once its calls are done, is
  closed (its server-side state ended with a DELETE); beyond `max_sessions` the least
  recently used idle one is;
- a session that errors (a transport failure after sending, a message the server missed, the
  server ending the session) is discarded, never reused; a call refused by a busy pool leaves
  its session intact;
- sessions of one auth context are never used for another: the key holds the context's
  fingerprint, and every request of a session acts for its own context.

Each session runs in a task owned by this object (the MCP client's task groups must be
entered and left in one task); `aclose()` ends them all. Every failure reaches the caller of
the one call that met it as an exception: the pool's `PoolSaturated` / `PoolTimeout` /
`DestinationUnavailable` for a busy destination (adapters turn them into "busy, retry in N s"),
`McpUnavailable` for the rest (a dead session, a server gone, no answer in time). Nothing
waits without a bound: every call is bounded by `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import anyio
import httpx

from toolpool._auth_context import AuthContext, current_auth
from toolpool._pool import Pool
from toolpool.adapters._busy import BUSY_ERRORS
from toolpool.errors import (
    ConfigError,
    DestinationUnavailable,
    McpUnavailable,
    PoolSaturated,
    PoolTimeout,
)
from toolpool.mcp._transport import FAILURE_KEY, SessionTransport

try:
    from mcp import ClientSession, McpError, types
    from mcp.client.sse import sse_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.message import SessionMessage
except ImportError:  # pragma: no cover - exercised only without the mcp package
    ClientSession = None  # type: ignore[assignment,misc]

__all__ = ["McpServer", "McpSessionStats", "McpSessions", "failure_message", "sessions_of"]

log = logging.getLogger("toolpool.mcp")

monotonic = time.monotonic

_UNSET: Any = object()

# Discard reasons (McpSessionStats.discarded_total).
IDLE = "idle_ttl"
LIFETIME = "lifetime"
ERROR = "error"
EVICTED = "max_sessions"
CLOSED = "closed"

TRANSPORTS = ("streamable_http", "sse")


@dataclass(frozen=True)
class McpServer:
    """An MCP server reached over streamable HTTP (or the legacy HTTP+SSE transport).

    `headers` are sent with every request of its sessions (per-tenant credentials belong in
    the destination's auth provider instead, which gives each context its own); their values
    are never logged nor shown in a repr. `timeout` bounds each operation (opening a session,
    one `tools/list`, one `tools/call`), as MCP clients do by default.
    """

    url: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False, hash=False)
    timeout: float = 30.0
    name: str | None = None
    #: "streamable_http", or "sse" for the legacy HTTP+SSE transport (`url` is then the
    #: server's SSE endpoint; the session's GET stream carries every answer and holds one
    #: connection for the session's life).
    transport: str = "streamable_http"

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"McpServer url must be http(s)://..., got {self.url!r}")
        if self.transport not in TRANSPORTS:
            raise ConfigError(
                f"McpServer transport must be one of {', '.join(TRANSPORTS)}, "
                f"got {self.transport!r}"
            )
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise ConfigError(f"McpServer timeout must be a positive number, got {self.timeout}")

    @property
    def label(self) -> str:
        """The server's name, or its URL without query (for messages and logs)."""
        return self.name or self.url.split("?", 1)[0]

    @property
    def _key(self) -> tuple[str, str, tuple[tuple[str, str], ...]]:
        return self.transport, self.url, tuple(sorted(self.headers.items()))


@dataclass(frozen=True)
class McpSessionStats:
    """Counters of one `McpSessions` (`sessions.stats()`)."""

    #: Sessions open now (initialized, or initializing).
    open: int
    #: Sessions initialized since the start (the `initialize` handshakes that succeeded).
    initialized_total: int
    #: Sessions closed, by reason: idle_ttl, lifetime, error, max_sessions, closed.
    discarded_total: Mapping[str, int]
    #: `tools/list` requests sent, and `list_tools` calls answered from a session's cache.
    tools_list_fetched_total: int
    tools_list_cached_total: int
    #: `tools/call` requests sent.
    calls_total: int
    #: Sessions holding their GET event stream (a connection each) now.
    streams: int


class _Session:
    """One pooled MCP session and the task that owns it."""

    def __init__(self, owner: McpSessions, server: McpServer, ctx: AuthContext | None) -> None:
        self.owner = owner
        self.server = server
        self.ctx = ctx
        self.created = monotonic()
        self.last_used = self.created
        self.in_flight = 0
        self.ready = asyncio.Event()
        self.stop = asyncio.Event()
        self.done = asyncio.Event()
        self.session: Any = None
        self.error: BaseException | None = None
        self.broken = False
        self.reason = CLOSED
        self.tools: list[Any] | None = None
        self.tools_at = 0.0
        self.tools_lock = asyncio.Lock()
        self.listening = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        # SSE sessions: failed requests are answered into the session's incoming messages.
        self.inject: Any = None
        self.transport = SessionTransport(
            owner.pool,
            ctx,
            on_failure=self._on_failure,
            listen=owner.listen,
            on_listen=self._on_listen,
            answer=self._answer if server.transport == "sse" else None,
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return not (self.broken or self.stop.is_set() or self.done.is_set())

    def _on_failure(self, exc: BaseException, broken: bool) -> None:
        if broken and not self.broken:
            log.debug("MCP session of %s discarded: %s", self.server.label, exc)
            self.broken = True
            self.reason = ERROR

    def _on_listen(self, delta: int) -> None:
        self.listening += delta
        self.owner._streams += delta

    async def _on_message(self, message: Any) -> None:
        root = getattr(message, "root", None)
        if isinstance(root, types.ToolListChangedNotification):
            self.tools = None

    async def _answer(self, msg_id: Any, body: bytes) -> None:
        """Answer request `msg_id` of an SSE session with `body` (a JSON-RPC error)."""
        inject = self.inject
        if inject is None:
            return  # the session is closing: its pending requests are answered by that
        message = SessionMessage(types.JSONRPCMessage.model_validate_json(body))
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            await inject.send(message)

    def _client(
        self,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
        auth: httpx.Auth | None = None,
    ) -> httpx.AsyncClient:
        """The session's HTTP client, on its transport (sse_client asks with its own
        headers and timeouts: the server's are used)."""
        return httpx.AsyncClient(
            transport=self.transport,
            headers=dict(self.server.headers),
            timeout=httpx.Timeout(self.server.timeout, read=300.0, pool=None),
        )

    async def _serve(self, session: Any) -> None:
        await session.initialize()
        if self.broken:
            raise McpUnavailable(self.server.label, "the session's handshake failed")
        self.session = session
        self.owner._initialized += 1
        self.ready.set()
        await self.stop.wait()

    async def _run_sse(self) -> None:
        server = self.server
        async with sse_client(
            server.url,
            timeout=server.timeout,
            sse_read_timeout=300.0,
            httpx_client_factory=self._client,
        ) as (read, write):
            # The session reads the server's messages and the answers given to requests
            # whose POST failed; when the server's stream ends, so does what it reads (its
            # pending requests are then answered "Connection closed").
            inject, incoming = anyio.create_memory_object_stream[Any](16)
            self.inject = inject

            async def forward() -> None:
                try:
                    async with read:
                        async for item in read:
                            await inject.send(item)
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    pass
                finally:
                    self.inject = None
                    await inject.aclose()

            async with anyio.create_task_group() as tg:
                tg.start_soon(forward)
                try:
                    async with ClientSession(
                        incoming, write, message_handler=self._on_message
                    ) as session:
                        await self._serve(session)
                finally:
                    tg.cancel_scope.cancel()

    async def run(self) -> None:
        """The owner task: open, initialize, serve until told to stop, then end the session."""
        server = self.server
        try:
            if server.transport == "sse":
                await self._run_sse()
            else:
                async with (
                    self._client() as client,
                    streamable_http_client(server.url, http_client=client) as (read, write, _),
                    ClientSession(read, write, message_handler=self._on_message) as session,
                ):
                    await self._serve(session)
        except Exception as exc:
            self.error = self.error or exc
            self.broken = True
            if self.reason == CLOSED:
                self.reason = ERROR
        finally:
            self.session = None
            self.ready.set()
            self.done.set()
            self.owner._forget(self)


def _failure_of(session: _Session, exc: BaseException) -> BaseException | None:
    """The pool failure a synthesized MCP error stands for (see _transport), if any."""
    error = getattr(exc, "error", None)
    data = getattr(error, "data", None)
    if isinstance(data, dict) and isinstance(data.get(FAILURE_KEY), int):
        return session.transport.take(data[FAILURE_KEY])
    return None


class McpSessions:
    """Pooled, initialized MCP sessions on `pool`, one per (server, auth context, event loop).

    ```python
    sessions = toolpool.mcp.sessions_of(pool)            # one per pool, shared by adapters
    crm = toolpool.mcp.McpServer("http://127.0.0.1:8000/mcp")
    with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
        tools = await sessions.list_tools(crm)             # cached per session
        result = await sessions.call_tool(crm, "lookup", {"id": 7})
    ```

    `idle_ttl` (300 s: MCP servers keep session state, so a session outlives a connection's
    45 s), `max_lifetime` (1 h, like a token's life: bounds stale server state),
    `max_sessions` (256 across servers and contexts), `tools_ttl` (60 s: how long a cached
    tool list is trusted by a session that cannot hear `tools/list_changed`), `listen` (True:
    a stateful session opens its GET event stream, for server notifications, only while its
    destination has room and long-lived streams hold less than half its connections).
    """

    def __init__(
        self,
        pool: Pool,
        *,
        idle_ttl: float = 300.0,
        max_lifetime: float = 3600.0,
        max_sessions: int = 256,
        tools_ttl: float = 60.0,
        listen: bool = True,
    ) -> None:
        if ClientSession is None:  # pragma: no cover
            raise ConfigError('toolpool.mcp needs the mcp package: pip install "toolpool[mcp]"')
        for name, value in (
            ("idle_ttl", idle_ttl),
            ("max_lifetime", max_lifetime),
            ("tools_ttl", tools_ttl),
        ):
            if not value > 0:
                raise ConfigError(f"{name} must be > 0, got {value!r}")
        if max_sessions < 1:
            raise ConfigError(f"max_sessions must be >= 1, got {max_sessions!r}")
        self.pool = pool
        self.idle_ttl = idle_ttl
        self.max_lifetime = max_lifetime
        self.max_sessions = max_sessions
        self.tools_ttl = tools_ttl
        self.listen = listen
        self._sessions: OrderedDict[tuple[Any, ...], _Session] = OrderedDict()
        # The last tool list of each (server, auth context), for a server gone later.
        self._known_tools: dict[tuple[Any, ...], list[Any]] = {}
        self._initialized = 0
        self._discarded: Counter[str] = Counter()
        self._fetched = 0
        self._cached = 0
        self._calls = 0
        self._streams = 0
        self._closed = False
        # The sessions end with their pool: before it closes when it closes in an event loop
        # (`await pool.aclose()`: DELETEs still go out), at once when closed from sync code
        # (their DELETEs are then not sent: the pool is closed). Weakly: the pool does not
        # keep these sessions alive.
        ref = weakref.ref(self)
        pool._aclose_hooks.append(_hook(ref))
        pool._close_callbacks.append(_callback(ref))

    def __repr__(self) -> str:
        return f"<toolpool.mcp.McpSessions {len(self._sessions)} open on {self.pool!r}>"

    # ------------------------------------------------------------------ public API

    async def call_tool(
        self,
        server: McpServer,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        ctx: AuthContext | None = _UNSET,
        timeout: float | None = None,
    ) -> Any:
        """Call tool `name` on `server` for `ctx` (default: the current auth context) on its
        pooled session; returns the `mcp.types.CallToolResult` (a tool's own error is a
        result with `isError`). Raises the pool's busy errors or `McpUnavailable`."""
        limit = timeout if timeout is not None else server.timeout
        deadline = monotonic() + limit
        session = await self._acquire(server, ctx, deadline)
        try:
            if session.tools is None:
                # The MCP client checks results against the tools' output schemas and lists
                # the tools itself before every call whose schema it does not know: one
                # tools/list per session (or per list_changed) here spares that.
                await self._tools(session, deadline, refresh=False)
            self._calls += 1
            return await self._request(
                session,
                lambda s: s.call_tool(
                    name,
                    dict(arguments or {}),
                    read_timeout_seconds=timedelta(seconds=max(0.001, deadline - monotonic())),
                ),
                deadline,
            )
        finally:
            self._release(session)

    async def list_tools(
        self, server: McpServer, *, ctx: AuthContext | None = _UNSET, refresh: bool = False
    ) -> list[Any]:
        """`server`'s tools (`mcp.types.Tool`) for `ctx`, from its session's cache when the
        cache is fresh (see the class docstring)."""
        if ctx is _UNSET:
            ctx = current_auth()
        known = (server._key, ctx._fingerprint if ctx is not None else "")
        deadline = monotonic() + server.timeout
        try:
            session = await self._acquire(server, ctx, deadline)
            try:
                tools = list(await self._tools(session, deadline, refresh=refresh))
            finally:
                self._release(session)
        except (McpUnavailable, PoolSaturated, PoolTimeout, DestinationUnavailable) as exc:
            # A server gone (or busy) when a run starts: the run still gets the tools it had
            # (each call then answers "unavailable" or "busy" on its own), not an exception.
            last = self._known_tools.get(known)
            if last is None:
                raise
            log.info("listing the tools of %s failed (%s); using the last list", server.label, exc)
            return list(last)
        self._known_tools[known] = tools
        return tools

    async def _tools(self, session: _Session, deadline: float, *, refresh: bool) -> list[Any]:
        """The session's tool list: cached, or fetched once for all concurrent askers."""
        async with session.tools_lock:
            fresh = session.listening or monotonic() - session.tools_at < self.tools_ttl
            if session.tools is not None and fresh and not refresh:
                self._cached += 1
                return session.tools
            tools: list[Any] = []
            cursor: str | None = None
            while True:
                self._fetched += 1
                page = await self._request(session, _list_page(cursor), deadline)
                tools.extend(page.tools)
                cursor = page.nextCursor
                if not cursor:
                    break
            session.tools, session.tools_at = tools, monotonic()
            return tools

    def stats(self) -> McpSessionStats:
        """Sessions open, initialized, discarded; tools/list fetches and cache hits."""
        return McpSessionStats(
            open=len(self._sessions),
            initialized_total=self._initialized,
            discarded_total=dict(self._discarded),
            tools_list_fetched_total=self._fetched,
            tools_list_cached_total=self._cached,
            calls_total=self._calls,
            streams=self._streams,
        )

    def contexts(self, server: McpServer | None = None) -> list[AuthContext | None]:
        """The auth contexts with an open session (to `server`), least recently used first."""
        return [
            s.ctx for s in self._sessions.values() if server is None or s.server._key == server._key
        ]

    async def aclose(self) -> None:
        """End every session (DELETE on stateful servers) and wait for their tasks, in the
        event loop that calls it; sessions of other loops are told to stop."""
        self._closed = True
        sessions = list(self._sessions.values())
        for session in sessions:
            self._stop(session, CLOSED)
        loop = asyncio.get_running_loop()
        mine = [s.task for s in sessions if s.task is not None and s.task.get_loop() is loop]
        if mine:
            await asyncio.wait(mine, timeout=10.0)
            for task in mine:
                if not task.done():
                    task.cancel()

    def _pool_closed(self) -> None:
        """The pool closes (from any thread): stop every session, on its own loop."""
        self._closed = True
        for session in list(self._sessions.values()):
            loop = _loop_of(session)
            if loop is None or loop.is_closed():
                continue
            try:
                loop.call_soon_threadsafe(self._stop, session, CLOSED)
            except RuntimeError:  # the loop closed meanwhile
                continue

    # ------------------------------------------------------------------ internals

    def _key(self, server: McpServer, ctx: AuthContext | None, loop: Any) -> tuple[Any, ...]:
        return (server._key, ctx._fingerprint if ctx is not None else "", loop)

    async def _acquire(self, server: McpServer, ctx: Any, deadline: float) -> _Session:
        if self._closed:
            raise McpUnavailable(server.label, "the MCP sessions were closed")
        if ctx is _UNSET:
            ctx = current_auth()
        loop = asyncio.get_running_loop()
        self._expire()
        key = self._key(server, ctx, loop)
        session = self._sessions.get(key)
        if session is not None and (
            not session.usable or monotonic() - session.created >= self.max_lifetime
        ):
            self._unlist(session, LIFETIME if session.usable else ERROR)
            session = None
        if session is None:
            session = _Session(self, server, ctx)
            self._sessions[key] = session
            # The owner task starts from an empty context: it belongs to no tool call (its
            # requests act for `ctx` through its transport), and outlives the first one.
            session.task = loop.create_task(session.run(), context=contextvars.Context())
            self._evict()
        self._sessions.move_to_end(key)
        session.in_flight += 1
        session.last_used = monotonic()
        if session.idle_timer is not None:
            session.idle_timer.cancel()
            session.idle_timer = None
        try:
            if not session.ready.is_set():
                async with asyncio.timeout(max(0.0, deadline - monotonic())):
                    await session.ready.wait()
        except TimeoutError:
            self._release(session)
            self._stop(session, ERROR)
            raise McpUnavailable(
                server.label, f"no MCP session within {server.timeout:g} s"
            ) from None
        except BaseException:
            self._release(session)
            raise
        if session.session is None:
            self._release(session)
            raise self._unavailable(session, session.error)
        return session

    def _unavailable(self, session: _Session, exc: BaseException | None) -> BaseException:
        """What the caller gets for a failed session: the busy error behind it, if any."""
        if exc is not None:
            busy = _busy_in(exc)
            if busy is not None:
                return busy
            failure = _failure_of(session, exc)
            if failure is not None:
                return failure if isinstance(failure, BUSY_ERRORS) else _wrap(session, failure)
            if isinstance(exc, McpUnavailable):
                return exc
        return _wrap(session, exc)

    async def _request(self, session: _Session, send: Any, deadline: float) -> Any:
        client = session.session
        try:
            async with asyncio.timeout(max(0.0, deadline - monotonic())):
                return await send(client)
        except TimeoutError:
            self._stop(session, ERROR)
            raise McpUnavailable(
                session.server.label, f"no answer within {session.server.timeout:g} s"
            ) from None
        except McpError as exc:
            failure = _failure_of(session, exc)
            if failure is not None:
                if isinstance(failure, BUSY_ERRORS):
                    raise failure from None
                self._stop(session, ERROR)
                raise _wrap(session, failure) from None
            if exc.error.code in (httpx.codes.REQUEST_TIMEOUT, -32000):
                # A read timeout or "Connection closed": the session is not trustworthy.
                self._stop(session, ERROR)
                raise McpUnavailable(session.server.label, exc.error.message) from None
            raise  # a JSON-RPC error the server answered: the caller's to handle
        except Exception as exc:
            self._stop(session, ERROR)
            raise self._unavailable(session, exc) from exc

    def _release(self, session: _Session) -> None:
        session.in_flight -= 1
        session.last_used = monotonic()
        if session.in_flight:
            return
        if not session.usable:
            self._stop(session, session.reason if session.broken else CLOSED)
        elif monotonic() - session.created >= self.max_lifetime:
            self._stop(session, LIFETIME)
        else:
            loop = asyncio.get_running_loop()
            session.idle_timer = loop.call_later(self.idle_ttl, self._idle_check, session)

    def _idle_check(self, session: _Session) -> None:
        session.idle_timer = None
        if session.in_flight == 0 and monotonic() - session.last_used >= self.idle_ttl * 0.99:
            self._stop(session, IDLE)

    def _expire(self) -> None:
        """Stop idle sessions past their TTL and dead ones (O(sessions); sessions are few)."""
        now = monotonic()
        for session in list(self._sessions.values()):
            if session.task is not None and session.task.get_loop().is_closed():
                self._unlist(session, CLOSED)
            elif session.in_flight == 0 and (
                now - session.last_used >= self.idle_ttl
                or now - session.created >= self.max_lifetime
            ):
                self._stop(session, IDLE if now - session.last_used >= self.idle_ttl else LIFETIME)

    def _evict(self) -> None:
        while len(self._sessions) > self.max_sessions:
            victim = next((s for s in self._sessions.values() if s.in_flight == 0), None)
            if victim is None:
                return  # every session is in use: the bound is exceeded until one is done
            self._stop(victim, EVICTED)

    def _stop(self, session: _Session, reason: str) -> None:
        """Take the session out of use; its owner task ends it."""
        self._unlist(session, reason)
        if session.idle_timer is not None:
            session.idle_timer.cancel()
            session.idle_timer = None
        if session.in_flight == 0 and not session.stop.is_set():
            session.stop.set()

    def _unlist(self, session: _Session, reason: str) -> None:
        key = self._key(session.server, session.ctx, _loop_of(session))
        if self._sessions.get(key) is session:
            del self._sessions[key]
            self._discarded[reason] += 1
            if reason != CLOSED or not session.broken:
                session.reason = reason
        if session.in_flight == 0 and not session.stop.is_set():
            session.stop.set()

    def _forget(self, session: _Session) -> None:
        """The owner task ended (stopped, or failed): the session is gone."""
        self._unlist(session, session.reason)


def _loop_of(session: _Session) -> Any:
    return session.task.get_loop() if session.task is not None else None


def _list_page(cursor: str | None) -> Any:
    async def send(client: Any) -> Any:
        if cursor is None:
            return await client.list_tools()
        return await client.list_tools(params=types.PaginatedRequestParams(cursor=cursor))

    return send


def _busy_in(exc: BaseException) -> BaseException | None:
    from toolpool.adapters._busy import find_busy

    return find_busy(exc)


def _wrap(session: _Session, exc: BaseException | None) -> McpUnavailable:
    # An MCP client's task group reports its failure as a group: name the failure itself.
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    detail = f"{type(exc).__name__}: {exc}" if exc is not None else "the session ended"
    return McpUnavailable(session.server.label, detail)


def _hook(ref: weakref.ref[McpSessions]) -> Any:
    async def hook() -> None:
        sessions = ref()
        if sessions is not None and not sessions._closed:
            await sessions.aclose()

    return hook


def _callback(ref: weakref.ref[McpSessions]) -> Any:
    def callback() -> None:
        sessions = ref()
        if sessions is not None:
            sessions._pool_closed()

    return callback


_by_pool: weakref.WeakKeyDictionary[Pool, McpSessions] = weakref.WeakKeyDictionary()


def sessions_of(pool: Pool) -> McpSessions:
    """The `McpSessions` of `pool` with default settings, created on first use and shared by
    everything that asks (the three adapters do), so a tenant's session to a server is
    reused across frameworks, agents and runs."""
    sessions = _by_pool.get(pool)
    if sessions is None:
        sessions = _by_pool[pool] = McpSessions(pool)
    return sessions


def failure_message(exc: BaseException, tool_name: str) -> str | None:
    """What a model reads when MCP tool `tool_name` failed with `exc`: "busy, retry in N s"
    for a busy pool, "unavailable" for a failed session or server, the server's own error
    for a JSON-RPC error it answered; None for anything else (a bug: let it surface)."""
    from toolpool.adapters._busy import busy_message, find_busy

    busy = find_busy(exc)
    if busy is not None:
        return busy_message(busy, tool_name)
    if isinstance(exc, McpUnavailable):
        return f"tool {tool_name!r} could not run: {exc}"
    if ClientSession is not None and isinstance(exc, McpError):
        return f"tool {tool_name!r} failed: {exc.error.message}"
    return None
