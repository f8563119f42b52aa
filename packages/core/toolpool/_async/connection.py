"""The asyncio driver's connections: HTTP/1.1 on asyncio Protocols, and how one is opened.

Each connection belongs to the event loop that opened it (its driver key is that loop); a pool
used from several loops keeps separate connections per loop within the same per-destination
cap. Like every driver module it executes what `_state` decides and never decides itself.
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import threading
import time
import weakref
from typing import Any, ClassVar

import httpx

from toolpool import _auth_context, _egress
from toolpool._destination import DestinationPool, connect_error
from toolpool._h2io import AsyncH2Connection, Handshaken
from toolpool._http11 import LAST_CHUNK, ProtocolError, ResponseHead, ResponseParser, encode_chunk
from toolpool._messages import ReadCheck, RequestBytes
from toolpool._state import Slot

__all__ = [
    "AsyncConnection",
    "Event",
    "Notifier",
    "Stale",
    "connect",
    "current_driver",
    "open_h2",
    "settled",
]

monotonic = time.monotonic
get_ident = threading.get_ident

# Response bytes buffered before the socket stops being read (flow control).
_HIGH_WATER = 256 * 1024
# How long a graceful close waits for the peer's side before the socket is aborted.
_CLOSE_GRACE = 2.0
# How often pending read timeouts are checked (their resolution).
_SWEEP = 0.05


_NO_SOCKET = ReadCheck(-1)


class Stale(httpx.RemoteProtocolError):
    """The connection was closed by the peer before any byte of the response arrived."""


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def time_out(fut: asyncio.Future[None], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


def current_driver() -> asyncio.AbstractEventLoop:
    """The driver part of the pool keys of this task's requests: its event loop (a socket
    owned by one loop cannot be used from another)."""
    return asyncio.get_running_loop()


#: What the requests of one key wait on together while one of them opens the key's HTTP/2
#: connection (`toolpool._h2pool.KeyConnections.borrow`).
Event = asyncio.Event


class _WaitTimedOut(Exception):
    pass


class Notifier:
    """Wakes a waiting task from whichever thread grants it a slot."""

    __slots__ = ("fut", "loop", "thread")

    def __init__(self) -> None:
        self.loop = loop = asyncio.get_running_loop()
        self.fut: asyncio.Future[None] = loop.create_future()
        self.thread = get_ident()

    async def wait(self, timeout: float) -> bool:
        """Wait until woken; False if `timeout` (seconds, or math.inf) passed first."""
        if timeout == math.inf:
            await self.fut
            return True
        handle = self.loop.call_later(timeout, time_out, self.fut, _WaitTimedOut())
        try:
            await self.fut
        except _WaitTimedOut:
            return False
        finally:
            handle.cancel()
        return True

    def __call__(self) -> bool:
        if get_ident() == self.thread:
            _resolve(self.fut)
            return True
        try:
            self.loop.call_soon_threadsafe(_resolve, self.fut)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            return False
        return True


class _ReadDeadlines:
    """Read timeouts of one event loop's connections, checked by one periodic timer.

    A timer per wait (call_later + cancel) costs more than the rest of a small request's
    bookkeeping; a dict entry per waiting connection and one sweep every `_SWEEP` seconds
    while any wait is pending cost almost nothing. Timeouts fire up to `_SWEEP` late.
    """

    __slots__ = ("__weakref__", "handle", "loop", "waiting")

    _by_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ReadDeadlines]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: dict[AsyncConnection, float] = {}
        self.handle: asyncio.TimerHandle | None = None

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _ReadDeadlines:
        sweep = cls._by_loop.get(loop)
        if sweep is None:
            sweep = cls._by_loop[loop] = cls(loop)
        return sweep

    def start(self) -> None:
        self.handle = self.loop.call_later(_SWEEP, self._sweep)

    def _sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        for conn, deadline in list(self.waiting.items()):
            if deadline <= now:
                del self.waiting[conn]
                waiter = conn.waiter
                if waiter is not None:
                    conn.waiter = None
                    time_out(waiter, httpx.ReadTimeout("read timed out"))
        if self.waiting:
            self.start()


class AsyncConnection(asyncio.Protocol):
    """One HTTP/1.1 connection on an asyncio transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop, dest: DestinationPool, slot: Slot) -> None:
        self.loop = loop
        self.thread = get_ident()
        self.dest = dest
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self.unread_or_eof = _NO_SOCKET  # the stale check of its socket, once connected
        self.parser = ResponseParser()
        self.waiter: asyncio.Future[None] | None = None
        self.error: Exception | None = None
        self.alive = True  # False once the peer closed, an error happened, or we closed
        self.lost = False  # connection_lost has run
        self.active = False  # a request is using the connection
        self.reading_paused = False
        self.writing_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.close_timer: asyncio.TimerHandle | None = None
        self.closing = False
        # Set when its connect was abandoned: the slot's close is reported by whoever
        # closes the original socket, not by this transport (which ran on a duplicate).
        self.abandoned = False
        self.sweep = _ReadDeadlines.of(loop)
        self.tcp_done: float | None = None  # when TCP connected (before any TLS handshake)
        self.read_timeout: float | None = None  # the current request's, for its body too

    def tcp_connected(self) -> AsyncConnection:
        """The protocol factory: asyncio calls it once TCP is connected, before TLS."""
        self.tcp_done = monotonic()
        return self

    # ------------------------------------------------------------------ protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.unread_or_eof = ReadCheck(sock.fileno())

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes on an idle connection: the peer is closing it or misbehaving.
            self.alive = False
            return
        try:
            self.parser.feed(data)
        except ProtocolError as exc:
            self.error = httpx.RemoteProtocolError(str(exc))
            self.alive = False
        if self.parser.pending > _HIGH_WATER and not self.reading_paused:
            self.reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def eof_received(self) -> bool | None:
        self.alive = False
        if self.active:
            self.parser.feed_eof()
        self._wake()
        return None  # let the transport close itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.lost = True
        if self.active:
            self.parser.feed_eof()
            if exc is not None and self.error is None and self.parser.got_bytes:
                self.error = httpx.ReadError(f"connection lost: {exc}")
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None
        self._wake()
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)
        if not self.abandoned:
            self.dest.connection_lost(self.slot)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        drain = self.drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # ------------------------------------------------------------------ used by requests

    async def wait(self, timeout: float | None) -> None:
        """Wait until more of the response (or an EOF/error) arrives."""
        fut = self.loop.create_future()
        self.waiter = fut
        if timeout is None:
            await fut
            return
        sweep = self.sweep
        sweep.waiting[self] = self.loop.time() + timeout
        if sweep.handle is None:
            sweep.start()
        try:
            await fut
        finally:
            sweep.waiting.pop(self, None)

    async def _drain(self, timeout: float | None) -> None:
        while self.writing_paused and not self.lost:
            fut = self.loop.create_future()
            self.drain_waiter = fut
            handle = (
                self.loop.call_later(timeout, time_out, fut, httpx.WriteTimeout("write timed out"))
                if timeout is not None
                else None
            )
            try:
                await fut
            finally:
                if handle is not None:
                    handle.cancel()
                self.drain_waiter = None

    async def exchange(self, req: RequestBytes, timeouts: dict[str, float | None]) -> ResponseHead:
        """Send the request and wait for the response head."""
        transport = self.transport
        assert transport is not None
        if not self.alive or transport.is_closing():
            raise Stale("connection closed by the peer while idle")
        parser = self.parser
        parser.start(req.head_request)
        self.active = True
        body = req.body
        if body is not None:
            transport.write(req.head + body if len(body) < 65536 else req.head)
            if len(body) >= 65536:
                transport.write(body)
        else:
            transport.write(req.head)
            write_timeout = timeouts.get("write")
            async for chunk in req.stream:
                if chunk:
                    transport.write(encode_chunk(chunk) if req.chunked else chunk)
                    if self.writing_paused:
                        await self._drain(write_timeout)
                if self.lost:
                    break
            if req.chunked and not self.lost:
                transport.write(LAST_CHUNK)
        if self.writing_paused:
            await self._drain(timeouts.get("write"))
        self.read_timeout = read_timeout = timeouts.get("read")
        while parser.head is None:
            if self.error is not None:
                raise self.error
            if not self.alive:
                if not parser.got_bytes:
                    raise Stale("Server disconnected without sending a response.")
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            await self.wait(read_timeout)
        return parser.head

    async def read_more(self) -> None:
        """Wait for more of the response body; raise if the connection failed or closed."""
        if self.error is not None:
            raise self.error
        if not self.alive:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        await self.wait(self.read_timeout)

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.lost:
            self.reading_paused = False
            self.transport.resume_reading()

    def probe(self) -> bool:
        """The stale check before every reuse: nothing received while idle (the event loop
        reports closes and bytes as they come), not closing, and nothing unread in the
        socket right now (bytes the loop has not delivered yet)."""
        transport = self.transport
        return (
            self.alive
            and transport is not None
            and not transport.is_closing()
            and not self.unread_or_eof()
        )

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Close gracefully, from any thread; `dest.connection_lost(slot)` follows once."""
        if self.loop.is_closed():
            # Its event loop is gone (asyncio.run returned): no graceful close is possible.
            self._abort_socket()
            return
        if get_ident() == self.thread:
            self._close()
            return
        try:
            self.loop.call_soon_threadsafe(self._close)
        except RuntimeError:
            self._abort_socket()

    def abort(self) -> None:
        """Drop a connection found dead; no report follows for its (replaced) slot."""
        self.alive = False
        if self.loop.is_closed():
            self._abort_socket()
        elif get_ident() == self.thread:
            if self.transport is not None and not self.lost:
                self.transport.abort()
        else:
            self.close()

    def _close(self) -> None:
        if self.closing:
            return
        self.closing = True
        self.active = False
        self.alive = False
        transport = self.transport
        if self.lost or transport is None:
            self.dest.connection_lost(self.slot)
            return
        if transport.can_write_eof():
            # Half-close: the peer sees our FIN, closes its side, and only then is the slot
            # free, so the downstream never counts more connections than the cap.
            transport.write_eof()
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        else:
            transport.close()  # TLS: close_notify exchange, then connection_lost
        self.close_timer = self.loop.call_later(_CLOSE_GRACE, transport.abort)

    def _abort_socket(self) -> None:
        """Close the socket without its (closed) event loop, and report the slot closed."""
        transport = self.transport
        wrapped = transport.get_extra_info("socket") if transport is not None else None
        # asyncio hands out a TransportSocket view that cannot close; the socket it wraps can.
        sock = getattr(wrapped, "_sock", wrapped)
        if sock is not None:
            try:
                sock.close()
            except (OSError, AttributeError):
                pass
        if not self.lost:
            self.lost = True
            self.alive = False
            self.dest.connection_lost(self.slot)


async def connect(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> AsyncConnection:
    """Open a connection (TCP, then TLS) for the slot; on failure report it and raise.

    The TCP socket stays ours until the transport runs on a duplicate of it, so that a
    connect abandoned at any point (cancelled, timed out, TLS refused) is closed gracefully
    and its slot counted until the peer has seen the close: the downstream's own count of
    connections never exceeds the cap, cancellations included."""
    loop = asyncio.get_running_loop()
    conn = AsyncConnection(loop, dest, slot)
    connecting: list[socket.socket] = []
    try:
        sslctx = dest.ssl_context(ctx)
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the connect completes (CPython gh-86296), leaving the request running.
        async with asyncio.timeout(timeout):
            sock = await _tcp_checked(dest, loop, connecting)
            await loop.create_connection(
                conn.tcp_connected,
                sock=sock.dup(),
                ssl=sslctx,
                server_hostname=dest.host if sslctx is not None else None,
                ssl_shutdown_timeout=_CLOSE_GRACE if sslctx is not None else None,
            )
    except BaseException as exc:
        conn.abandoned = True
        if conn.transport is not None:
            conn.transport.abort()
        if connecting and _established(connecting[0]):
            # The peer may count it already: the slot is freed once it saw the close.
            dest.abandon(slot, connecting[0])
        else:
            # Not established: closing it aborts the connect before the peer has a
            # connection to count (a late SYN-ACK is answered with a reset).
            for sock in connecting:
                sock.close()
            dest.open_failed(slot)
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    sock.close()  # the transport has its own descriptor of the connection
    return conn


async def open_h2(
    dest: DestinationPool, sslctx: ssl.SSLContext, timeout: float | None, timing: Any = None
) -> AsyncH2Connection | None:
    """TCP (egress-checked) and TLS with `sslctx`, which offers ``h2`` by ALPN: the HTTP/2
    connection (its preface sent), or None when the server picked http/1.1 (that
    connection is closed). `timing` (a `toolpool._h2pool.Connecting`), when given, gets
    when TCP (`tcp_done`) and TLS (`tls_done`) were done."""
    loop = asyncio.get_running_loop()
    connecting: list[socket.socket] = []
    transport: asyncio.Transport | None = None
    try:
        async with asyncio.timeout(timeout):
            sock = await _tcp_checked(dest, loop, connecting)
            # The transport runs on a duplicate, as in `connect`: a connect cancelled as its
            # handshake completes leaves asyncio shutting TLS down on its descriptor, and
            # closing ours below must not free a descriptor number asyncio still uses.
            if timing is not None:
                timing.tcp_done = monotonic()
            transport, _ = await loop.create_connection(
                Handshaken, sock=sock.dup(), ssl=sslctx, server_hostname=dest.host
            )
            if timing is not None:
                timing.tls_done = monotonic()
    except BaseException as exc:
        if transport is not None:
            transport.abort()
        for s in connecting:
            s.close()
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    sock.close()  # the transport has its own descriptor of the connection
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
        transport.close()
        return None
    return AsyncH2Connection.adopt(transport)


async def _tcp_checked(
    dest: DestinationPool, loop: asyncio.AbstractEventLoop, connecting: list[socket.socket]
) -> socket.socket:
    """Egress policy: resolve once, check every address, connect to checked ones only (the
    next one after a failed TCP connect, as `_egress.attempts` decides)."""
    for attempt in _egress.attempts(await _egress.aresolve(dest, loop)):
        with attempt as address:
            return await _tcp_connect(loop, address, dest.port, connecting)
    raise OSError(f"no address to connect to for {dest.host}")


def _established(sock: socket.socket) -> bool:
    """Whether the TCP handshake of `sock` completed (so the peer may have accepted it)."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


