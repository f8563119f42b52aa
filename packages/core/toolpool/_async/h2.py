"""The request path of an HTTP/2 destination: a stream permit from the state machine, the
key's connection (checked, or opened single-flight), the exchange with one retry elsewhere
for a stream the server did not process, the response body that gives the permit back;
warm-up and preconnect. A server that picked http/1.1 gets the HTTP/1.1 path (`request`).

Written once, for asyncio; `_sync/h2.py` is generated from this file by `tools/unasync.py`
(`make unasync`; `make lint` fails when it is not current), so edit this file only. What
differs between the drivers lives in hand-written code: the connections
(`toolpool._h2io`) and how one is opened (`connection.open_h2`). What is decided lives in
`toolpool._h2pool` (which connection takes a stream, when to open, ping, drain, retry, when
a permit returns) and `_state`: this path carries the decisions out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import httpx

from toolpool import _auth_context, _h2pool
from toolpool._async import request as http11
from toolpool._async.connection import Event, current_driver, open_h2
from toolpool._destination import DestinationPool, connect_error, pool_key
from toolpool._h2 import StreamNotProcessed
from toolpool._h2io import AsyncH2Connection
from toolpool._h2pool import KeyConnections
from toolpool._messages import NO_TIMEOUTS
from toolpool._state import Slot

__all__ = [
    "AsyncPermitBody",
    "connection",
    "open_connection",
    "preconnect",
    "send",
    "warm",
]

log = logging.getLogger("toolpool.pool")
monotonic = time.monotonic


async def open_connection(
    dest: DestinationPool,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
    early: _h2pool.Connecting | None = None,
) -> AsyncH2Connection:
    """A new HTTP/2 connection acting for `ctx`, the server's SETTINGS (its stream limit)
    received; raises `_h2pool.UseHttp11` when the server picked http/1.1 by ALPN. With
    `early` (a request opens it), no wait for the SETTINGS: the connection is returned once
    its preface is written and `early` times the connect (the request reports it)."""
    h2 = _h2pool.h2_side(dest)
    timing = early if early is not None else _h2pool.Connecting(dest)
    try:
        conn = await open_h2(dest, h2.ssl_context(ctx), timeout, timing)
    except BaseException as exc:
        timing.failed(exc)
        raise
    if conn is None:
        h2.use_http11()
        timing.done("http/1.1")
        raise _h2pool.UseHttp11
    h2.protocol = "h2"
    if early is not None:
        # RFC 9113 3.4: requests may follow the preface at once, the server's SETTINGS
        # assumed at their defaults until they arrive; h2 applies the default windows and
        # frame size, `H2Client.accepting` takes one stream until then.
        timing.ready()
        h2.adopt(conn)
        return conn
    try:
        await conn.settings(timeout)
    except BaseException as exc:
        conn.close()
        err = connect_error(dest, exc, timeout)
        timing.failed(err)
        if err is exc:
            raise
        raise err from exc
    timing.done("h2")
    h2.adopt(conn)
    return conn


async def connection(
    dest: DestinationPool,
    kc: KeyConnections,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
    exclude: object = None,
    early: bool = False,
) -> tuple[AsyncH2Connection, bool, _h2pool.Connecting | None]:
    """A connection of the key with room for one more stream: checked (max lifetime, a PING
    after idle), or newly opened; requests of a key that arrive together share one connect.
    Also whether the connection is new to the caller (it opened it, or waited for another
    request of the key to open it). A traced destination's probe hears of PINGs and of
    waits for another request's connect.

    With `early` (a request that sends a stream at once), a connection the caller opens is
    returned before the server's SETTINGS arrived, with its pending connect (third item):
    the caller's stream is its first and only one until the SETTINGS arrive, the key's
    other requests wait for them as for the connect; the caller calls `_h2pool.settled`
    once its exchange ended. Otherwise the third item is None."""
    idle_ttl = dest.settings.idle_ttl
    waited = False
    h2 = dest.h2
    assert h2 is not None
    while True:
        if h2.protocol == "http/1.1":
            # Learnt while this request waited for the key's connect: no TLS handshake of
            # its own to learn it again (a burst would open one per request).
            raise _h2pool.UseHttp11
        stale, conn, opening, mine = kc.borrow(idle_ttl, exclude, Event)
        for old in stale:
            old.close()
        if conn is not None:
            if _h2pool.lifetime_over(conn):
                conn.close_reason = "lifetime"
                conn.drain()
                continue
            if _h2pool.ping_first(conn):
                since = monotonic()
                answered = await conn.ping(_h2pool.PING_TIMEOUT)
                if dest.probe is not None:
                    dest.probe.pinged(dest, since, monotonic(), answered)
                if not answered:
                    log.debug("HTTP/2 connection to %s did not answer a PING: closed", dest.name)
                    conn.close_reason = "health"
                    conn.close()
                    continue
            if conn.is_available:
                return conn, waited, None
            continue
        if not mine:
            since = monotonic()
            await opening.wait()  # another request of this key is connecting
            if dest.probe is not None:
                dest.probe.connect_waited(dest, since, monotonic())
            waited = True
            continue
        pending = _h2pool.Connecting(dest) if early else None
        try:
            new = await open_connection(dest, ctx, timeout, pending)
        except BaseException:
            kc.opened(None)  # the key's waiting requests try again (one of them connects)
            raise
        if pending is None:
            kc.opened(new)
        else:
            _h2pool.opened_early(kc, new)  # the others go on once the SETTINGS arrived
        return new, True, pending


async def send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on an HTTP/2 destination: a stream permit (the cap counts
    requests), a stream on the key's connection, and one more try on another connection
    when the server did not process it and the body can be replayed."""
    h2 = _h2pool.h2_side(dest)
    if h2.protocol == "http/1.1":
        return await http11.send(dest, request, ctx)
    key = pool_key(ctx, current_driver())
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    asked = monotonic()
    probe = dest.probe
    if probe is not None:
        probe.attempt(dest, asked)
    slot = await http11.acquire(dest, key, dest.wait_limit(timeouts))
    waited = monotonic() - asked
    slot = _h2pool.as_permit(dest, slot)
    kc = h2.key(key)
    exclude: object = None
    fenced = False
    reused = True
    try:
        for attempt in (1, 2):
            try:
                conn, fresh, pending = await connection(
                    dest, kc, ctx, dest.connect_limit(timeouts), exclude, early=True
                )
            except _h2pool.UseHttp11:
                dest.release(slot, False)
                if probe is not None:
                    probe.fell_back(dest)
                return await http11.send(dest, request, ctx)
            reused = reused and not fresh
            trace = _h2pool.stream_trace(dest)
            sent = monotonic() if probe is not None else 0.0
            try:
                try:
                    inner = await conn.handle_async_request(request, trace)
                finally:
                    if pending is not None:
                        _h2pool.settled(conn, pending)
            except StreamNotProcessed as exc:
                if probe is not None:
                    probe.exchanged(dest, sent, None, exc)
                if attempt == 2 or not _h2pool.retry_elsewhere(exc, request):
                    raise
                if probe is not None:
                    probe.resent(dest, exc.reason)
                exclude = conn  # the server did not process it: once more, elsewhere
                continue
            except BaseException as exc:
                if probe is not None:
                    probe.exchanged(dest, sent, None, exc, reset=_h2pool.trace_reset(trace))
                fenced = True  # the server may count the stream until it read the reset
                _h2pool.give_back(dest, slot, conn, False)
                raise
            break
    except BaseException:
        if not fenced:
            dest.release(slot, True)
        raise
    if probe is not None:
        probe.exchanged(dest, sent, inner.status_code, None, sent_at=_h2pool.trace_sent(trace))
    dest.response_started(slot, list(inner.headers.raw))
    body = AsyncPermitBody(dest, slot, inner, conn)
    return _h2pool.response(dest, slot, inner, body, waited, reused)


