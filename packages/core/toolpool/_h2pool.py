"""HTTP/2 destinations: the cap counted in streams, one multiplexed connection per tenant.

On a destination that speaks HTTP/2 a *slot* of the state machine (`_state`) is a permit
for one request in flight (a stream), not a connection: `max_connections`, the wait queue,
FIFO fairness across tenants and admission all stay in the state machine, in the unit
servers count (nginx counts each stream against its limits). A permit holds a
:class:`StreamPermit` where an HTTP/1.1 slot holds a socket. The connections themselves live
here, in :class:`H2Connections`, one set per (auth context, driver):

- **Affinity unchanged**: a connection is opened for one key and only ever carries that
  key's streams.
- **One connection per active context**; a second only when every connection of the key is
  at the server's ``SETTINGS_MAX_CONCURRENT_STREAMS`` (or going away). Opening is
  single-flight per key: requests of a key that arrive together share one connect.
- **No tenant churn**: a new tenant's first request opens its own connection; nobody else's
  closes while the request cap has room (the state machine frees permits of other tenants
  only at the cap, and a freed permit costs no connection).
- **Health**: a connection idle more than ``BORROW_CHECK_AFTER`` is checked with a PING
  before it carries a stream; no answer within ``PING_TIMEOUT``: it is closed and another
  opened. When the state machine closes a key's last permit (idle TTL, affinity, limit,
  shutdown) the key's connections drain; a connection found without a stream for
  ``idle_ttl`` when its key next borrows is closed; one older than ``max_lifetime`` (minus
  jitter) drains: no new streams, closed once its streams finish.
- **Retry**: a request the server did not process (REFUSED_STREAM, or above a GOAWAY's last
  stream id) is sent once more on another connection when its body can be replayed.
- **Protocol discovery**: the first connect offers ``h2`` and ``http/1.1`` by ALPN. A server
  that picks ``http/1.1`` turns the destination into an HTTP/1.1 destination for good: that
  connection is closed and the request (and every later one) takes the HTTP/1.1 path.

The asyncio and the thread driver below execute the same decisions (which connection takes
a stream, when to open, ping, drain, close), kept in :class:`KeyConnections`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Any

import httpx

from toolpool import _auth_context, _egress, _state
from toolpool._destination import DestinationPool, connect_error, pool_key
from toolpool._h2 import StreamNotProcessed
from toolpool._h2io import AsyncH2Connection, Handshaken, SyncH2Connection
from toolpool._messages import NO_TIMEOUTS
from toolpool._state import Slot
from toolpool._tls import client_ssl_context

__all__ = [
    "H2Connections",
    "StreamPermit",
    "async_preconnect",
    "async_send",
    "async_warm",
    "sync_preconnect",
    "sync_send",
    "sync_warm",
]

log = logging.getLogger("toolpool.pool")
monotonic = time.monotonic

#: A connection idle longer than this is PINGed before it carries a stream (the rules
#: table's "a connection idle > 1 s is checked cheaply on borrow").
BORROW_CHECK_AFTER = 1.0
#: How long a borrow-time PING may take before the connection counts as dead.
PING_TIMEOUT = 2.0

H2Conn = AsyncH2Connection | SyncH2Connection
#: Why the state machine closed a permit when the capacity moved to another tenant (or the
#: cap shrank): the tenant's connection stays open, streamless, for when it comes back.
_CAPACITY_MOVED = frozenset({_state.AFFINITY, _state.LIMIT})


class _UseHttp11(Exception):
    """The server picked http/1.1 by ALPN: this destination is an HTTP/1.1 destination."""


class StreamPermit:
    """What a slot of an HTTP/2 destination holds instead of a socket: the right to one
    stream on its key's connection. Closing it costs nothing on the wire."""

    __slots__ = ("_dest", "_slot", "tcp_done")

    def __init__(self, dest: DestinationPool, slot: Slot) -> None:
        self._dest = dest
        self._slot = slot
        self.tcp_done = monotonic()

    @property
    def alive(self) -> bool:
        return self._dest.h2 is not None and self._dest.h2.protocol != "http/1.1"

    def probe(self) -> bool:
        # A permit is always fit; its connection is checked by PING when borrowed.
        return self.alive

    def close(self) -> None:
        self.close_for(None)

    def close_for(self, reason: str | None) -> None:
        """The state machine closes this permit for `reason` (see `H2Connections.permit_closed`
        for what that means for the key's connections)."""
        self._dest.connection_lost(self._slot)
        h2 = self._dest.h2
        if h2 is not None:
            h2.permit_closed(self._slot.key, keep=reason in _CAPACITY_MOVED)

    def abort(self) -> None:
        self.close()


