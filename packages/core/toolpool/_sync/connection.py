"""The thread driver's connections: HTTP/1.1 on blocking sockets (plain or TLS), and how one
is opened.

A connection is used by one thread at a time; graceful closes are finished by the pool's
maintenance thread, so a releasing thread never blocks on a peer. Like every driver module it
executes what `_state` decides and never decides itself.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time
from typing import Any

import httpx

from toolpool import _auth_context, _egress
from toolpool._destination import DestinationPool, connect_error
from toolpool._h2io import SyncH2Connection
from toolpool._http11 import LAST_CHUNK, ProtocolError, ResponseHead, ResponseParser, encode_chunk
from toolpool._messages import ReadCheck, RequestBytes
from toolpool._state import Slot

__all__ = [
    "SYNC_DRIVER",
    "Event",
    "Notifier",
    "Stale",
    "SyncConnection",
    "connect",
    "current_driver",
    "open_h2",
    "settled",
]

monotonic = time.monotonic

# The driver part of pool keys for connections of the thread driver.
SYNC_DRIVER = "threads"
_RECV = 65536


class Stale(httpx.RemoteProtocolError):
    """The connection was closed by the peer before any byte of the response arrived."""


def current_driver() -> str:
    """The driver part of the pool keys of this thread's requests: the thread driver's
    connections are shared by all threads."""
    return SYNC_DRIVER


#: What the requests of one key wait on together while one of them opens the key's HTTP/2
#: connection (`toolpool._h2pool.KeyConnections.borrow`).
Event = threading.Event


class Notifier:
    """Wakes a waiting thread: a lock it blocks on, released by whoever grants its slot."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def __call__(self) -> bool:
        self._lock.release()
        return True

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(timeout=-1 if timeout == math.inf else timeout)


class SyncConnection:
    """One HTTP/1.1 connection on a blocking socket (plain or TLS)."""

    __slots__ = (
        "active",
        "alive",
        "closing",
        "dest",
        "parser",
        "slot",
        "sock",
        "tcp_done",
        "unread_or_eof",
    )

    def __init__(self, dest: DestinationPool, slot: Slot, sock: socket.socket) -> None:
        self.dest = dest
        self.slot = slot
        self.sock = sock
        self.unread_or_eof = ReadCheck(sock.fileno())
        self.parser = ResponseParser()
        self.alive = True
        self.active = False
        self.closing = False
        self.tcp_done: float | None = None  # when TCP connected (before any TLS handshake)

    def exchange(self, req: RequestBytes, timeouts: dict[str, float | None]) -> ResponseHead:
        """Send the request and read until the response head is in."""
        sock = self.sock
        parser = self.parser
        parser.start(req.head_request)
        self.active = True
        try:
            sock.settimeout(timeouts.get("write"))
            if req.body is not None:
                sock.sendall(req.head + req.body)
            else:
                sock.sendall(req.head)
                for chunk in req.stream:
                    if chunk:
                        sock.sendall(encode_chunk(chunk) if req.chunked else chunk)
                if req.chunked:
                    sock.sendall(LAST_CHUNK)
        except TimeoutError:
            self.alive = False
            raise httpx.WriteTimeout("write timed out") from None
        except OSError as exc:
            self.alive = False
            raise Stale(f"connection closed by the peer: {exc}") from None
        sock.settimeout(timeouts.get("read"))
        while parser.head is None:
            self.read_more()
        return parser.head

    def read_more(self) -> None:
        """Receive once and feed the parser; raise on timeout, error or early EOF."""
        parser = self.parser
        try:
            data = self.sock.recv(_RECV)
        except TimeoutError:
            self.alive = False
            raise httpx.ReadTimeout("read timed out") from None
        except OSError as exc:
            self.alive = False
            if not parser.got_bytes:
                raise Stale(f"connection closed by the peer: {exc}") from None
            raise httpx.ReadError(f"connection lost: {exc}") from None
        if not data:
            self.alive = False
            parser.feed_eof()
            if parser.complete:
                return
            if not parser.got_bytes:
                raise Stale("Server disconnected without sending a response.")
            if parser.head is None:
                raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )
        try:
            parser.feed(data)
        except ProtocolError as exc:
            self.alive = False
            raise httpx.RemoteProtocolError(str(exc)) from None

    # What the request path asks of both drivers' connections (see `_async.connection`): a
    # blocking socket raises its errors as they happen and reads only when asked.
    error: Exception | None = None

    def resume_reading(self) -> None:
        """Nothing to resume: a blocking socket is read only when the body is iterated."""

    def probe(self) -> bool:
        """The stale check before every reuse: readable now means unread bytes or EOF
        (and a TLS socket may hold decrypted bytes of its own). On TLS, a readable socket
        may hold only records that carry no data, above all the session tickets a TLS 1.3
        server sends after the handshake (they arrive while a fresh warm-up or preconnected
        connection waits): a non-blocking read lets the TLS layer take them, and only data
        or EOF make the connection stale."""
        if not self.alive:
            return False
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            return not self.unread_or_eof()
        if sock.pending():
            return False
        if not self.unread_or_eof():
            return True
        timeout = sock.gettimeout()
        try:
            sock.setblocking(False)
            sock.recv(1)  # data (stray bytes) or b"" (EOF): stale either way
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True  # only TLS records without data, now read
        except (OSError, ValueError):
            return False
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
        return False

    def close(self) -> None:
        """Close gracefully; the maintenance thread reports `connection_lost` when done."""
        if self.closing:
            return
        self.closing = True
        self.alive = False
        self.active = False
        self.dest.pool._maintenance().close_gracefully(self.sock, self._closed)

    def _closed(self) -> None:
        self.dest.connection_lost(self.slot)

    def abort(self) -> None:
        """Drop a connection found dead; no report follows for its (replaced) slot."""
        self.alive = False
        self.closing = True
        try:
            self.sock.close()
        except OSError:
            pass


