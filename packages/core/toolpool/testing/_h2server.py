"""The server end of one HTTP/2 connection (RFC 9113) on the ``h2`` state machine.

Every stream is an :class:`H2Stream`, which offers the service the same calls as an HTTP/1.1
connection (``respond``, ``start_stream``, ``send_chunk``, ``end_stream``, ``reset``, ``drop``),
so :class:`~toolpool.testing._service.Service` answers both protocols with one code path. The
framing, HPACK and flow control are h2's; this module only moves bytes, queues response
bodies until the client's flow-control window opens, and keeps the counters.

Two things h2 does not do on its own, done here on purpose:

- **Graceful GOAWAY.** ``h2`` moves its connection state machine to CLOSED when a GOAWAY is
  sent, after which it rejects every frame, so in-flight streams could not finish. A real
  server (nginx, on reload or ``keepalive_requests``) announces GOAWAY with the last stream it
  will process and keeps serving the streams below it; so do we: the GOAWAY is sent, the state
  is put back to open, and streams above the announced id are refused here.
- **Silent connection** (a fault): from its trigger on, nothing is fed to h2 and nothing is
  written, so a PING goes unanswered, like a connection whose path died.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from toolpool.testing._http import Request
from toolpool.testing._relay import abort_with_rst

if TYPE_CHECKING:
    from toolpool.testing._connection import InFlight
    from toolpool.testing._faults import FaultBoard
    from toolpool.testing._stats import Counters

_NO_BODY = frozenset({204, 304})
#: Headers HTTP/2 forbids (RFC 9113 8.2.2); an HTTP/1.1-minded handler may pass them.
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: Window the server grants for request bodies (connection and each stream): large uploads
#: flow without waiting on WINDOW_UPDATE round trips, as nginx's 64 KiB..1 MiB do.
_RECEIVE_WINDOW = 1 << 20


class H2Handler(Protocol):
    """What an HTTP/2 connection needs from its service (a subset of ``Service``)."""

    counters: Counters
    faults: FaultBoard

    def connection_made(self, conn: H2ServerConnection) -> bool: ...

    def connection_lost(self, conn: H2ServerConnection) -> None: ...

    def connection_idle_closed(self, conn: H2ServerConnection) -> None: ...

    def handle(self, conn: H2Stream, request: Request) -> None: ...


class H2Stream:
    """One request/response exchange on an HTTP/2 connection (what the service answers)."""

    __slots__ = (
        "_body",
        "_conn",
        "_ended",
        "_finished",
        "_headers",
        "_out",
        "_out_end",
        "in_flight",
        "requests",
        "stream_id",
    )

    def __init__(self, conn: H2ServerConnection, stream_id: int, ordinal: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        #: The ordinal of this stream on its connection (1, 2, ...): HTTP/1.1's "request
        #: number on this connection".
        self.requests = ordinal
        self.in_flight: InFlight | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self._out = bytearray()
        self._out_end = False
        self._ended = False  # the request's END_STREAM arrived
        self._finished = False  # our END_STREAM (or RST_STREAM) went out

    @property
    def id(self) -> int:
        """The connection id (what ``x-connection-id`` and the counters name)."""
        return self._conn.id

    @property
    def peer_common_name(self) -> str | None:
        return self._conn.peer_common_name

    def request(self) -> Request:
        headers: dict[str, str] = {}
        method = target = ""
        for raw_name, raw_value in self._headers:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name == ":method":
                method = value
            elif name == ":path":
                target = value
            elif name == ":authority":
                headers.setdefault("host", value)
            elif name.startswith(":"):
                continue
            elif name in headers:
                headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                headers[name] = value
        return Request(method, target, "HTTP/2", headers, bytes(self._body), True)

    # -- the service's calls (the same as HttpConnection's) ------------------------------

    def respond(
        self,
        status: int,
        body: bytes = b"",
        headers: tuple[tuple[str, str], ...] | list[tuple[str, str]] = (),
        *,
        content_type: str = "application/json",
        close: bool = False,
        head_only: bool = False,
        close_silently: bool = False,
    ) -> None:
        """Send a complete response. ``close``: GOAWAY after it (the connection drains);
        ``close_silently``: drop the connection once it is written, announcing nothing."""
        self.in_flight = None  # answered: a later reset no longer aborts the request
        if status in _NO_BODY or status < 200:
            body = b""
            head = list(headers)
        else:
            head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        self._send_head(status, head, end=head_only or not body)
        if not head_only and body:
            self._out += body
            self._out_end = True
        self._conn.flush()
        if close:
            self._conn.goaway(self._conn.highest_stream_id)
        if close_silently:
            self._conn.close_when_flushed()

    def start_stream(
        self, status: int, headers: tuple[tuple[str, str], ...] = (), *, head_only: bool = False
    ) -> None:
        self._send_head(status, list(headers), end=head_only)
        self._conn.flush()

    def send_chunk(self, data: bytes) -> None:
        if self._finished or self._out_end or not data:
            return
        self._out += data
        self._conn.flush()

    def end_stream(self, *, close_silently: bool = False) -> None:
        self.in_flight = None
        if not self._finished:
            self._out_end = True
            self._conn.flush()
        if close_silently:
            self._conn.close_when_flushed()

    def reset(self) -> None:
        """Abort the whole connection with a TCP RST (what ``reset`` means on HTTP/1.1)."""
        self._conn.reset()

    def drop(self) -> None:
        """Close the whole connection without answering."""
        self._conn.drop()

    def rst(self, error_code: int) -> None:
        """Reset this stream (RST_STREAM with ``error_code``); the connection stays."""
        self._conn.reset_stream(self, error_code)

    def goaway(self) -> None:
        """GOAWAY naming the stream before this one as the last processed: this request is
        left unprocessed (safe for the client to retry elsewhere), earlier ones finish."""
        self._conn.goaway(self.stream_id - 2, refuse=self)

    def _send_head(self, status: int, headers: list[tuple[str, str]], *, end: bool) -> None:
        conn = self._conn
        if self._finished or conn.h2 is None or conn.closed or conn.silent:
            return
        block = [(b":status", str(status).encode())]
        for name, value in headers:
            raw = name.lower().encode("latin-1")
            if raw not in _CONNECTION_HEADERS:
                block.append((raw, value.encode("latin-1")))
        try:
            conn.h2.send_headers(self.stream_id, block, end_stream=end)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            self._finished = True
            conn.stream_done(self)
            return
        if end:
            self._finished = True
            conn.stream_done(self)


class H2ServerConnection(asyncio.Protocol):
    """The server end of one HTTP/2 connection (an ``asyncio.Protocol``)."""

    #: What ``ServiceStats.connection_protocols`` records for this connection.
    protocol = "h2"

    def __init__(
        self,
        handler: H2Handler,
        loop: asyncio.AbstractEventLoop,
        keepalive_timeout: float,
        max_concurrent_streams: int,
    ) -> None:
        self._handler = handler
        self._loop = loop
        self._keepalive = keepalive_timeout
        self._max_streams = max_concurrent_streams
        self.transport: asyncio.Transport | None = None
        self.h2: h2.connection.H2Connection | None = None
        #: Server-side connection id, set by the handler.
        self.id = 0
        self.peer_common_name: str | None = None
        self.closed = False
        self.closed_for_idle = False
        #: A ``silent`` fault fired: nothing is read or written any more.
        self.silent = False
        #: Highest stream id the client opened (what a graceful GOAWAY names).
        self.highest_stream_id = 0
        self._streams: dict[int, H2Stream] = {}
        self._opened = 0
        self._goaway_last: int | None = None
        self._close_when_flushed = False
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._handler.connection_made(self):
            self.reset()
            return
        self._handler.counters.connection_speaks_h2(self.id)
        max_streams = self._max_streams
        if self._handler.faults.on_connection("max_streams_1"):
            self._handler.counters.fault_fired("max_streams_1")
            max_streams = 1
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        conn = h2.connection.H2Connection(config=config)
        # Applied at once (not only once acknowledged): a client that opens streams above it
        # before the acknowledgement breaks the protocol, and h2 then ends the connection.
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_streams,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _RECEIVE_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(_RECEIVE_WINDOW - 65535)
        self.h2 = conn
        self._write()
        self._last_activity = self._loop.time()
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        conn = self.h2
        if self.silent or self.closed or conn is None:
            return
        if self._handler.faults.on_connection("silent"):
            self._handler.counters.fault_fired("silent")
            self.silent = True
            return
        self._last_activity = self._loop.time()
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._write()  # h2 queued a GOAWAY naming the error
            self.drop()
            return
        for event in events:
            self._event(event)
            if self.closed:
                return
        self._write()
        self._maybe_close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        streams = list(self._streams.values())
        self._streams.clear()
        for stream in streams:
            in_flight, stream.in_flight = stream.in_flight, None
            if in_flight is not None:
                in_flight.abort()
        if streams:
            self._handler.counters.streams_closed(self.id, len(streams))
        self._handler.connection_lost(self)

    # -- events --------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            sid = event.stream_id
            assert sid is not None
            self.highest_stream_id = max(self.highest_stream_id, sid)
            if self._goaway_last is not None and sid > self._goaway_last:
                # Opened after our GOAWAY (it crossed it): never processed.
                self._reset_quietly(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            self._opened += 1
            stream = H2Stream(self, sid, self._opened)
            stream._headers = list(event.headers or ())
            self._streams[sid] = stream
            self._handler.counters.stream_opened(self.id)
            if event.stream_ended is not None:
                self._request_complete(stream)
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id
            assert sid is not None
            assert self.h2 is not None
            if event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            receiving = self._streams.get(sid)
            if receiving is not None and event.data:
                receiving._body += event.data
            if receiving is not None and event.stream_ended is not None:
                self._request_complete(receiving)
        elif isinstance(event, h2.events.StreamEnded):
            ended = self._streams.get(event.stream_id or 0)
            if ended is not None and not ended._ended:
                self._request_complete(ended)
        elif isinstance(event, h2.events.StreamReset):
            reset = self._streams.pop(event.stream_id or 0, None)
            if reset is not None:
                reset._finished = True
                in_flight, reset.in_flight = reset.in_flight, None
                if in_flight is not None:
                    in_flight.abort()
                self._handler.counters.streams_closed(
                    self.id, by_client_reset=1 if event.remote_reset else 0
                )
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.flush()
        elif isinstance(event, h2.events.PingReceived):
            self._handler.counters.ping_received()  # h2 queued the ACK
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.drop()  # the client said GOAWAY: it opens no more streams here

    def _request_complete(self, stream: H2Stream) -> None:
        if stream._ended:
            return
        stream._ended = True
        self._handler.handle(stream, stream.request())

    # -- writing -------------------------------------------------------------------------

    def _write(self) -> None:
        conn = self.h2
        if conn is None or self.transport is None or self.closed or self.silent:
            return
        data = conn.data_to_send()
        if data:
            self.transport.write(data)

    def flush(self) -> None:
        """Send queued response bodies as far as the client's flow-control windows allow."""
        conn = self.h2
        if conn is None or self.closed or self.silent:
            return
        for stream in list(self._streams.values()):
            if stream._finished or not (stream._out or stream._out_end):
                continue
            sid = stream.stream_id
            try:
                while stream._out:
                    window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                    if window <= 0:
                        break
                    chunk = bytes(stream._out[:window])
                    del stream._out[:window]
                    conn.send_data(sid, chunk)
                if not stream._out and stream._out_end:
                    conn.end_stream(sid)
                    stream._finished = True
                    self.stream_done(stream)
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                stream._finished = True
                self.stream_done(stream)
        self._write()
        self._maybe_close()

    def stream_done(self, stream: H2Stream) -> None:
        """Our side of ``stream`` is finished: count it closed."""
        stream.in_flight = None
        if self._streams.pop(stream.stream_id, None) is not None:
            self._handler.counters.streams_closed(self.id)
            self._last_activity = self._loop.time()
            if self._idle_timer is None:
                self._arm_idle_timer()

    def reset_stream(self, stream: H2Stream, error_code: int) -> None:
        stream._finished = True
        self._reset_quietly(stream.stream_id, error_code)
        self.stream_done(stream)
        self._write()

    def _reset_quietly(self, stream_id: int, error_code: int) -> None:
        if self.h2 is None:
            return
        try:
            self.h2.reset_stream(stream_id, error_code)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass

    def goaway(self, last_stream_id: int, *, refuse: H2Stream | None = None) -> None:
        """Announce GOAWAY(NO_ERROR, ``last_stream_id``) and keep serving the streams at or
        below it; the connection closes when they are done. Every stream above it (``refuse``,
        and any opened after it) is dropped unanswered and no longer counted: the GOAWAY
        tells the client they were not processed, so it may send them elsewhere at once, and
        a server keeps that promise (counting them would see the client's retries as extra
        concurrent streams)."""
        conn = self.h2
        if conn is None or self.closed:
            return
        last = max(0, last_stream_id)
        if self._goaway_last is None or last < self._goaway_last:
            self._goaway_last = last
        saved = conn.state_machine.state
        conn.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=last)
        conn.state_machine.state = saved  # see the module docstring: drain, do not slam
        above = [st for sid, st in self._streams.items() if sid > self._goaway_last]
        if refuse is not None and refuse not in above:
            above.append(refuse)
        for stream in above:
            stream._finished = True
            in_flight, stream.in_flight = stream.in_flight, None
            if in_flight is not None:
                in_flight.abort()
            self.stream_done(stream)
        self._write()
        self._maybe_close()

    def close_when_flushed(self) -> None:
        self._close_when_flushed = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.closed or self.transport is None:
            return
        flushed = not any(s._out for s in self._streams.values())
        drained = self._goaway_last is not None and not self._streams
        if (self._close_when_flushed and flushed) or drained:
            self.drop()

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0)."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        abort_with_rst(transport)

    def drop(self) -> None:
        """Close the connection (FIN after what is queued)."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    # -- idle timeout --------------------------------------------------------------------

    def _arm_idle_timer(self, delay: float | None = None) -> None:
        if self._keepalive == float("inf"):
            return
        self._idle_timer = self._loop.call_later(
            self._keepalive if delay is None else delay, self._idle_check
        )

    def _idle_check(self) -> None:
        """Close with GOAWAY after ``keepalive_timeout`` without an open stream."""
        self._idle_timer = None
        if self.closed or self._streams:
            return  # re-armed when the last stream finishes
        remaining = self._last_activity + self._keepalive - self._loop.time()
        if remaining > 0.0005:
            self._arm_idle_timer(remaining)
            return
        self.closed_for_idle = True
        self._handler.connection_idle_closed(self)
        self.goaway(self.highest_stream_id)


class AlpnSwitch(asyncio.Protocol):
    """Hands a new TLS connection to the protocol ALPN chose: ``h2`` or HTTP/1.1."""

    def __init__(
        self,
        http1: Callable[[], asyncio.Protocol],
        http2: Callable[[], asyncio.Protocol],
    ) -> None:
        self._http1 = http1
        self._http2 = http2

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        protocol = self._http2() if chosen == "h2" else self._http1()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
