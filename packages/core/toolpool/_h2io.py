"""HTTP/2 connections with I/O: asyncio and threads around the sans-I/O :class:`H2Client`.

Both classes only move bytes and wake waiters; what a frame means and what may happen next is
decided in ``toolpool._h2``. Each takes an ``httpx.Request`` and returns an ``httpx.Response``
whose stream reads the body as it arrives (acknowledging it to the server's flow-control
window as it is read) and, closed early, cancels the stream with RST_STREAM while the
connection carries on.

- :class:`AsyncH2Connection`: an ``asyncio.Protocol``; one event loop, no task of its own.
- :class:`SyncH2Connection`: a connected (TLS) socket shared by threads. Writes and reads
  hold one I/O lock (an SSL object must not be used by two threads at once); a thread that
  waits for its stream reads for everybody while it holds the read turn, the others wait on
  a condition that every read notifies.

The pool's drivers (``toolpool._async.connection`` / ``_sync``) connect, offer ``h2`` by ALPN
and hand an ``h2`` transport or socket over (:meth:`AsyncH2Connection.adopt`,
:class:`SyncH2Connection`).
"""

from __future__ import annotations

import asyncio
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Generic, TypeVar

import httpx

from toolpool._h2 import ConnectionFailed, H2Client, Stream, StreamNotProcessed

__all__ = [
    "AsyncH2Connection",
    "NoNewStream",
    "StreamTrace",
    "SyncH2Connection",
    "request_parts",
]

#: Request body bytes queued per stream before the sender waits for the server's window.
_SEND_HIGH_WATER = 256 * 1024
#: Background PINGs under way (`check_in_background`), kept referenced until done.
_checks: set[asyncio.Future[None]] = set()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class NoNewStream(StreamNotProcessed):
    """The connection took no new stream (it is at the server's stream limit, or going away):
    nothing of the request was sent, so another connection may take it whatever its body.
    A pool that checked the connection first meets it when another thread filled the last
    stream, or a GOAWAY arrived, in between."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "no_new_stream")


def request_parts(
    request: httpx.Request,
) -> tuple[bytes, bytes, bytes, bytes, list[tuple[bytes, bytes]]]:
    """(method, scheme, authority, path, headers) of ``request`` for HTTP/2."""
    url = request.url
    authority = request.headers.get("host", "").encode("ascii") or url.netloc
    headers = [(k.lower(), v) for k, v in request.headers.raw]
    return request.method.encode("ascii"), url.raw_scheme, authority, url.raw_path, headers


class StreamTrace:
    """What a traced request learns of its stream, for `toolpool.otel` (a pool passes one
    only when its destination is traced): when a request with a body was fully sent
    (END_STREAM out, after flow control; None without a body, or if it never was), and
    whether a failed stream was reset with RST_STREAM(CANCEL) while the connection carried
    on."""

    __slots__ = ("reset", "sent_at")

    def __init__(self) -> None:
        self.sent_at: float | None = None
        self.reset = False


def _has_no_body(request: httpx.Request) -> bool:
    return request.headers.get("content-length") in ("0", None) and (
        "transfer-encoding" not in request.headers
    )


def _timeout(request: httpx.Request, key: str) -> float | None:
    value = request.extensions.get("timeout", {}).get(key)
    return None if value is None else float(value)


class _H2Connection:
    """What both connections share: the sans-I/O state and the readings and rules a pool
    asks of a connection, whatever its driver."""

    state: H2Client
    #: Driver time (the loop's, or time.monotonic()) of the last stream activity.
    last_used: float

    def _init_pool_fields(self) -> None:
        #: When a pool drains this connection (max lifetime), on time.monotonic(); or None.
        self.expires_at: float | None = None
        #: When the maintenance thread last scheduled a PING of this idle connection.
        self.pinged_at = 0.0
        #: Why the pool closes or drains it ("lifetime", "health", ...), for its metrics;
        #: None: closed by the server or by an error.
        self.close_reason: str | None = None
        #: When the server's SETTINGS arrived (time.monotonic()), or None (not yet).
        self.settings_at: float | None = None
        #: Called once the SETTINGS arrived or the connection is gone (`when_settled`).
        self._on_settled: Callable[[], None] | None = None

    def _settled_callback(self) -> Callable[[], None] | None:
        """Notes the SETTINGS' arrival; the `when_settled` callback, once, when it is due (the
        SETTINGS arrived or the connection is gone). Call with the driver's lock held."""
        if self.settings_at is None and self.state.settings_received:
            self.settings_at = time.monotonic()
        callback = self._on_settled
        if callback is not None and (self.state.settings_received or self.state.closed):
            self._on_settled = None
            return callback
        return None

    @property
    def is_available(self) -> bool:
        """It can take a new stream now."""
        return self.state.accepting

    @property
    def is_closed(self) -> bool:
        return self.state.closed

    def _idle_at(self, now: float) -> float:
        return 0.0 if self.state.streams else now - self.last_used

    def _settings_missing(self) -> bool:
        """True until the server's SETTINGS arrived; the error when it closed before."""
        if self.state.settings_received:
            return False
        if self.state.closed:
            error = self.state.error
            if error is not None:
                raise error.again()
            raise ConnectionFailed("the HTTP/2 connection closed before the server's SETTINGS")
        return True

    def _finish(self, stream: Stream, *, cancel: bool) -> bool:
        """The caller is done with `stream`: `_end_stream` on the driver's clock, under its
        lock, then what the connection owes (the frames, closing when done). True when a
        RST_STREAM was sent."""
        raise NotImplementedError

    def _end_stream(self, stream: Stream, cancel: bool, now: float) -> bool:
        """The caller is done with `stream`: reset it if unfinished (RST_STREAM), else
        forget it; the connection is idle from `now` if it was the last one. True when a
        RST_STREAM was sent."""
        reset = False
        if cancel:
            reset = self.state.cancel(stream)
        else:
            self.state.release(stream)
        self.last_used = now
        return reset

    def _response(self, stream: Stream, body: Any, streams: int) -> httpx.Response:
        """The response of `stream`, which opened beside `streams` - 1 others."""
        assert stream.status is not None
        return httpx.Response(
            stream.status,
            headers=[(k, v) for k, v in stream.headers if not k.startswith(b":")],
            stream=body,
            extensions={
                "http_version": b"HTTP/2",
                "stream_id": stream.stream_id,
                "streams": streams,
            },
        )