class KeyConnections:
    """The HTTP/2 connections of one (auth context, driver) key, and the rules choosing one."""

    __slots__ = ("conns", "opening", "permits")

    def __init__(self) -> None:
        self.conns: list[Any] = []
        #: Stream permits (slots of the state machine) this key holds, in any state.
        self.permits = 0
        #: A connect of this key is under way (async: an asyncio.Future; sync: an Event).
        self.opening: Any = None

    def pick(self, exclude: object = None) -> Any:
        """The connection to carry the next stream: the oldest with room (streams pack onto
        as few connections as the server's stream limit allows), or None."""
        self.conns = [c for c in self.conns if not c.is_closed]
        for conn in self.conns:
            if conn is not exclude and conn.is_available:
                return conn
        return None

    def expire(self, idle_ttl: float) -> list[Any]:
        """Connections idle (no stream) for ``idle_ttl``: removed, for the caller to close."""
        gone = [c for c in self.conns if not c.state.streams and c.idle_for() >= idle_ttl]
        if gone:
            self.conns = [c for c in self.conns if c not in gone]
        return gone


class H2Connections:
    """A destination's HTTP/2 side: the protocol it speaks and its connections by key."""

    def __init__(self, dest: DestinationPool) -> None:
        self.dest = dest
        #: None until the first connect: "h2" or "http/1.1" (what ALPN chose).
        self.protocol: str | None = None
        self.by_key: dict[tuple[str | None, Any], KeyConnections] = {}
        self.lock = threading.Lock()
        self.opened = 0
        self._ssl: ssl.SSLContext | None = None

    def ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            settings = self.dest.settings
            ctx = client_ssl_context(settings.verify, settings.cert)
            ctx.set_alpn_protocols(["h2", "http/1.1"])
            self._ssl = ctx
        return self._ssl

    def use_http11(self) -> None:
        """The server picked http/1.1: from now on this is an HTTP/1.1 destination."""
        self.protocol = "http/1.1"
        if self._ssl is not None:
            # A caller's own SSLContext (verify=ctx) is shared with the HTTP/1.1 path, which
            # must not be offered h2 again.
            self._ssl.set_alpn_protocols(["http/1.1"])

    def key(self, key: tuple[str | None, Any]) -> KeyConnections:
        with self.lock:
            kc = self.by_key.get(key)
            if kc is None:
                kc = self.by_key[key] = KeyConnections()
            return kc

    def permit_opened(self, key: tuple[str | None, Any]) -> None:
        kc = self.key(key)
        with self.lock:
            kc.permits += 1

    def permit_closed(self, key: tuple[str | None, Any], keep: bool = False) -> None:
        """The state machine closed one of `key`'s permits (idle TTL, affinity, limit,
        shutdown). With the last one gone the key's connections drain: the state machine's
        decisions about a tenant's idleness decide about its connections too. Except with
        `keep` (the capacity moved to another tenant at the cap, or the cap shrank): a
        connection without streams costs the server's stream limit nothing, so the tenant
        keeps it for its next request (no tenant churn); `tick` closes it once it has been
        idle for the idle TTL with no permit."""
        with self.lock:
            kc = self.by_key.get(key)
            if kc is None:
                return
            kc.permits -= 1
            if kc.permits > 0 or keep:
                return
            conns, kc.conns = kc.conns, []
        for conn in conns:
            _drain_any(conn)

    def tick(self, now: float) -> None:
        """The maintenance thread's periodic pass: connections of keys that hold no permit
        and idle for the idle TTL drain (they carry no stream, so they close at once); every
        other connection idle for the health-check interval is PINGed (without waiting here)
        and closed when the server does not answer within ``PING_TIMEOUT``, so a dead
        connection is found before a request borrows it."""
        settings = self.dest.settings
        gone: list[Any] = []
        due: list[Any] = []
        with self.lock:
            for kc in self.by_key.values():
                if kc.permits <= 0 and kc.conns:
                    gone += kc.expire(settings.idle_ttl)
                for conn in kc.conns:
                    if (
                        not conn.is_closed
                        and conn.is_available
                        and now - conn.pinged_at >= settings.health_check_interval
                        and conn.idle_for() >= settings.health_check_interval
                    ):
                        conn.pinged_at = now
                        due.append(conn)
        for conn in gone:
            _drain_any(conn)
        for conn in due:
            _health_check(self.dest, conn)

    def lifetime(self) -> float:
        """This connection's max lifetime: the destination's, minus up to 10 % jitter."""
        return self.dest.settings.max_lifetime * (1 - 0.1 * random.random())

    def stats(self) -> dict[str, Any]:
        """The destination's protocol, streams in use and streams per open connection."""
        with self.lock:
            conns = [c for kc in self.by_key.values() for c in kc.conns if not c.is_closed]
        per_conn = [c.state.streams_in_use for c in conns]
        return {
            "protocol": self.protocol or "unknown",
            "connections": len(conns),
            "streams_in_use": sum(per_conn),
            "streams_per_connection": per_conn,
            "connections_opened": self.opened,
        }

    def close_all(self) -> None:
        """Pool shutdown: every connection drains (open streams finish, then it closes)."""
        with self.lock:
            conns = [c for kc in self.by_key.values() for c in kc.conns]
            self.by_key.clear()
        for conn in conns:
            _drain_any(conn)


