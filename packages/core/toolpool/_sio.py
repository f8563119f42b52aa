"""The thread driver: blocking-socket connections and the sync request path.

Safe to use from many threads at once: threads meet only in the destination's state machine
(behind its lock); a connection is used by one thread at a time. Like the asyncio driver it
executes `_state`'s decisions and never decides itself. Graceful closes are finished by the
pool's maintenance thread, so a releasing thread never blocks on a peer.
"""

from __future__ import annotations

import math
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx

from toolpool import _auth_context, _egress
from toolpool._aio import _connect_limit, _wait_limit
from toolpool._http11 import LAST_CHUNK, ProtocolError, ResponseHead, ResponseParser, encode_chunk
from toolpool._runtime import DestinationPool, counted_calls, pool_key
from toolpool._state import Slot, Waiter, retry_stale
from toolpool._wire import NO_TIMEOUTS, RequestBytes, make_response, unread_or_eof
from toolpool.errors import PoolClosed

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["SYNC_DRIVER", "SyncConnection", "SyncResponseStream", "handle_request"]

monotonic = time.monotonic
_current_auth = _auth_context._current

# The driver part of pool keys for connections of the thread driver.
SYNC_DRIVER = "threads"
_RECV = 65536


class _Stale(httpx.RemoteProtocolError):
    """The connection was closed by the peer before any byte of the response arrived."""


class _Notifier:
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

    __slots__ = ("active", "alive", "closing", "dest", "parser", "slot", "sock", "tcp_done")

    def __init__(self, dest: DestinationPool, slot: Slot, sock: socket.socket) -> None:
        self.dest = dest
        self.slot = slot
        self.sock = sock
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
            raise _Stale(f"connection closed by the peer: {exc}") from None
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
                raise _Stale(f"connection closed by the peer: {exc}") from None
            raise httpx.ReadError(f"connection lost: {exc}") from None
        if not data:
            self.alive = False
            parser.feed_eof()
            if parser.complete:
                return
            if not parser.got_bytes:
                raise _Stale("Server disconnected without sending a response.")
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

    def probe(self) -> bool:
        """The stale check before every reuse: readable now means unread bytes or EOF
        (and a TLS socket may hold decrypted bytes of its own)."""
        if not self.alive:
            return False
        sock = self.sock
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return False
        return not unread_or_eof(sock.fileno())

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


class SyncResponseStream(httpx.SyncByteStream):
    """A response body read from its connection; releases the connection when done."""

    __slots__ = ("_conn", "_dest", "_done", "_slot")

    def __init__(self, dest: DestinationPool, slot: Slot, conn: SyncConnection) -> None:
        self._dest = dest
        self._slot = slot
        self._conn = conn
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        conn = self._conn
        parser = conn.parser
        try:
            while True:
                chunk = parser.take_body()
                if parser.complete:
                    self._finish(parser.reusable)
                    if chunk:
                        yield chunk
                    return
                if chunk:
                    yield chunk
                    continue
                conn.read_more()
        except BaseException:
            self._finish(False)
            raise

    def close(self) -> None:
        # A body already received in full leaves the connection reusable (see _aio).
        parser = self._conn.parser
        self._finish(parser.complete and parser.reusable)

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._conn.active = False
            self._dest.release(self._slot, reusable)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            self._dest.pool._orphaned(self._dest, self._slot)


def acquire(dest: DestinationPool, key: tuple[str | None, Any], timeout: float) -> Slot:
    """A slot for `key`: an idle connection, a permit to open one, or after waiting. A
    request of a call already counted (`counted_calls`) is never refused for a full queue."""
    state = dest.state
    counted = id(dest) in counted_calls.get()
    with dest.lock:
        got = state.acquire(key, monotonic(), None, counted)
        if type(got) is Waiter:
            notifier = _Notifier()
            got.notify = notifier
            actions = state.take_actions()
    if type(got) is Slot:
        return got
    if got is None:
        raise dest.saturated()
    assert isinstance(got, Waiter)
    waiter = got
    if actions:
        dest.execute(actions)
    try:
        granted = notifier.wait(timeout)
    except BaseException as exc:
        dest.cancel(waiter)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, exc)
        raise
    if not granted:
        err = dest.give_up(waiter, timeout)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, err)
        raise err
    if dest.probe is not None:
        dest.probe.waited(dest, waiter, None)
    slot = waiter.grant
    if slot is None:  # woken by pool shutdown
        raise PoolClosed()
    return slot