async def _tcp_connect(
    loop: asyncio.AbstractEventLoop, address: str, port: int, connecting: list[socket.socket]
) -> socket.socket:
    """A TCP socket connected to `address` (an IP address the egress policy checked). While
    the connect is under way the socket is in `connecting`, for the caller to close."""
    # A numeric address: no lookup, only its socket address form (an IPv6 zone included).
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST
    )[0]
    sock = socket.socket(family, kind, proto)
    connecting.append(sock)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, sockaddr)
    except OSError:
        connecting.remove(sock)
        sock.close()
        raise
    return sock


async def settled(conn: object) -> bool:
    """After a failed `probe` of a pooled connection: whether it is fit after all. A TLS
    socket readable while idle may hold only TLS records that carry no data, above all the
    session tickets a TLS 1.3 server sends after the handshake (they arrive while a fresh
    warm-up or preconnected connection waits, and a busy event loop may not have read them
    yet). Two loop iterations let the transport read them (the first polls the socket, the
    second runs its reader, which hands them to the TLS layer); then the check runs again.
    Plain TCP has no such records: its bytes are stale."""
    if not isinstance(conn, AsyncConnection):
        return False
    transport = conn.transport
    if (
        not conn.alive
        or transport is None
        or transport.is_closing()
        or transport.get_extra_info("ssl_object") is None
    ):
        return False
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    return conn.probe()