def _drain_any(conn: Any) -> None:
    if isinstance(conn, AsyncH2Connection):
        loop = conn.loop
        if loop is not None and not loop.is_closed():
            try:
                if _running_loop() is loop:
                    conn.drain()
                else:
                    loop.call_soon_threadsafe(conn.drain)
            except RuntimeError:
                pass
    else:
        conn.drain()


_checks: set[asyncio.Task[None]] = set()  # health-check PINGs under way (kept referenced)


def _health_check(dest: DestinationPool, conn: Any) -> None:
    """PING `conn` on its own driver, without blocking the caller; no answer: closed."""

    def dead() -> None:
        log.debug("idle HTTP/2 connection to %s did not answer a PING: closed", dest.name)
        conn.close()

    if isinstance(conn, AsyncH2Connection):
        loop = conn.loop
        if loop is None or loop.is_closed():
            return

        async def check() -> None:
            if not await conn.ping(PING_TIMEOUT):
                dead()

        def start() -> None:
            task = loop.create_task(check())
            _checks.add(task)
            task.add_done_callback(_checks.discard)

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:
            pass  # the loop closed meanwhile: so did its connections
    else:

        def check_sync() -> None:
            if not conn.ping(PING_TIMEOUT):
                dead()

        threading.Thread(
            target=check_sync, name=f"toolpool-h2-ping-{dest.name}", daemon=True
        ).start()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _lifetime_over(conn: Any) -> bool:
    return bool(conn.expires_at is not None and monotonic() >= conn.expires_at)


def _permit(dest: DestinationPool, slot: Slot) -> None:
    """Make `slot` a stream permit: a fresh permit is 'opened' at once (no socket); a slot
    that still holds an HTTP/1.1 connection gives it up first."""
    conn = slot.conn
    if conn is None:
        dest.opened(slot, StreamPermit(dest, slot), 0.0)
        assert dest.h2 is not None
        dest.h2.permit_opened(slot.key)


def _replayable(request: httpx.Request) -> bool:
    return isinstance(request.stream, httpx.ByteStream)


def _response(
    dest: DestinationPool, slot: Slot, inner: httpx.Response, stream: Any, waited: float
) -> httpx.Response:
    return httpx.Response(
        inner.status_code,
        headers=inner.headers.raw,
        stream=stream,
        extensions={
            "http_version": b"HTTP/2",
            "toolpool": {
                "destination": dest.name,
                "connection_id": slot.id,
                "reused": True,
                "wait_seconds": waited,
                "stream_id": inner.extensions.get("stream_id"),
            },
        },
    )


# -- asyncio ------------------------------------------------------------------------------------