def connect(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> SyncConnection:
    """Open a connection (TCP, then TLS) for the slot; on failure report it and raise.

    As in `_aio._connect`, a connection that fails after TCP connected (a refused TLS
    handshake) is closed gracefully, its slot counted until the peer has seen the close."""
    where = f"{dest.name} ({dest.host}:{dest.port})"
    raw: socket.socket | None = None
    tcp_done: float | None = None
    try:
        sslctx = dest.ssl_context(ctx)
        # Egress policy: resolve once, check every address, connect to checked ones only.
        addresses = _egress.resolve(dest)
        for address in addresses:
            try:
                raw = socket.create_connection((address, dest.port), timeout=timeout)
                break
            except OSError as exc:
                if not _egress.try_next(exc, address, addresses, None):
                    raise
        assert raw is not None
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp_done = monotonic()
        # TLS runs on a duplicate: a failed handshake closes that, not the connection.
        sock = sslctx.wrap_socket(raw.dup(), server_hostname=dest.host) if sslctx else raw
    except BaseException as exc:
        if raw is not None:
            dest.abandon(slot, raw)
        else:
            dest.open_failed(slot)
        if isinstance(exc, TimeoutError):
            raise httpx.ConnectTimeout(
                f"connecting to {where} timed out after {timeout} s"
            ) from exc
        if isinstance(exc, ssl.SSLError | ssl.CertificateError):
            raise httpx.ConnectError(f"TLS handshake with {where} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise httpx.ConnectError(f"cannot connect to {where}: {exc}") from exc
        raise
    if sock is not raw:
        raw.close()
    conn = SyncConnection(dest, slot, sock)
    conn.tcp_done = tcp_done
    return conn


def open_slot(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> SyncConnection:
    """Open the permit's connection for the request holding it."""
    started = monotonic()
    try:
        conn = connect(dest, slot, ctx, timeout)
    except BaseException as exc:
        dest.connect_failed(started, exc)
        raise
    dest.connect_done(slot, conn, started)
    return conn


def warm(dest: DestinationPool, slot: Slot, ctx: _auth_context.AuthContext | None) -> bool:
    """Open one warm-up connection into the idle pool; True if it opened."""
    started = monotonic()
    try:
        conn = connect(dest, slot, ctx, dest.settings.connect_timeout)
    except httpx.TransportError:
        return False
    dest.warmed(slot, conn, monotonic() - started)
    return True


def handle_request(pool: Pool, request: httpx.Request) -> httpx.Response:
    """Send one request through the pool (the body of Transport.handle_request); see
    `_aio.handle_request` for the layering of `sync_send`."""
    dest = pool._route(request.url)
    return dest.sync_send(request, _current_auth.get())


def send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on a pooled connection of `ctx`'s key (see `_aio.send`)."""
    key = pool_key(ctx, SYNC_DRIVER)
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    req = RequestBytes(request)
    asked = monotonic()
    probe = dest.probe
    if probe is not None:
        probe.attempt(dest, asked)
    slot = acquire(dest, key, _wait_limit(dest, timeouts))
    waited = monotonic() - asked
    retried = False
    while True:
        # Every reuse is checked for staleness (the rule lives in _state.replace).
        slot = dest.checked_lease(slot)
        conn: SyncConnection | None = slot.conn
        fresh = conn is None
        if conn is None:
            conn = open_slot(dest, slot, ctx, _connect_limit(dest, timeouts))
        sent = monotonic() if probe is not None else 0.0
        try:
            head = conn.exchange(req, timeouts)
        except _Stale as exc:
            if probe is not None:
                probe.exchanged(dest, sent, None, exc)
            if retry_stale(not fresh, retried, req.replayable):
                # A reused connection the peer had closed: retry once on a new one.
                retried = True
                slot = dest.replace(slot)
                continue
            conn.active = False
            dest.release(slot, False)
            raise
        except BaseException as exc:
            if probe is not None:
                probe.exchanged(dest, sent, None, exc)
            conn.active = False
            dest.release(slot, False)
            raise
        break
    if probe is not None:
        probe.exchanged(dest, sent, head.status, None)
    dest.response_started(slot, head.headers)
    stream = SyncResponseStream(dest, slot, conn)
    return make_response(head, stream, dest.name, slot.id, not fresh, waited)


def preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> None:
    """Make sure an idle connection of `ctx`'s key exists (see `_aio.preconnect`)."""
    got = dest.lease_if_room(pool_key(ctx, SYNC_DRIVER))
    if got is None:
        return
    if got.conn is None:
        try:
            open_slot(dest, got, ctx, timeout or dest.settings.connect_timeout)
        except httpx.TransportError:
            return
    dest.release(got, True)