_Conn = TypeVar("_Conn", bound=_H2Connection)


class _Body(Generic[_Conn]):
    """What `_AsyncBody` and `_SyncBody` share: the stream a response body reads, and its
    end, once: a body closed before the stream ended resets it (RST_STREAM)."""

    def __init__(self, conn: _Conn, stream: Stream, timeout: float | None) -> None:
        self._conn = conn
        self._stream = stream
        self._timeout = timeout
        self._closed = False

    def _end(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn._finish(self._stream, cancel=not self._stream.done)


# -- asyncio ------------------------------------------------------------------------------


class Handshaken(asyncio.Protocol):
    """Holds what arrives between the TLS handshake and the adoption of the transport (the
    server's connection preface may come first); :meth:`AsyncH2Connection.adopt` replays it."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost = False
        self.lost_exc: Exception | None = None

    def data_received(self, data: bytes) -> None:
        self.received += data

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc


class AsyncH2Connection(_H2Connection, asyncio.Protocol):
    """One HTTP/2 connection on an asyncio transport (ALPN already chose ``h2``).

    ::

        transport, _ = await loop.create_connection(Handshaken, host, port, ssl=ctx)
        conn = AsyncH2Connection.adopt(transport)  # ALPN chose "h2"
        response = await conn.handle_async_request(httpx.Request("GET", url))
        await response.aread()
    """

    def __init__(self) -> None:
        self.state = H2Client()
        self.transport: asyncio.Transport | None = None
        self._waiters: dict[int, asyncio.Event] = {}
        self._connection_event = asyncio.Event()
        #: Loop time of the last stream activity (what "idle for" counts from).
        self.last_used = 0.0
        self.opened_at = 0.0
        self._init_pool_fields()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._fences: dict[bytes, Callable[[], None]] = {}

    @classmethod
    def adopt(cls, transport: asyncio.Transport) -> AsyncH2Connection:
        """Run HTTP/2 on ``transport`` from now on (its protocol is replaced)."""
        conn = cls()
        before = transport.get_protocol()
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if isinstance(before, Handshaken):
            if before.received:
                conn.data_received(bytes(before.received))
            if before.lost:
                conn.connection_lost(before.lost_exc)
        return conn

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        self.opened_at = self.last_used = self.loop.time()
        transport.write(self.state.initiate())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        touched = self.state.receive(data)
        self._write()
        self._run_settled()
        if self._fences and self.state.pings_acked:
            for payload in [p for p in self._fences if self.state.ping_answered(p)]:
                self._fences.pop(payload)()
        self._wake(touched)
        self._close_if_done()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connection_lost(exc)
        self._wake(set(self._waiters) | {0})
        self._run_fences()
        self._run_settled()

    def _run_settled(self) -> None:
        callback = self._settled_callback()
        if callback is not None:
            callback()

    def when_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the server's SETTINGS arrived or the connection is gone
        (now, if so already), or at :meth:`settle`, whichever comes first. Call it on the
        connection's loop."""
        self._on_settled = callback
        self._run_settled()

    def settle(self) -> None:
        """The `when_settled` callback now, if it has not run yet."""
        callback, self._on_settled = self._on_settled, None
        if callback is not None:
            callback()

    def _run_fences(self) -> None:
        fences, self._fences = self._fences, {}
        for callback in fences.values():
            callback()

    def fence(self, callback: Callable[[], None], timeout: float | None = None) -> None:
        """Call ``callback`` once the server has processed everything sent so far (a PING
        sent now is answered), or the connection is gone; no answer within ``timeout``
        seconds: the connection is closed (then ``callback`` runs). A pool gives a cancelled
        stream's permit back this way: the server counts the stream until it read the
        RST_STREAM. Call it on the connection's loop."""
        if self.state.closed or self.transport is None or self.transport.is_closing():
            callback()
            return
        payload = self.state.ping()
        self._fences[payload] = callback
        self._write()
        if timeout is not None and self.loop is not None:
            self.loop.call_later(timeout, self._fence_expired, payload)

    def _fence_expired(self, payload: bytes) -> None:
        if payload in self._fences and not self.state.closed:
            self.close()  # runs the fences

    def _call_threadsafe(self, fn: Callable[[], None]) -> None:
        loop = self.loop
        if loop is None or loop.is_closed():
            return  # its connections closed with it
        try:
            if _running_loop() is loop:
                fn()
            else:
                loop.call_soon_threadsafe(fn)
        except RuntimeError:
            pass  # the loop closed meanwhile

    def drain_threadsafe(self) -> None:
        """:meth:`drain`, from any thread (the pool's maintenance thread, shutdown)."""
        self._call_threadsafe(self.drain)

    def check_in_background(self, timeout: float, dead: Callable[[], None]) -> None:
        """From any thread, without waiting: PING on the connection's loop, and call
        ``dead()`` there when no answer comes within ``timeout`` seconds."""

        async def check() -> None:
            if not await self.ping(timeout):
                dead()

        def start() -> None:
            task = asyncio.ensure_future(check())
            _checks.add(task)
            task.add_done_callback(_checks.discard)

        self._call_threadsafe(start)

    # -- plumbing ------------------------------------------------------------------------

    def _write(self) -> None:
        data = self.state.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _wake(self, touched: set[int]) -> None:
        if 0 in touched:
            self._connection_event.set()
            touched = set(self._waiters)  # windows / GOAWAY / errors concern every stream
        for sid in touched:
            event = self._waiters.get(sid)
            if event is not None:
                event.set()

    def _close_if_done(self) -> None:
        if self.state.should_close:
            self.close()

    def idle_for(self) -> float:
        """Seconds since the last stream activity (0 while streams are open). Callable from
        any thread (the maintenance thread asks too): the loop's clock is read, not run."""
        loop = self.loop
        return self._idle_at(loop.time() if loop is not None else time.monotonic())

    def drain(self) -> None:
        """No new streams; close once the open ones finish (max lifetime, gracefully)."""
        self.state.drain()
        self._close_if_done()

    def close(self) -> None:
        """GOAWAY and close now; open streams fail."""
        data = self.state.close()
        self._wake(set(self._waiters) | {0})
        self._run_fences()
        if self.transport is not None and not self.transport.is_closing():
            if data:
                self.transport.write(data)
            self.transport.close()
        self._run_settled()

    async def settings(self, timeout: float | None) -> None:
        """Wait for the server's SETTINGS (its stream limit), sent right after the handshake."""
        async with asyncio.timeout(timeout):
            while self._settings_missing():
                self._connection_event.clear()
                await self._connection_event.wait()

    async def ping(self, timeout: float) -> bool:
        """True when the server answers a PING within ``timeout`` seconds."""
        if self.state.closed:
            return False
        payload = self.state.ping()
        self._write()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while not self.state.ping_answered(payload):
                remaining = deadline - loop.time()
                if self.state.closed or remaining <= 0:
                    return False
                self._connection_event.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._connection_event.wait()
                except TimeoutError:
                    return False
            return True
        finally:
            self.state.forget_ping(payload)

    # -- requests ------------------------------------------------------------------------

    async def _wait(self, stream: Stream, timeout: float | None, what: str) -> None:
        event = self._waiters[stream.stream_id]
        event.clear()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the event is set (CPython gh-86296), and the request would run on.
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            exc_type = httpx.WriteTimeout if what == "write" else httpx.ReadTimeout
            raise exc_type(f"no HTTP/2 {what} progress within {timeout} s") from None

    def _finish(self, stream: Stream, *, cancel: bool) -> bool:
        self._waiters.pop(stream.stream_id, None)
        reset = self._end_stream(stream, cancel, asyncio.get_running_loop().time())
        self._write()
        self._close_if_done()
        return reset

    async def handle_async_request(
        self, request: httpx.Request, trace: StreamTrace | None = None
    ) -> httpx.Response:
        """Send ``request`` on a new stream; the response body streams as it arrives.

        Raises ``toolpool._h2.StreamNotProcessed`` when the server did not process it
        (retry it on another connection), other ``httpx`` errors otherwise. ``trace``, when
        given, is told when the request was fully sent and whether a failure reset the stream.
        The response's extensions say its ``stream_id`` and ``streams`` (the streams open on
        this connection when it opened, itself included).
        """
        if not self.state.accepting:
            raise NoNewStream("this HTTP/2 connection takes no new stream now")
        method, scheme, authority, path, headers = request_parts(request)
        no_body = _has_no_body(request)
        stream = self.state.open_stream(
            method, scheme, authority, path, headers, end_stream=no_body
        )
        streams = len(self.state.streams)
        self._waiters[stream.stream_id] = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.last_used = loop.time()
        self._write()
        try:
            if not no_body:
                await self._send_body(stream, request)
            read_timeout = _timeout(request, "read")
            # A request body's last byte went out (END_STREAM): told to a traced request.
            sending = trace if trace is not None and not no_body else None
            while stream.status is None:
                if sending is not None and sending.sent_at is None and stream.fully_sent:
                    sending.sent_at = loop.time()
                if stream.error is not None:
                    raise stream.error
                await self._wait(stream, read_timeout, "read")
            if sending is not None and sending.sent_at is None and stream.fully_sent:
                sending.sent_at = loop.time()
        except BaseException:
            reset = self._finish(stream, cancel=True)
            if trace is not None:
                trace.reset = reset
            raise
        return self._response(stream, _AsyncBody(self, stream, read_timeout), streams)

    async def _send_body(self, stream: Stream, request: httpx.Request) -> None:
        write_timeout = _timeout(request, "write")
        body = request.stream
        assert isinstance(body, httpx.AsyncByteStream)
        async for chunk in body:
            if stream.error is not None:
                raise stream.error
            if stream.request_sent:
                break  # complete response first (RFC 9113 8.1): read no more of the body
            self.state.send_body(stream, bytes(chunk), end=False)
            self._write()
            while self.state.outbound_pending(stream) > _SEND_HIGH_WATER:
                if stream.error is not None:
                    raise stream.error
                await self._wait(stream, write_timeout, "write")
            if stream.request_sent:
                break
        self.state.send_body(stream, b"", end=True)
        self._write()


class _AsyncBody(_Body[AsyncH2Connection], httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn, stream = self._conn, self._stream
        try:
            while True:
                chunk = conn.state.take_body(stream)
                if chunk is not None:
                    conn._write()  # the WINDOW_UPDATE that acknowledges it
                    if chunk:
                        yield chunk
                    continue
                if stream.error is not None:
                    raise stream.error
                if stream.ended:
                    break
                await conn._wait(stream, self._timeout, "read")
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()

    async def aclose(self) -> None:
        self._end()


# -- threads ------------------------------------------------------------------------------


class SyncH2Connection(_H2Connection):
    """One HTTP/2 connection on a connected socket, shared by threads (ALPN chose ``h2``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.state = H2Client()
        self._sock = sock
        self._io = threading.Lock()  # the socket (and the SSL object): one user at a time
        self._cond = threading.Condition(threading.Lock())  # the state, and waking waiters
        self._reading = False
        self.opened_at = self.last_used = time.monotonic()
        self._init_pool_fields()
        with self._cond:
            self._send_locked(self.state.initiate())

    # -- plumbing (call with self._cond held) --------------------------------------------

    def _send_locked(self, data: bytes | None = None) -> None:
        data = self.state.data_to_send() if data is None else data
        if not data or self.state.error is not None:
            return
        try:
            with self._io:
                self._sock.sendall(data)
        except OSError as exc:
            self.state.connection_lost(exc)
            self._run_settled_locked()
            self._cond.notify_all()

    def _run_settled_locked(self) -> None:
        # The callback (the pool's `KeyConnections.opened`) takes the pool's lock, never this
        # connection's: calling it with `_cond` held cannot deadlock.
        callback = self._settled_callback()
        if callback is not None:
            callback()

    def _read_turn_locked(self, deadline: float | None) -> None:
        """Read once for everybody (or wait for the reader); returns on news or deadline."""
        if self.state.closed:
            return
        if self._reading:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None or remaining > 0:
                self._cond.wait(remaining)
            return
        self._reading = True
        self._cond.release()
        data: bytes | None = None
        failure: BaseException | None = None
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            pending = isinstance(self._sock, ssl.SSLSocket) and self._sock.pending() > 0
            if pending or select.select([self._sock], [], [], remaining)[0]:
                with self._io:
                    data = self._sock.recv(1 << 18)
        except (OSError, ValueError) as exc:
            failure = exc
        finally:
            self._cond.acquire()
            self._reading = False
        if failure is not None:
            self.state.connection_lost(failure)
        elif data == b"":
            self.state.connection_lost(None)
        elif data:
            self.state.receive(data)
            self._send_locked()
            if self.state.should_close:
                self._close_locked()
        self._run_settled_locked()
        self._cond.notify_all()

    def _close_locked(self) -> None:
        data = self.state.close()
        if data:
            try:
                with self._io:
                    self._sock.sendall(data)
            except OSError:
                pass
        try:
            self._sock.close()
        except OSError:
            pass
        self._run_settled_locked()
        self._cond.notify_all()

    # -- public --------------------------------------------------------------------------

    def idle_for(self) -> float:
        """Seconds since the last stream activity (0 while streams are open)."""
        return self._idle_at(time.monotonic())

    def drain(self) -> None:
        with self._cond:
            self.state.drain()
            if self.state.should_close:
                self._close_locked()

    def close(self) -> None:
        with self._cond:
            self._close_locked()

    def settings(self, timeout: float | None) -> None:
        """Wait for the server's SETTINGS (its stream limit), sent right after the handshake."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._settings_missing():
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("no SETTINGS from the server")
                self._read_turn_locked(deadline)

    def drain_threadsafe(self) -> None:
        """:meth:`drain` (callable from any thread, as everything here)."""
        self.drain()

    def when_settled(self, callback: Callable[[], None]) -> None:
        """:meth:`AsyncH2Connection.when_settled` (called by whichever thread reads the
        SETTINGS, or closes the connection)."""
        with self._cond:
            self._on_settled = callback
            self._run_settled_locked()

    def settle(self) -> None:
        """The `when_settled` callback now, if it has not run yet."""
        with self._cond:
            callback, self._on_settled = self._on_settled, None
        if callback is not None:
            callback()

    def check_in_background(self, timeout: float, dead: Callable[[], None]) -> None:
        """Without waiting: PING on a short thread, and call ``dead()`` there when no
        answer comes within ``timeout`` seconds."""

        def check() -> None:
            if not self.ping(timeout):
                dead()

        threading.Thread(target=check, name="toolpool-h2-ping", daemon=True).start()

    def fence(self, callback: Callable[[], None], timeout: float = 2.0) -> None:
        """:meth:`AsyncH2Connection.fence`, blocking the caller until the PING is answered;
        no answer within ``timeout``: the connection is closed, then ``callback`` runs."""
        if not self.ping(timeout) and not self.state.closed:
            self.close()
        callback()

    def ping(self, timeout: float) -> bool:
        """True when the server answers a PING within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.state.closed:
                return False
            payload = self.state.ping()
            self._send_locked()
            try:
                while not self.state.ping_answered(payload):
                    if self.state.closed or time.monotonic() >= deadline:
                        return False
                    self._read_turn_locked(deadline)
                return True
            finally:
                self.state.forget_ping(payload)

    def _wait_locked(self, stream: Stream, ready: Any, timeout: float | None, what: str) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            if stream.error is not None:
                raise stream.error
            if deadline is not None and time.monotonic() >= deadline:
                exc_type = httpx.WriteTimeout if what == "write" else httpx.ReadTimeout
                raise exc_type(f"no HTTP/2 {what} progress within {timeout} s")
            self._read_turn_locked(deadline)

    def _finish(self, stream: Stream, *, cancel: bool) -> bool:
        with self._cond:
            reset = self._end_stream(stream, cancel, time.monotonic())
            self._send_locked()
            if self.state.should_close:
                self._close_locked()
            return reset

    def handle_request(
        self, request: httpx.Request, trace: StreamTrace | None = None
    ) -> httpx.Response:
        """Send ``request`` on a new stream (see :meth:`AsyncH2Connection.handle_async_request`)."""
        method, scheme, authority, path, headers = request_parts(request)
        no_body = _has_no_body(request)
        read_timeout = _timeout(request, "read")
        with self._cond:
            if not self.state.accepting:
                raise NoNewStream("this HTTP/2 connection takes no new stream now")
            stream = self.state.open_stream(
                method, scheme, authority, path, headers, end_stream=no_body
            )
            streams = len(self.state.streams)
            self.last_used = time.monotonic()
            self._send_locked()
        # A request body's last byte went out (END_STREAM): told to a traced request.
        sending = trace if trace is not None and not no_body else None

        def ready() -> bool:
            if sending is not None and sending.sent_at is None and stream.fully_sent:
                sending.sent_at = time.monotonic()
            return stream.status is not None or stream.error is not None

        try:
            if not no_body:
                self._send_body(stream, request)
            with self._cond:
                self._wait_locked(stream, ready, read_timeout, "read")
                if stream.status is None:
                    assert stream.error is not None
                    raise stream.error
        except BaseException:
            reset = self._finish(stream, cancel=True)
            if trace is not None:
                trace.reset = reset
            raise
        return self._response(stream, _SyncBody(self, stream, read_timeout), streams)

    def _send_body(self, stream: Stream, request: httpx.Request) -> None:
        write_timeout = _timeout(request, "write")
        body = request.stream
        assert isinstance(body, httpx.SyncByteStream)
        for chunk in body:
            with self._cond:
                if stream.error is not None:
                    raise stream.error
                if stream.request_sent:
                    break  # complete response first (RFC 9113 8.1): read no more of the body
                self.state.send_body(stream, bytes(chunk), end=False)
                self._send_locked()
                self._wait_locked(
                    stream,
                    lambda: self.state.outbound_pending(stream) <= _SEND_HIGH_WATER,
                    write_timeout,
                    "write",
                )
                if stream.request_sent:
                    break
        with self._cond:
            self.state.send_body(stream, b"", end=True)
            self._send_locked()


class _SyncBody(_Body[SyncH2Connection], httpx.SyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        conn, stream = self._conn, self._stream
        try:
            while True:
                with conn._cond:
                    chunk = conn.state.take_body(stream)
                    if chunk is None:
                        if stream.error is not None:
                            raise stream.error
                        if stream.ended:
                            break
                        conn._wait_locked(
                            stream,
                            lambda: bool(stream.chunks) or stream.ended,
                            self._timeout,
                            "read",
                        )
                        continue
                    conn._send_locked()
                if chunk:
                    yield chunk
        except BaseException:
            self.close()
            raise
        self.close()

    def close(self) -> None:
        self._end()