async def _open_async(
    dest: DestinationPool, loop: asyncio.AbstractEventLoop, timeout: float | None
) -> AsyncH2Connection:
    """Connect (egress-checked), TLS offering h2 and http/1.1; raises _UseHttp11 when the
    server picks http/1.1."""
    h2 = dest.h2
    assert h2 is not None
    from toolpool._async.connection import _tcp_connect

    connecting: list[socket.socket] = []
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            addresses = await _egress.aresolve(dest, loop)
            for address in addresses:
                try:
                    sock = await _tcp_connect(loop, address, dest.port, connecting)
                    break
                except OSError as exc:
                    if not _egress.try_next(exc, address, addresses, None):
                        raise
            transport, _ = await loop.create_connection(
                Handshaken, sock=sock, ssl=h2.ssl_context(), server_hostname=dest.host
            )
    except BaseException as exc:
        if transport is not None:
            transport.abort()
        for s in connecting:
            s.close()
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    ssl_object = transport.get_extra_info("ssl_object")
    chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    if chosen != "h2":
        h2.use_http11()
        transport.close()
        raise _UseHttp11
    h2.protocol = "h2"
    conn = AsyncH2Connection.adopt(transport)
    try:
        await conn.settings(timeout)  # the server's stream limit, before any stream
    except BaseException as exc:
        conn.close()
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    conn.expires_at = monotonic() + h2.lifetime()
    h2.opened += 1
    return conn


async def _connection_async(
    dest: DestinationPool,
    kc: KeyConnections,
    loop: asyncio.AbstractEventLoop,
    timeout: float | None,
    exclude: object = None,
) -> AsyncH2Connection:
    """A connection of the key with room for one more stream (checked, or newly opened)."""
    settings = dest.settings
    while True:
        for stale in kc.expire(settings.idle_ttl):
            stale.close()
        conn = kc.pick(exclude)
        if conn is not None:
            if _lifetime_over(conn):
                conn.drain()
                continue
            if conn.idle_for() > BORROW_CHECK_AFTER and not await conn.ping(PING_TIMEOUT):
                log.debug("HTTP/2 connection to %s did not answer a PING: closed", dest.name)
                conn.close()
                continue
            if conn.is_available:
                return conn  # type: ignore[no-any-return]
            continue
        if kc.opening is not None:
            await asyncio.shield(kc.opening)  # another request of this key is connecting
            continue
        kc.opening = loop.create_future()
        try:
            conn = await _open_async(dest, loop, timeout)
            kc.conns.append(conn)
        finally:
            opening, kc.opening = kc.opening, None
            opening.set_result(None)
        return conn


