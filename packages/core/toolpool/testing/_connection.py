"""One server-side TCP connection: feeds the parser, writes responses in order, closes idle.

The connection knows HTTP/1.1 framing and keep-alive; what a request means is the
:class:`Handler`'s business. Requests are answered one at a time in arrival order
(pipelined requests wait in the parser's buffer), and nothing here creates a Task.
"""

from __future__ import annotations

import asyncio
import json
from typing import Protocol, cast

from toolpool.testing._http import ProtocolError, Request, RequestParser, reason, response_head
from toolpool.testing._relay import abort_with_rst

#: Stop reading from a peer that pipelines more than this while a request is in progress.
_MAX_PIPELINED = 1024 * 1024
_NO_BODY = frozenset({204, 304})


class InFlight(Protocol):
    """A request in progress on a connection; aborted if the connection goes away first."""

    def abort(self) -> None: ...


class Handler(Protocol):
    """What a listening service does with its connections and their requests."""

    def connection_made(self, conn: HttpConnection) -> bool:
        """Set ``conn.id``; return False to refuse (the connection is then reset)."""
        ...

    def connection_lost(self, conn: HttpConnection) -> None: ...

    def connection_idle_closed(self, conn: HttpConnection) -> None:
        """The server is closing ``conn`` because it sat idle for the keep-alive timeout."""
        ...

    def handle(self, conn: HttpConnection, request: Request) -> None:
        """Answer ``request`` now or later, exactly once, through ``conn``."""
        ...


class HttpConnection(asyncio.Protocol):
    """The server end of one connection (an ``asyncio.Protocol``)."""

    def __init__(
        self, handler: Handler, loop: asyncio.AbstractEventLoop, keepalive_timeout: float
    ) -> None:
        self._handler = handler
        self._loop = loop
        self._keepalive = keepalive_timeout
        self._parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        #: Server-side connection id, set by the handler (1, 2, ... per service).
        self.id = 0
        #: Requests received on this connection so far.
        self.requests = 0
        #: The verified client certificate's common name (mTLS), else None.
        self.peer_common_name: str | None = None
        #: The request in progress, if any (set by the handler).
        self.in_flight: InFlight | None = None
        #: True when the server closed this connection because it sat idle.
        self.closed_for_idle = False
        self.closed = False
        self._busy = False
        self._dispatching = False
        self._close_after = False
        self._streaming_head = False
        self._reading_paused = False
        self._last_activity = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        if not self._handler.connection_made(self):
            self.reset()
            return
        self._last_activity = self._loop.time()
        self._arm_idle_timer()

    def data_received(self, data: bytes) -> None:
        self._last_activity = self._loop.time()
        self._parser.feed(data)
        if not self._busy:
            self._dispatch()
        elif not self._reading_paused and self._parser.buffered > _MAX_PIPELINED:
            self._reading_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        # Like nginx: a client that closes its side abandons the request in progress.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        in_flight, self.in_flight = self.in_flight, None
        if in_flight is not None:
            in_flight.abort()
        self._handler.connection_lost(self)

    # -- reading -------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Hand complete requests to the handler, one at a time, while none is in progress."""
        if self._dispatching:
            return
        self._dispatching = True
        try:
            while not self._busy and not self.closed and self.transport is not None:
                try:
                    request = self._parser.next_request()
                except ProtocolError as exc:
                    self._protocol_error(exc)
                    return
                if request is None:
                    if self._parser.continue_wanted:
                        self._parser.continue_wanted = False
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    return
                self._busy = True
                self.requests += 1
                self._close_after = not request.keep_alive
                self._handler.handle(self, request)
        finally:
            self._dispatching = False

    def _protocol_error(self, exc: ProtocolError) -> None:
        body = json.dumps({"error": reason(exc.status), "detail": str(exc)}).encode()
        self._busy = True
        self.respond(exc.status, body, close=True)

    # -- writing (handler API) -----------------------------------------------------------

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
        """Write a complete response and finish the request.

        ``close``: say ``Connection: close`` and close after writing. ``close_silently``:
        close after writing without announcing it (a server dropping a keep-alive connection).
        """
        transport = self.transport
        if self.closed or transport is None:
            return
        close = close or self._close_after
        if status in _NO_BODY or status < 200:
            head = list(headers)  # RFC 9110 8.6: no Content-Length on 1xx, 204 (or 304)
            body = b""
        else:
            head = [("content-type", content_type), ("content-length", str(len(body))), *headers]
        if close:
            head.append(("connection", "close"))
        data = response_head(status, head)
        transport.write(data if head_only or not body else data + body)
        self._finished(close or close_silently)

    def start_stream(
        self, status: int, headers: tuple[tuple[str, str], ...] = (), *, head_only: bool = False
    ) -> None:
        """Write a chunked-encoding response head; then :meth:`send_chunk`, :meth:`end_stream`."""
        if self.closed or self.transport is None:
            return
        head = [*headers, ("transfer-encoding", "chunked")]
        if self._close_after:
            head.append(("connection", "close"))
        self.transport.write(response_head(status, head))
        self._streaming_head = head_only

    def send_chunk(self, data: bytes) -> None:
        if self.closed or self.transport is None or not data or self._streaming_head:
            return
        self.transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end_stream(self, *, close_silently: bool = False) -> None:
        if self.closed or self.transport is None:
            return
        if not self._streaming_head:
            self.transport.write(b"0\r\n\r\n")
        self._streaming_head = False
        self._finished(self._close_after or close_silently)

    def reset(self) -> None:
        """Abort the connection with a TCP RST (SO_LINGER 0), answering nothing."""
        transport = self.transport
        if transport is None or self.closed:
            return
        self.closed = True
        abort_with_rst(transport)

    def drop(self) -> None:
        """Close the connection (FIN) without answering the request in progress."""
        if self.transport is not None and not self.closed:
            self._close()

    def _close(self) -> None:
        # From here on nothing is read or written, not even an already pipelined request.
        self.closed = True
        assert self.transport is not None
        self.transport.close()

    def _finished(self, close: bool) -> None:
        self.in_flight = None
        self._busy = False
        assert self.transport is not None
        if close:
            self._close()
            return
        self._last_activity = self._loop.time()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
        if self._idle_timer is None:
            self._arm_idle_timer()
        if self._parser.buffered and not self._dispatching:
            self._dispatch()

    # -- keep-alive timeout --------------------------------------------------------------

    def _arm_idle_timer(self, delay: float | None = None) -> None:
        if self._keepalive == float("inf"):
            return
        self._idle_timer = self._loop.call_later(
            self._keepalive if delay is None else delay, self._idle_check
        )

    def _idle_check(self) -> None:
        """Close if idle ``keepalive_timeout``; one timer per connection, re-armed lazily."""
        self._idle_timer = None
        if self.closed or self._busy:
            return  # re-armed when the request in progress finishes
        remaining = self._last_activity + self._keepalive - self._loop.time()
        if remaining > 0.0005:
            self._arm_idle_timer(remaining)
            return
        self.closed_for_idle = True
        self._handler.connection_idle_closed(self)
        self._close()
