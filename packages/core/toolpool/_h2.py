"""HTTP/2 on the client side, without I/O: one connection's streams, on the ``h2`` library.

Theory of operation
-------------------
``h2`` (python-hyper) does the protocol: framing, HPACK, SETTINGS, flow-control windows,
stream states. :class:`H2Client` sits on top of one ``h2.connection.H2Connection`` and keeps
what a pool needs to know about it, as plain data the drivers read:

- per stream (:class:`Stream`): the response head, body chunks not yet taken by the caller,
  the request body still waiting for window, and how the stream ended (or why it failed);
- per connection: whether it may take a new stream (:attr:`H2Client.accepting`), how many it
  carries (:attr:`H2Client.streams_in_use`) against the server's
  ``SETTINGS_MAX_CONCURRENT_STREAMS`` (:attr:`H2Client.max_streams`), PINGs in flight.

The drivers (``toolpool._h2io``) feed received bytes to :meth:`H2Client.receive`, write what
:meth:`H2Client.data_to_send` returns, and wake the streams :meth:`receive` names. Every
decision lives here, so the asyncio and the thread driver cannot disagree.

Rules
-----
- **Server SETTINGS honoured**: no stream is opened above the server's
  ``SETTINGS_MAX_CONCURRENT_STREAMS``; h2 applies its frame size and windows.
- **Flow control both ways**: request bodies are queued and sent as the server's windows
  open (``WINDOW_UPDATE``). A stream's received DATA is acknowledged when the *caller takes
  it* (:meth:`take_body`), so a slow reader of a streaming response holds the server back
  instead of growing a buffer without bound; the connection's window is acknowledged on
  arrival, so one unread stream cannot starve the others (head-of-line blocking).
- **Cancellation** (:meth:`cancel`): RST_STREAM(CANCEL) for that stream; the connection and
  its other streams carry on.
- **Retry safety**: a stream reset with REFUSED_STREAM, or above the last stream id of a
  received GOAWAY, was not processed by the server (RFC 9113 8.7): it fails with
  :class:`StreamNotProcessed`, which says "safe to retry on another connection". Any other
  reset fails with :class:`StreamReset` (the request may have been processed).
- **GOAWAY drains**: no new stream after it; the streams at or below its last stream id
  finish. (h2 itself stops accepting frames once a GOAWAY arrives, even the rest of the
  same read, and drops what it had queued to send; :class:`_Connection` keeps both going
  after a GOAWAY(NO_ERROR), which is exactly RFC 9113 6.8's graceful shutdown.)
- **Early responses** (RFC 9113 8.1): a server may answer in full before it has read the
  whole request body, and keep its flow-control window for that body closed. Once the
  response is complete the rest of the body is of no use to anyone: :meth:`receive` stops
  sending it (the queue is dropped, :attr:`Stream.abandoned` says so) and closes our half of
  the stream with RST_STREAM(NO_ERROR), so the driver returns the response at once instead of
  waiting for a window until its write timeout.
- **Local drain** (:meth:`drain`, for max lifetime): no new stream; once the last one ends,
  :attr:`should_close` turns true and :meth:`close` sends GOAWAY(NO_ERROR).
- **A connection error fails only this connection's streams** (:meth:`connection_lost`, or
  a protocol error inside :meth:`receive`): other connections never see it.

Error messages never quote header values or bodies (they may carry credentials).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx

__all__ = [
    "ConnectionFailed",
    "H2Client",
    "Stream",
    "StreamNotProcessed",
    "StreamReset",
    "failure_incident",
]

#: What we grant the server for one stream's response body: a large response streams without
#: a WINDOW_UPDATE round trip per 64 KiB (the RFC default), and a caller that stops reading
#: holds at most this much in memory before the server has to wait.
RECEIVE_WINDOW = 2 * 1024 * 1024
#: The connection's window. It is replenished as DATA *arrives* (a stream's window, as its
#: caller *reads*), so one stream nobody reads never blocks the other streams.
CONNECTION_WINDOW = 16 * 1024 * 1024
#: Our own stream cap, whatever the server allows: h2's default, and far above what one
#: (destination, tenant) pair carries at once under a pool's request cap.
LOCAL_MAX_STREAMS = 100
_MAX_HEADER_LIST = 64 * 1024
#: Headers HTTP/2 forbids in requests (RFC 9113 8.2.2): dropped from what the caller set.
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"}
)


class StreamNotProcessed(httpx.RemoteProtocolError):
    """The server did not process this request (REFUSED_STREAM, or a stream above GOAWAY's
    last stream id): sending it again on another connection is safe. ``reason`` says which:
    ``"refused_stream"`` or ``"goaway"``. Streams passed over by one GOAWAY share its
    ``incident`` (see :class:`ConnectionFailed`); a refused stream has none."""

    retry_safe = True

    def __init__(self, message: str, reason: str, incident: object | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.incident = incident


class ConnectionFailed(httpx.RemoteProtocolError):
    """The HTTP/2 connection under the stream ended: it was lost, closed with an error, or
    broke the protocol. The request may have been processed (retried only when idempotent).

    One connection carries many streams, so one loss fails many requests at once. Each
    stream gets its own instance (an exception raised in many tasks or threads would share
    one traceback); all of them carry the same ``incident``, which the circuit breaker counts
    once: one lost connection is one failure of the destination, as on HTTP/1.1."""

    def __init__(self, message: str, incident: object | None = None) -> None:
        super().__init__(message)
        self.incident = object() if incident is None else incident

    def again(self) -> ConnectionFailed:
        """The same failure (same message and incident) for another stream or caller."""
        return ConnectionFailed(str(self), self.incident)


def failure_incident(exc: BaseException | None) -> object | None:
    """The HTTP/2 connection event behind `exc` (a loss, a GOAWAY) when several requests
    failed from it at once, else None: each such failure is its own event."""
    if isinstance(exc, ConnectionFailed | StreamNotProcessed):
        return exc.incident
    return None


class StreamReset(httpx.RemoteProtocolError):
    """The server reset the stream; it may have processed the request (not retried)."""

    retry_safe = False

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code


class _Connection(h2.connection.H2Connection):
    """``h2``'s connection, with RFC 9113 6.8's graceful GOAWAY.

    On a GOAWAY ``h2`` moves its state machine to CLOSED and empties its send buffer, inside
    ``receive_data``. For a GOAWAY(NO_ERROR) that is wrong twice over: the frames that follow
    it in the same read (the DATA of the streams the server is still finishing, which nginx
    sends right behind its GOAWAY) would be rejected as a protocol error, failing every
    stream; and the acknowledgements ``h2`` queued for frames read just before it (SETTINGS
    ACK, PING ACK, WINDOW_UPDATE) would be dropped. Here the buffer is kept and a graceful
    GOAWAY leaves the state machine open; :class:`H2Client` takes no new stream after it.
    """

    def _receive_headers_frame(self, frame: Any) -> Any:
        # A 1xx head arriving on a stream we reset (it crossed our RST_STREAM) is an invalid
        # state transition to h2 4.x, which then fails the whole connection; RFC 9113 5.1 says
        # to ignore frames on a stream we reset, as h2 does for a final head. Same treatment:
        # a stream error (h2 answers RST_STREAM(STREAM_CLOSED)). HPACK was decoded already.
        try:
            return super()._receive_headers_frame(frame)
        except h2.exceptions.ProtocolError as exc:
            invalid_transition = type(exc) is h2.exceptions.ProtocolError and isinstance(
                exc.__cause__, KeyError
            )
            if invalid_transition and self._stream_is_closed_by_reset(frame.stream_id):
                raise h2.exceptions.StreamClosedError(frame.stream_id) from None
            raise

    def clear_outbound_data_buffer(self) -> None:
        # Only h2's GOAWAY handling calls this (h2 4.x); nothing queued is dropped.
        pass

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == h2.errors.ErrorCodes.NO_ERROR:
            self.state_machine.state = state
        return result


def _code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return f"0x{code:x}"


@dataclass
class Stream:
    """One request/response exchange on an :class:`H2Client` connection."""

    stream_id: int
    #: Response status, once the final (non-1xx) head arrived.
    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    #: Received body chunks the caller has not taken yet, with their flow-controlled sizes.
    chunks: deque[tuple[bytes, int]] = field(default_factory=deque)
    #: The server's END_STREAM arrived: no more body.
    ended: bool = False
    #: Why the stream failed (set once; the caller raises it).
    error: Exception | None = None
    #: Request body bytes queued for the server's flow-control window.
    outbound: bytearray = field(default_factory=bytearray)
    #: END_STREAM is to follow the queued request body.
    outbound_end: bool = False
    #: END_STREAM of the request has been sent, or the request will not be sent further
    #: (:attr:`abandoned`): nothing more goes out on this stream either way.
    request_sent: bool = False
    #: The rest of the request body was dropped, unsent: the response was complete first
    #: (RFC 9113 8.1), or the server ended or reset the stream.
    abandoned: bool = False
    #: Body bytes the caller took and the stream's window has not been credited with yet.
    unacked: int = 0

    @property
    def fully_sent(self) -> bool:
        """The whole request went out, END_STREAM included (not :attr:`abandoned`)."""
        return self.request_sent and not self.abandoned

    @property
    def done(self) -> bool:
        """Nothing more will happen on this stream (ended, with its body taken, or failed)."""
        return self.error is not None or (self.ended and not self.chunks)


class H2Client:
    """The client side of one HTTP/2 connection, as a state machine over ``h2``.

    ::

        client = H2Client()
        transport.write(client.initiate())
        stream = client.open_stream(b"GET", b"https", b"api.example:443", b"/v1", headers)
        transport.write(client.data_to_send())
        touched = client.receive(data)         # stream ids with news (0: the connection)
        chunk = client.take_body(stream)       # acknowledges it to the server's window
    """

    def __init__(
        self,
        *,
        receive_window: int = RECEIVE_WINDOW,
        connection_window: int = CONNECTION_WINDOW,
    ) -> None:
        """``receive_window`` / ``connection_window``: what we grant the server per stream and
        for the connection (the defaults above; tests use small ones to exercise flow control)."""
        self._receive_window = receive_window
        self._connection_window = max(connection_window, 65535)
        config = h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_inbound_headers=True
        )
        self._h2 = _Connection(config=config)
        # In effect at once (h2 would otherwise apply them once the server acknowledges):
        # we announce them in the preface, before any stream exists.
        self._h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: LOCAL_MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: receive_window,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: _MAX_HEADER_LIST,
            },
        )
        self.streams: dict[int, Stream] = {}
        #: Streams this connection reset (RST_STREAM CANCEL: the caller gave up on them).
        self.resets_sent = 0
        #: A GOAWAY arrived (its last stream id in :attr:`goaway_last_stream_id`).
        self.goaway_received = False
        self.goaway_last_stream_id: int | None = None
        #: :meth:`drain` was called (max lifetime): no new streams, close when idle.
        self.draining = False
        #: The connection is gone (error, EOF, or closed by us).
        self.closed = False
        #: Why the connection failed, if it did.
        self.error: ConnectionFailed | None = None
        #: The server's first SETTINGS frame arrived.
        self.settings_received = False
        self._pings: set[bytes] = set()
        #: Payloads of PINGs the server acknowledged and nobody has collected yet.
        self.pings_acked: set[bytes] = set()
        self.streams_opened = 0
        self._connection_unacked = 0

    # -- connection ----------------------------------------------------------------------

    def initiate(self) -> bytes:
        """The connection preface and our SETTINGS (write it first)."""
        self._h2.initiate_connection()
        if self._connection_window > 65535:  # the RFC's initial connection window
            self._h2.increment_flow_control_window(self._connection_window - 65535)
        return self._h2.data_to_send()

    def data_to_send(self) -> bytes:
        return self._h2.data_to_send()

    @property
    def max_streams(self) -> int:
        """Concurrent streams this connection may carry: the server's
        ``SETTINGS_MAX_CONCURRENT_STREAMS`` (bounded by :data:`LOCAL_MAX_STREAMS`)."""
        return min(self._h2.remote_settings.max_concurrent_streams, LOCAL_MAX_STREAMS)

    @property
    def streams_in_use(self) -> int:
        """Streams opened and not yet released by their callers."""
        return len(self.streams)

    @property
    def accepting(self) -> bool:
        """A new stream may be opened now."""
        return (
            not self.closed
            and not self.goaway_received
            and not self.draining
            # Until the server's SETTINGS arrive its stream limit is unknown: one stream.
            and (self.settings_received or not self.streams)
            and self.streams_in_use < self.max_streams
            and self._h2.open_outbound_streams < self.max_streams
        )

    @property
    def reusable(self) -> bool:
        """The connection may take new streams later (it is not going away)."""
        return not (self.closed or self.goaway_received or self.draining)

    @property
    def should_close(self) -> bool:
        """Going away (GOAWAY received or draining) with no stream left: close it now."""
        return not self.closed and (self.goaway_received or self.draining) and not self.streams

    def drain(self) -> None:
        """Take no new stream; the driver closes the connection once :attr:`should_close`."""
        self.draining = True

    def close(self) -> bytes:
        """GOAWAY(NO_ERROR) naming no server-initiated stream; the bytes to write last."""
        if not self.closed:
            self.closed = True
            try:
                self._h2.close_connection(error_code=h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.ProtocolError:
                pass
            self._fail_all(ConnectionFailed("the HTTP/2 connection was closed"))
        return self._h2.data_to_send()

    def connection_lost(self, exc: BaseException | None) -> None:
        """The transport is gone: every stream still open here fails (retry-safe only for
        streams the server never saw, which the caller cannot tell apart: not retried)."""
        if self.closed and self.error is None and not self.streams:
            return
        self.closed = True
        detail = f": {type(exc).__name__}" if exc is not None else ""
        error = ConnectionFailed(f"the HTTP/2 connection was lost{detail}")
        if self.error is None:
            self.error = error
        self._fail_all(error)

    # -- PING ------------------------------------------------------------------------

    def ping(self) -> bytes:
        """Queue a PING; returns its 8-byte payload (look for it in :attr:`pings_acked`)."""
        payload = os.urandom(8)
        self._pings.add(payload)
        self._h2.ping(payload)
        return payload

    def ping_answered(self, payload: bytes) -> bool:
        """True once the server acknowledged PING ``payload`` (forgets it then)."""
        if payload in self.pings_acked:
            self.pings_acked.discard(payload)
            return True
        return False

    def forget_ping(self, payload: bytes) -> None:
        self._pings.discard(payload)
        self.pings_acked.discard(payload)

    # -- streams -------------------------------------------------------------------------

    def open_stream(
        self,
        method: bytes,
        scheme: bytes,
        authority: bytes,
        path: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool,
    ) -> Stream:
        """Send a request's HEADERS on a new stream. Check :attr:`accepting` first."""
        if not self.accepting:
            raise RuntimeError("this HTTP/2 connection takes no new stream now")
        block = [
            (b":method", method),
            (b":scheme", scheme),
            (b":authority", authority),
            (b":path", path),
        ]
        for name, value in headers:
            name = name.lower()
            if name in _CONNECTION_HEADERS:
                continue
            if name == b"te" and value.lower() != b"trailers":
                continue
            block.append((name, value))
        sid = self._h2.get_next_available_stream_id()
        self._h2.send_headers(sid, block, end_stream=end_stream)
        stream = Stream(sid, request_sent=end_stream)
        self.streams[sid] = stream
        self.streams_opened += 1
        return stream

    def send_body(self, stream: Stream, data: bytes, *, end: bool) -> None:
        """Queue request body bytes (and END_STREAM with ``end``); sent as windows allow."""
        if stream.error is not None or stream.request_sent:
            return
        stream.outbound += data
        stream.outbound_end = stream.outbound_end or end
        self._flush_stream(stream)

    def outbound_pending(self, stream: Stream) -> int:
        """Request body bytes still waiting for the server's window."""
        return len(stream.outbound)

    def take_body(self, stream: Stream) -> bytes | None:
        """The next received body chunk, acknowledged to the server's window; ``None``
        when none is buffered (check :attr:`Stream.ended` / :attr:`Stream.error`)."""
        if not stream.chunks:
            return None
        data, flow = stream.chunks.popleft()
        stream.unacked += flow
        if stream.unacked >= self._receive_window // 2 and not stream.ended and not self.closed:
            try:
                self._h2.increment_flow_control_window(stream.unacked, stream_id=stream.stream_id)
            except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                pass
            stream.unacked = 0
        return data

    def cancel(self, stream: Stream) -> bool:
        """The caller gave up on ``stream``: RST_STREAM(CANCEL) unless it already ended,
        then release it. The connection stays. True when the RST_STREAM was sent."""
        if self.streams.pop(stream.stream_id, None) is None:
            return False
        reset = False
        if stream.error is None and not (stream.ended and stream.request_sent):
            if not self.closed:
                try:
                    self._h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
                    reset = True
                    self.resets_sent += 1
                except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
                    pass
            if not stream.ended:  # a complete response stays one (only our half is reset)
                stream.error = httpx.RemoteProtocolError("the stream was cancelled")
        return reset

    def release(self, stream: Stream) -> None:
        """The caller is done with a finished stream (its body fully read, or it failed)."""
        if not stream.done:
            self.cancel(stream)
            return
        if self.streams.pop(stream.stream_id, None) is None:
            return
        if stream.error is None and not stream.request_sent:
            # :meth:`receive` stops the body of a complete response; should one get here
            # unstopped, the same holds: left half-open, the stream would count against the
            # server's stream limit (and h2's) for the connection's life.
            self._stop_sending(stream)

    # -- receiving -----------------------------------------------------------------------

    def receive(self, data: bytes) -> set[int]:
        """Feed bytes from the server; returns the ids of streams with news (0 when the
        connection itself changed: settings, GOAWAY, PING ack, error)."""
        touched: set[int] = set()
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            self.error = ConnectionFailed(
                f"the server broke the HTTP/2 protocol ({type(exc).__name__})"
            )
            touched.update(self.streams)
            touched.add(0)
            self._fail_all(self.error)
            return touched
        for event in events:
            self._event(event, touched)
        for stream in list(self.streams.values()):
            if stream.ended and not stream.request_sent and stream.error is None:
                self._stop_sending(stream)  # answered in full: the rest of the body is moot
                touched.add(stream.stream_id)
                continue
            waiting = stream.outbound or (stream.outbound_end and not stream.request_sent)
            if waiting and self._flush_stream(stream):
                touched.add(stream.stream_id)
        return touched

    def _event(self, event: h2.events.Event, touched: set[int]) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.headers = list(event.headers or ())
                stream.status = _status(stream.headers)
                if event.stream_ended is not None:
                    stream.ended = True
                touched.add(stream.stream_id)
        elif isinstance(event, h2.events.InformationalResponseReceived):
            pass  # 1xx: the final head follows
        elif isinstance(event, h2.events.DataReceived):
            sid = event.stream_id or 0
            stream = self.streams.get(sid)
            flow = event.flow_controlled_length or 0
            self._connection_unacked += flow
            if self._connection_unacked >= self._connection_window // 2:
                self._h2.increment_flow_control_window(self._connection_unacked)
                self._connection_unacked = 0
            if stream is None:
                return  # a stream we cancelled: only the connection window counted it
            stream.chunks.append((event.data or b"", flow))
            if event.stream_ended is not None:
                stream.ended = True
            touched.add(sid)
        elif isinstance(event, (h2.events.StreamEnded, h2.events.TrailersReceived)):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                if isinstance(event, h2.events.StreamEnded) or event.stream_ended is not None:
                    stream.ended = True
                touched.add(stream.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None and stream.error is None and not stream.ended:
                code = int(event.error_code or 0)
                if code == h2.errors.ErrorCodes.REFUSED_STREAM:
                    stream.error = StreamNotProcessed(
                        "the server refused the stream (REFUSED_STREAM) without processing "
                        "it; safe to retry on another connection",
                        "refused_stream",
                    )
                else:
                    stream.error = StreamReset(
                        f"the server reset the stream ({_code_name(code)})", code
                    )
                touched.add(stream.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event, touched)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
            touched.add(0)
        elif isinstance(event, h2.events.PingAckReceived):
            payload = event.ping_data or b""
            if payload in self._pings:
                self._pings.discard(payload)
                self.pings_acked.add(payload)
            touched.add(0)
        elif isinstance(event, h2.events.WindowUpdated):
            touched.add(0)

    def _goaway(self, event: h2.events.ConnectionTerminated, touched: set[int]) -> None:
        self.goaway_received = True
        last = int(event.last_stream_id or 0)
        if self.goaway_last_stream_id is None or last < self.goaway_last_stream_id:
            self.goaway_last_stream_id = last
        touched.add(0)
        incident = object()
        for stream in self.streams.values():
            if stream.stream_id > last and stream.error is None:
                stream.error = StreamNotProcessed(
                    "the server is going away (GOAWAY) and did not process this stream; "
                    "safe to retry on another connection",
                    "goaway",
                    incident,
                )
                touched.add(stream.stream_id)
        code = int(event.error_code or 0)
        if code != h2.errors.ErrorCodes.NO_ERROR:
            # An error GOAWAY ends the connection; streams at or below `last` may have been
            # processed, so they fail without the retry-safe mark.
            self.closed = True
            self.error = ConnectionFailed(
                f"the server closed the HTTP/2 connection ({_code_name(code)})"
            )
            self._fail_all(self.error)
            touched.update(self.streams)
            return
        # Graceful: the streams at or below `last` complete (RFC 9113 6.8); _Connection kept
        # h2's state machine open for their frames.

    # -- sending -------------------------------------------------------------------------

    def _flush_stream(self, stream: Stream) -> bool:
        """Send queued body bytes within the windows; True when something went out."""
        sent = False
        sid = stream.stream_id
        try:
            while stream.outbound:
                window = min(
                    self._h2.local_flow_control_window(sid), self._h2.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = bytes(stream.outbound[:window])
                del stream.outbound[:window]
                self._h2.send_data(sid, chunk)
                sent = True
            if not stream.outbound and stream.outbound_end and not stream.request_sent:
                self._h2.end_stream(sid)
                stream.request_sent = True
                sent = True
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            # The server already ended or reset the stream: it does not want the rest.
            stream.outbound.clear()
            stream.request_sent = stream.abandoned = True
        return sent

    def _stop_sending(self, stream: Stream) -> None:
        """The response of `stream` is complete before its request body was sent (RFC 9113
        8.1): drop the rest of the body and close our half with RST_STREAM(NO_ERROR), which
        says "done, nothing wrong" (the response stands; no cancellation is counted)."""
        stream.outbound.clear()
        stream.request_sent = stream.abandoned = True
        if self.closed:
            return
        try:
            self._h2.reset_stream(stream.stream_id, h2.errors.ErrorCodes.NO_ERROR)
        except (h2.exceptions.ProtocolError, h2.exceptions.StreamClosedError):
            pass  # the server reset it already (e.g. its own RST_STREAM(NO_ERROR))

    def _fail_all(self, error: ConnectionFailed) -> None:
        for stream in self.streams.values():
            if stream.error is None and not stream.ended:
                stream.error = error.again()


def _status(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return None
    return None