def connect(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> SyncConnection:
    """Open a connection (TCP, then TLS) for the slot; on failure report it and raise.

    As in `_async.connection.connect`, a connection that fails after TCP connected (a refused TLS
    handshake) is closed gracefully, its slot counted until the peer has seen the close."""
    raw: socket.socket | None = None
    tcp_done: float | None = None
    try:
        sslctx = dest.ssl_context(ctx)
        raw = _tcp_checked(dest, timeout)
        tcp_done = monotonic()
        # TLS runs on a duplicate: a failed handshake closes that, not the connection.
        sock = sslctx.wrap_socket(raw.dup(), server_hostname=dest.host) if sslctx else raw
    except BaseException as exc:
        if raw is not None:
            dest.abandon(slot, raw)
        else:
            dest.open_failed(slot)
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    if sock is not raw:
        raw.close()
    conn = SyncConnection(dest, slot, sock)
    conn.tcp_done = tcp_done
    return conn


def open_h2(
    dest: DestinationPool, sslctx: ssl.SSLContext, timeout: float | None, timing: Any = None
) -> SyncH2Connection | None:
    """TCP (egress-checked) and TLS with `sslctx`, which offers ``h2`` by ALPN: the HTTP/2
    connection (its preface sent), or None when the server picked http/1.1 (that
    connection is closed). `timing` (a `toolpool._h2pool.Connecting`), when given, gets
    when TCP (`tcp_done`) and TLS (`tls_done`) were done."""
    try:
        sock = _tcp_checked(dest, timeout)
        if timing is not None:
            timing.tcp_done = monotonic()
        try:
            tls = sslctx.wrap_socket(sock, server_hostname=dest.host)
        except BaseException:
            sock.close()
            raise
        if timing is not None:
            timing.tls_done = monotonic()
    except BaseException as exc:
        err = connect_error(dest, exc, timeout)
        if err is exc:
            raise
        raise err from exc
    if tls.selected_alpn_protocol() != "h2":
        tls.close()
        return None
    tls.settimeout(None)
    return SyncH2Connection(tls)


def _tcp_checked(dest: DestinationPool, timeout: float | None) -> socket.socket:
    """Egress policy: resolve once, check every address, connect to checked ones only (the
    next one after a failed TCP connect, as `_egress.attempts` decides), all within
    `timeout`."""
    deadline = None if timeout is None else monotonic() + timeout
    for attempt in _egress.attempts(_egress.resolve(dest)):
        remaining = None if deadline is None else max(0.001, deadline - monotonic())
        with attempt as address:
            sock = socket.create_connection((address, dest.port), timeout=remaining)
        if attempt.connected:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
    raise OSError(f"no address to connect to for {dest.host}")


def settled(conn: object) -> bool:
    """After a failed `probe`: never fit here (the asyncio driver's twin lets its event loop
    read TLS records without data; a blocking TLS socket's `probe` reads them itself)."""
    return False
