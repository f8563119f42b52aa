"""The httpx transport under a pooled MCP session: pool failures become MCP answers.

The `mcp` client sends a session's messages from tasks of its own (`post_writer`, the GET
stream), where an exception raised by the pool (a saturated destination, a timeout, a server
gone) is either swallowed and logged ("Error in post_writer", leaving the caller waiting for
an answer that never comes) or kills the session's task group. This transport stands between
that client and the pool and never lets a failure escape that way:

    message                     failure                  what the MCP client sees
    POST of a request (id N)    sending or reading       a JSON-RPC error answering N, whose
                                                         `data` names the failure kept here
    POST of a notification      sending                  202 Accepted; the session is marked
                                                         broken (the server missed a message)
    GET (server event stream)   no room now              waits, outside the queue, for room
                                failing                  405: the session runs without it
    DELETE (end of session)     sending                  204: nothing left to end

so every request of the session is answered, and `toolpool.mcp` raises the kept failure (a
`PoolSaturated` with its retry-after, say) to the one caller whose call met it.

Every message acts for the session's auth context, set here explicitly for each request, so a
session's traffic never depends on which task happens to send it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from toolpool import _auth_context
from toolpool._auth_context import AuthContext
from toolpool._pool import Pool
from toolpool._transport import AsyncTransport
from toolpool.adapters._busy import BUSY_ERRORS
from toolpool.errors import PoolSaturated, PoolTimeout

__all__ = ["CURRENT", "FAILURE_KEY", "SessionTransport", "may_listen"]

log = logging.getLogger("toolpool.mcp")

# The key, in a synthesized JSON-RPC error's `data`, of the failure's number.
FAILURE_KEY = "toolpool_failure"
# A JSON-RPC error code in the implementation-defined server-error range.
_TRANSPORT_FAILED = -32042

_numbers = itertools.count(1)

#: `SessionTransport(ctx=CURRENT)`: act for the auth context current at each request.
CURRENT: Any = object()

# A GET event stream without room looks again after 50 ms, then twice as long each time, up to
# a second: soon when room is only being made (an idle connection closing), cheaply when the
# destination stays busy.
_LISTEN_FIRST_PAUSE = 0.05
_LISTEN_MAX_PAUSE = 1.0


def _ignore_failure(exc: BaseException, broken: bool) -> None:
    pass


def _ignore_listen(delta: int) -> None:
    pass


def may_listen(pool: Pool, url: httpx.URL) -> bool:
    """Whether an MCP GET event stream may take a connection of `url`'s destination now:
    only while the destination is under its cap, no request waits for a connection, and
    long-lived streams hold less than half of it, so that streams never starve the requests
    of the sessions that hold them."""
    try:
        dest = pool.route(url)
    except Exception:
        return False
    state = dest.state
    return (
        state.streams < state.cap // 2
        and state.in_use + state.opening < state.cap
        and state.waiting == 0
    )


def _message_of(request: httpx.Request) -> tuple[Any, str | None]:
    """(JSON-RPC id or None, method) of a POSTed MCP message."""
    try:
        body = json.loads(request.content)
    except (ValueError, httpx.RequestNotRead):
        return None, None
    if not isinstance(body, dict):
        return None, None
    return body.get("id"), body.get("method")


class SessionTransport(httpx.AsyncBaseTransport):
    """An MCP client's transport on `pool` (see the module docstring).

    `inner` sends the requests (the pool's transport by default). `ctx`: the auth context
    every request acts for (the session's), or `CURRENT` for the context current when the
    MCP client sends (a per-call client built inside a tool call). `on_failure(exc, broken)`
    is told of every failure; `broken` means the session can no longer be trusted (the
    server may have missed a message, or is gone). The GET event stream is opened only if
    `listen` and `may_listen(pool, url)` allow it now; `on_listen(+1 / -1)` counts it.
    """

    def __init__(
        self,
        pool: Pool,
        ctx: AuthContext | object | None = CURRENT,
        *,
        inner: httpx.AsyncBaseTransport | None = None,
        on_failure: Callable[[BaseException, bool], None] | None = None,
        listen: bool = True,
        on_listen: Callable[[int], None] | None = None,
        answer: Callable[[Any, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self._pool = pool
        self._inner = inner if inner is not None else AsyncTransport(pool)
        self._ctx = ctx
        self._on_failure = on_failure or _ignore_failure
        self._listen_ok = listen
        self._on_listen = on_listen or _ignore_listen
        # Legacy SSE transport: answers arrive on the session's GET stream, and `answer(id,
        # JSON-RPC error body)` hands the session the answer to a request that failed.
        self._answer = answer
        # Failures kept until the caller whose call met them collects them (`take`).
        self._failures: dict[int, BaseException] = {}

    def take(self, number: int) -> BaseException | None:
        """The failure a synthesized error named, once."""
        return self._failures.pop(number, None)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        method = request.method
        if method == "GET":
            if self._answer is not None:
                return await self._stream(request)
            return await self._listen(request)
        if method == "DELETE" and self._pool.closed:
            # The end of a session whose pool closed: nothing may be sent any more, and
            # nothing is left to end on this side.
            return httpx.Response(204, request=request)
        msg_id, rpc_method = _message_of(request) if method == "POST" else (None, None)
        token = self._enter()
        try:
            response = await self._inner.handle_async_request(request)
            if self._answer is not None and method == "POST":
                return await self._accepted(request, response, msg_id)
            if method == "POST" and msg_id is not None:
                return await self._read(request, response, msg_id)
            return response
        except Exception as exc:
            if self._answer is not None and method == "POST":
                return await self._sse_failed(request, exc, msg_id, broken=True)
            return self._failed(request, exc, msg_id, rpc_method)
        finally:
            self._leave(token)

    async def _accepted(
        self, request: httpx.Request, response: httpx.Response, msg_id: Any
    ) -> httpx.Response:
        """An SSE session's POST: accepted (its answer comes on the stream), or failed."""
        try:
            await response.aread()
        except Exception as exc:
            await response.aclose()
            return await self._sse_failed(request, exc, msg_id, broken=True)
        if response.status_code >= 400:
            status = httpx.HTTPStatusError(
                f"HTTP {response.status_code}", request=request, response=response
            )
            return await self._sse_failed(request, status, msg_id, broken=True)
        return response

    async def _sse_failed(
        self, request: httpx.Request, exc: Exception, msg_id: Any, *, broken: bool
    ) -> httpx.Response:
        """A failed POST of an SSE session: the request is answered with a JSON-RPC error
        through `answer` (the MCP client would only log the failure and leave the caller
        waiting); the POST itself reads as accepted."""
        assert self._answer is not None
        broken = broken and not isinstance(exc, BUSY_ERRORS)
        log.debug("MCP POST failed: %s", exc)
        if msg_id is None:
            self._keep(exc, True)
        else:
            await self._answer(msg_id, self.error_body(exc, msg_id, broken))
        return httpx.Response(202, request=request)

    async def _stream(self, request: httpx.Request) -> httpx.Response:
        """An SSE session's GET stream: the session itself (its answers come on it), so it
        is sent like a request; a failure fails the session's opening."""
        token = self._enter()
        try:
            response = await self._inner.handle_async_request(request)
        except Exception as exc:
            self._on_failure(exc, True)
            raise
        finally:
            self._leave(token)
        return self._listening(request, response)

    def _enter(self) -> Any:
        return None if self._ctx is CURRENT else _auth_context._current.set(self._ctx)  # type: ignore[arg-type]

    def _leave(self, token: Any) -> None:
        if token is not None:
            _auth_context._current.reset(token)

    async def _read(
        self, request: httpx.Request, response: httpx.Response, msg_id: Any
    ) -> httpx.Response:
        """A request's answer, made safe to read: a JSON body is read here (failures become
        a JSON-RPC error at once); an event stream is wrapped so that a failure while it is
        read ends it with one."""
        content_type = response.headers.get("content-type", "").lower()
        if content_type.startswith("text/event-stream"):
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_SafeEventStream(self, response, msg_id),
                extensions=response.extensions,
                request=request,
            )
        try:
            await response.aread()
        except Exception as exc:
            await response.aclose()
            return self._failed(request, exc, msg_id, None)
        if response.status_code == 404 and request.headers.get("mcp-session-id"):
            # The server forgot the session (restarted, or expired it): never reuse it.
            self._on_failure(ConnectionError("the MCP server ended the session"), True)
        return response

    def _keep(self, exc: BaseException, broken: bool) -> int:
        number = next(_numbers)
        self._failures[number] = exc
        self._on_failure(exc, broken)
        return number

    def error_body(self, exc: BaseException, msg_id: Any, broken: bool) -> bytes:
        number = self._keep(exc, broken)
        return json.dumps(
            {
                "jsonrpc": "2.0",
                "id": msg_id,
                "error": {
                    "code": _TRANSPORT_FAILED,
                    "message": f"toolpool: {type(exc).__name__}: {exc}",
                    "data": {FAILURE_KEY: number},
                },
            }
        ).encode()

    def _failed(
        self, request: httpx.Request, exc: Exception, msg_id: Any, rpc_method: str | None
    ) -> httpx.Response:
        # A busy pool refused the request before it was sent: the session is intact.
        broken = not isinstance(exc, BUSY_ERRORS)
        log.debug("MCP %s %s failed: %s", request.method, rpc_method or "", exc)
        if request.method == "POST" and msg_id is not None:
            return httpx.Response(
                200,
                headers={"content-type": "application/json"},
                content=self.error_body(exc, msg_id, broken),
                request=request,
            )
        if request.method == "POST":
            # A notification the server did not get (notifications/initialized, say): the
            # session's state on the server is unknown, so it is not used again.
            self._keep(exc, True)
            return httpx.Response(202, request=request)
        return httpx.Response(204, request=request)

    async def _listen(self, request: httpx.Request) -> httpx.Response:
        """The session's GET event stream. It holds a connection for as long as the session
        lives, so it never queues ahead of requests: it is sent only while the destination has
        room for it (`may_listen`), and takes a connection only if one is free or can be
        opened at once. Without room it waits here, outside the queue, looking again after
        50 ms and then at least once a second, until there is room or the session ends
        (which cancels it). Refused at once instead, the MCP client would try again only
        twice, a second apart: a session started at a busy moment (the cap taken by other
        tenants' idle or closing connections, say) would be without notifications for good."""
        if not self._listen_ok:
            return httpx.Response(405, request=request)
        timeouts = dict(request.extensions.get("timeout", {}))
        timeouts["pool"] = 0.0  # a stream never waits in the queue ahead of requests
        request.extensions["timeout"] = timeouts
        pause = _LISTEN_FIRST_PAUSE
        while True:
            if may_listen(self._pool, request.url):
                token = self._enter()
                try:
                    response = await self._inner.handle_async_request(request)
                except (PoolTimeout, PoolSaturated) as exc:
                    # No connection at once (room is being made, or others took it): the
                    # attempt left the queue; look again later.
                    log.debug("MCP event stream waits for room: %s", exc)
                except Exception as exc:
                    log.debug("MCP event stream not opened: %s", exc)
                    return httpx.Response(405, request=request)
                else:
                    return self._listening(request, response)
                finally:
                    self._leave(token)
            await asyncio.sleep(pause)
            pause = min(pause * 2, _LISTEN_MAX_PAUSE)

    def _listening(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        """`response` as an event stream counted in `streams` until its body is closed."""
        self._on_listen(1)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CountedStream(response, lambda: self._on_listen(-1)),
            extensions=response.extensions,
            request=request,
        )

    async def aclose(self) -> None:
        """Does nothing: the pool outlives its sessions."""


class _CountedStream(httpx.AsyncByteStream):
    """A GET event stream's body; `done` runs once when it ends or is closed."""

    def __init__(self, response: httpx.Response, done: Callable[[], None]) -> None:
        self._response = response
        self._done: Callable[[], None] | None = done

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.aiter_raw():
                yield chunk
        finally:
            self._finish()

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._finish()

    def _finish(self) -> None:
        done, self._done = self._done, None
        if done is not None:
            done()


class _SafeEventStream(httpx.AsyncByteStream):
    """A request's SSE answer; a failure while reading it ends the stream with a JSON-RPC
    error event answering the request, so the caller is answered instead of left waiting."""

    def __init__(self, owner: SessionTransport, response: httpx.Response, msg_id: Any) -> None:
        self._owner = owner
        self._response = response
        self._id = msg_id

    async def __aiter__(self) -> AsyncIterator[bytes]:
        tail = b"\n\n"
        try:
            async for chunk in self._response.aiter_raw():
                if chunk:
                    tail = chunk[-2:]
                yield chunk
        except Exception as exc:
            # Close a partly received event first, then answer the request.
            prefix = b"" if tail.endswith(b"\n\n") else b"\n\n"
            body = self._owner.error_body(exc, self._id, True)
            yield prefix + b"event: message\ndata: " + body + b"\n\n"

    async def aclose(self) -> None:
        await self._response.aclose()