async def async_send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on an HTTP/2 destination (falls back to HTTP/1.1 when the server
    picked it)."""
    from toolpool._async import request as http11

    h2 = dest.h2
    assert h2 is not None
    if h2.protocol == "http/1.1":
        return await http11.send(dest, request, ctx)
    loop = asyncio.get_running_loop()
    key = pool_key(ctx, loop)
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    asked = monotonic()
    slot = await http11.acquire(dest, key, dest.wait_limit(timeouts))
    waited = monotonic() - asked
    if slot.conn is not None and not isinstance(slot.conn, StreamPermit):
        slot = dest.replace(slot)  # an HTTP/1.1 connection left from before: a permit now
    _permit(dest, slot)
    kc = h2.key(key)
    exclude: object = None
    fenced = False
    try:
        for attempt in (1, 2):
            try:
                conn = await _connection_async(
                    dest, kc, loop, dest.connect_limit(timeouts), exclude
                )
            except _UseHttp11:
                dest.release(slot, False)
                return await http11.send(dest, request, ctx)
            try:
                inner = await conn.handle_async_request(request)
            except StreamNotProcessed:
                if attempt == 2 or not _replayable(request):
                    raise
                exclude = conn  # the server did not process it: once more, elsewhere
                continue
            except BaseException:
                # The stream may still count at the server until it reads our RST_STREAM.
                fenced = True
                conn.fence(partial(dest.release, slot, True))
                raise
            break
    except BaseException:
        if not fenced:
            dest.release(slot, True)
        raise
    dest.response_started(slot, list(inner.headers.raw))
    return _response(dest, slot, inner, _AsyncPermitBody(dest, slot, inner, conn), waited)


class _AsyncPermitBody(httpx.AsyncByteStream):
    """The response body; gives the stream permit back when read to the end, or closed
    early (then once the server has read the RST_STREAM: see `AsyncH2Connection.fence`)."""

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
                release = partial(self._dest.release, self._slot, True)
                if self._complete:
                    release()
                else:
                    self._conn.fence(release)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._dest.pool._orphaned(self._dest, self._slot)


async def async_preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> bool:
    """Make sure `ctx`'s key has an HTTP/2 connection (open one if the cap has room), without
    starting a stream: a stream permit is held for the handshake only and then idles with
    its key, so the connection lives as long as the state machine keeps the key's capacity
    (idle TTL, affinity, limit, shutdown drain it). True if a connection is there.

    Warm-up and an auth provider's preconnect during a token fetch call it; a server that
    picks http/1.1 gets the HTTP/1.1 preconnect instead."""
    from toolpool._async import request as http11

    h2 = dest.h2
    assert h2 is not None
    if h2.protocol == "http/1.1":
        return await http11.preconnect(dest, ctx, timeout)
    loop = asyncio.get_running_loop()
    key = pool_key(ctx, loop)
    slot = dest.lease_if_room(key)
    if slot is None:
        return False  # at the cap: the request will queue like any other
    if slot.conn is not None and not isinstance(slot.conn, StreamPermit):
        slot = dest.replace(slot)
    _permit(dest, slot)
    try:
        await _connection_async(dest, h2.key(key), loop, timeout or dest.settings.connect_timeout)
    except _UseHttp11:
        dest.release(slot, False)
        return await http11.preconnect(dest, ctx, timeout)
    except httpx.TransportError:
        dest.release(slot, True)
        return False  # the request itself will meet (and report) the failure
    except BaseException:
        dest.release(slot, True)
        raise
    dest.release(slot, True)
    return True


async def async_warm(dest: DestinationPool, ctx: _auth_context.AuthContext | None) -> bool:
    """Warm-up of one (destination, context): its token (when the destination has an auth
    provider; a cold fetch opens the connection at the same time) and its connection."""
    warm_token = getattr(dest.auth, "warm_async", None)  # toolpool.auth.HeaderAuth's
    if warm_token is not None:
        try:
            await warm_token(ctx)
        except Exception as exc:  # the first request meets (and reports) it again
            log.debug("warm-up token for %s failed: %s", dest.name, type(exc).__name__)
    return await async_preconnect(dest, ctx)


# -- threads ------------------------------------------------------------------------------------


def _open_sync(dest: DestinationPool, timeout: float | None) -> SyncH2Connection:
    h2 = dest.h2
    assert h2 is not None
    deadline = None if timeout is None else monotonic() + timeout
    try:
        addresses = _egress.resolve(dest)
        sock: socket.socket | None = None
        for address in addresses:
            remaining = None if deadline is None else max(0.001, deadline - monotonic())
            try:
                sock = socket.create_connection((address, dest.port), timeout=remaining)
                break
            except OSError as exc:
                if not _egress.try_next(exc, address, addresses, None):
                    raise
        assert sock is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            tls = h2.ssl_context().wrap_socket(sock, server_hostname=dest.host)
        except BaseException:
            sock.close()
            raise
    except BaseException as exc:
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    if tls.selected_alpn_protocol() != "h2":
        h2.use_http11()
        tls.close()
        raise _UseHttp11
    tls.settimeout(None)
    h2.protocol = "h2"
    conn = SyncH2Connection(tls)
    try:
        conn.settings(timeout)  # the server's stream limit, before any stream
    except BaseException as exc:
        conn.close()
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    conn.expires_at = monotonic() + h2.lifetime()
    h2.opened += 1
    return conn


def _connection_sync(
    dest: DestinationPool, kc: KeyConnections, timeout: float | None, exclude: object = None
) -> SyncH2Connection:
    settings = dest.settings
    h2 = dest.h2
    assert h2 is not None
    while True:
        with h2.lock:
            stale = kc.expire(settings.idle_ttl)
            conn = kc.pick(exclude)
            opening = kc.opening
            if conn is None and opening is None:
                kc.opening = opening = threading.Event()
                mine = True
            else:
                mine = False
        for old in stale:
            old.close()
        if conn is not None:
            if _lifetime_over(conn):
                conn.drain()
                continue
            if conn.idle_for() > BORROW_CHECK_AFTER and not conn.ping(PING_TIMEOUT):
                log.debug("HTTP/2 connection to %s did not answer a PING: closed", dest.name)
                conn.close()
                continue
            if conn.is_available:
                return conn  # type: ignore[no-any-return]
            continue
        if not mine:
            opening.wait(timeout)
            continue
        try:
            new = _open_sync(dest, timeout)
            with h2.lock:
                kc.conns.append(new)
        finally:
            with h2.lock:
                kc.opening = None
            opening.set()
        return new


def sync_send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """:func:`async_send` for the thread driver."""
    from toolpool._sync import request as http11
    from toolpool._sync.connection import SYNC_DRIVER

    h2 = dest.h2
    assert h2 is not None
    if h2.protocol == "http/1.1":
        return http11.send(dest, request, ctx)
    key = pool_key(ctx, SYNC_DRIVER)
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    asked = monotonic()
    slot = http11.acquire(dest, key, dest.wait_limit(timeouts))
    waited = monotonic() - asked
    if slot.conn is not None and not isinstance(slot.conn, StreamPermit):
        slot = dest.replace(slot)
    _permit(dest, slot)
    kc = h2.key(key)
    exclude: object = None
    fenced = False
    try:
        for attempt in (1, 2):
            try:
                conn = _connection_sync(dest, kc, dest.connect_limit(timeouts), exclude)
            except _UseHttp11:
                dest.release(slot, False)
                return http11.send(dest, request, ctx)
            try:
                inner = conn.handle_request(request)
            except StreamNotProcessed:
                if attempt == 2 or not _replayable(request):
                    raise
                exclude = conn
                continue
            except BaseException:
                fenced = True
                conn.fence(partial(dest.release, slot, True), PING_TIMEOUT)
                raise
            break
    except BaseException:
        if not fenced:
            dest.release(slot, True)
        raise
    dest.response_started(slot, list(inner.headers.raw))
    return _response(dest, slot, inner, _SyncPermitBody(dest, slot, inner, conn), waited)


class _SyncPermitBody(httpx.SyncByteStream):
    def __init__(
        self, dest: DestinationPool, slot: Slot, inner: httpx.Response, conn: SyncH2Connection
    ) -> None:
        self._dest = dest
        self._slot = slot
        self._inner = inner
        self._conn = conn
        self._done = False
        self._complete = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner.iter_raw()
            self._complete = True
        finally:
            self.close()

    def close(self) -> None:
        if not self._done:
            self._done = True
            try:
                self._inner.close()
            finally:
                release = partial(self._dest.release, self._slot, True)
                if self._complete:
                    release()
                else:
                    self._conn.fence(release, PING_TIMEOUT)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._dest.pool._orphaned(self._dest, self._slot)


def sync_preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> bool:
    """:func:`async_preconnect` for the thread driver."""
    from toolpool._sync import request as http11
    from toolpool._sync.connection import SYNC_DRIVER

    h2 = dest.h2
    assert h2 is not None
    if h2.protocol == "http/1.1":
        return http11.preconnect(dest, ctx, timeout)
    key = pool_key(ctx, SYNC_DRIVER)
    slot = dest.lease_if_room(key)
    if slot is None:
        return False
    if slot.conn is not None and not isinstance(slot.conn, StreamPermit):
        slot = dest.replace(slot)
    _permit(dest, slot)
    try:
        _connection_sync(dest, h2.key(key), timeout or dest.settings.connect_timeout)
    except _UseHttp11:
        dest.release(slot, False)
        return http11.preconnect(dest, ctx, timeout)
    except httpx.TransportError:
        dest.release(slot, True)
        return False
    except BaseException:
        dest.release(slot, True)
        raise
    dest.release(slot, True)
    return True


def sync_warm(dest: DestinationPool, ctx: _auth_context.AuthContext | None) -> bool:
    """:func:`async_warm` for the thread driver."""
    warm_token = getattr(dest.auth, "warm_sync", None)
    if warm_token is not None:
        try:
            warm_token(ctx)
        except Exception as exc:
            log.debug("warm-up token for %s failed: %s", dest.name, type(exc).__name__)
    return sync_preconnect(dest, ctx)


def attach(dest: DestinationPool) -> None:
    """Give an HTTP/2-enabled destination its HTTP/2 side (the pool builds the destination
    with this module's `async_send` / `sync_send` as its drivers)."""
    dest.h2 = H2Connections(dest)