class AsyncPermitBody(httpx.AsyncByteStream):
    """The response body; gives the stream permit back when read to the end, or closed
    early (then once the server has read the RST_STREAM: `_h2pool.give_back`)."""

    def __init__(
        self, dest: DestinationPool, slot: Slot, inner: httpx.Response, conn: AsyncH2Connection
    ) -> None:
        self._dest = dest
        self._slot = slot
        self._inner = inner
        self._conn = conn
        self._done = False
        self._complete = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner.aiter_raw():
                if chunk:
                    yield chunk
            self._complete = True
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            try:
                await self._inner.aclose()
            finally:
                _h2pool.give_back(self._dest, self._slot, self._conn, self._complete)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._dest.pool._orphaned(self._dest, self._slot)


async def preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> bool:
    """Make sure `ctx`'s key has an HTTP/2 connection (open one if the cap has room), without
    starting a stream: a stream permit is held for the handshake only and then idles with
    its key, so the connection lives as long as the state machine keeps the key's capacity
    (idle TTL, affinity, limit, shutdown drain it). True if a connection is there.

    Warm-up and an auth provider's preconnect during a token fetch call it; a server that
    picks http/1.1 gets the HTTP/1.1 preconnect instead."""
    h2 = _h2pool.h2_side(dest)
    if h2.protocol == "http/1.1":
        return await http11.preconnect(dest, ctx, timeout)
    key = pool_key(ctx, current_driver())
    slot = dest.lease_if_room(key)
    if slot is None:
        return False  # at the cap: the request will queue like any other
    slot = _h2pool.as_permit(dest, slot)
    try:
        await connection(dest, h2.key(key), ctx, timeout or dest.settings.connect_timeout)
    except _h2pool.UseHttp11:
        dest.release(slot, False)
        return await http11.preconnect(dest, ctx, timeout)
    except httpx.TransportError:
        # No connection: the permit goes too (an idle one would stand for a connection).
        dest.release(slot, False)
        return False  # the request itself will meet (and report) the failure
    except BaseException:
        dest.release(slot, True)
        raise
    dest.release(slot, True)
    return True


async def warm(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, slot: Slot | None = None
) -> bool:
    """Warm-up of one (destination, context): its token (when the destination has an auth
    provider; a cold fetch opens the connection at the same time) and its connection. With
    `slot`, an unbound warm-up permit (no context listed): one connection for no identity,
    which the first request of this driver takes and binds to its context (see
    `_h2pool.H2Connections.bind`)."""
    warm_token = getattr(dest.auth, "warm_async", None)  # toolpool.auth.HeaderAuth's
    if warm_token is not None:
        try:
            await warm_token(ctx)
        except Exception as exc:  # the first request meets (and reports) it again
            log.debug("warm-up token for %s failed: %s", dest.name, type(exc).__name__)
    if slot is None:
        return await preconnect(dest, ctx)
    h2 = _h2pool.h2_side(dest)
    try:
        await connection(dest, h2.key(slot.key), None, dest.settings.connect_timeout)
    except BaseException as exc:
        dest.open_failed(slot)
        if isinstance(exc, httpx.TransportError | _h2pool.UseHttp11):
            return False  # the requests meet (and report) the failure, or speak HTTP/1.1
        raise
    _h2pool.warm_permit(dest, slot)
    return True
