"""The sans-I/O HTTP/2 client (toolpool._h2.H2Client) against a real HTTP/2 server state
machine, in memory, with hypothesis choosing the interleaving.

The peer is ``h2``'s own server side (``H2Connection(client_side=False)``): every byte the
client writes is parsed, flow-controlled and checked by it (it raises on a stream above its
``SETTINGS_MAX_CONCURRENT_STREAMS``, on DATA beyond a window, on any framing error), and every
byte the server writes goes through the client's parser. No sockets: the two byte pipes are
delivered in pieces of random size, so frames arrive split and coalesced in every way.

Hypothesis picks, step by step: streams opened up to and beyond the server's stream limit,
request and response bodies larger than the flow-control windows (small windows on both
ends), the server's WINDOW_UPDATEs held back, responses sent in chunks of random size (with
padding, 1xx heads, trailers, early responses), RST_STREAM from either side, REFUSED_STREAM,
GOAWAY (graceful or with an error) naming a last stream id, PINGs both ways, the server's
stream limit changing, the client draining, closing or losing the transport.

Invariants, after every step and at the end (when every stream is run to completion):

- every stream ends exactly once: a complete response, a reset, or an error, never two and
  never one replaced by another;
- the bytes delivered equal the bytes sent, per stream, both ways (a prefix while in flight);
- the server never holds more open streams than it allows;
- a stream above a GOAWAY's last stream id, or refused, is reported retry-safe
  (:class:`StreamNotProcessed`); any other failure is not;
- no stream is left open once the connection closes, nor on either end once all is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hypothesis.strategies as st
import pytest
from hypothesis import event as note_event
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from toolpool._h2 import H2Client, Stream, StreamNotProcessed, StreamReset

pytestmark = pytest.mark.timeout(600)

Codes = h2.errors.ErrorCodes
MCS = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
IWS = h2.settings.SettingCodes.INITIAL_WINDOW_SIZE
_PATTERN = bytes((i * 7 + i // 251) % 256 for i in range(80_000 + 256))
# Up to beyond the connection's 65,535-byte window (with small stream windows on top).
BODY_SIZES = st.one_of(
    st.just(0), st.integers(1, 300), st.integers(1000, 40_000), st.integers(66_000, 80_000)
)
RESPONSE_SIZES = st.one_of(st.just(0), st.integers(1, 300), st.integers(1000, 30_000))


def body(sid: int, n: int, salt: int) -> bytes:
    """Distinct, deterministic bytes per stream and direction."""
    start = (sid * 31 + salt) % 256
    return _PATTERN[start : start + n]


def outcome(stream: Stream) -> str | None:
    """How the stream ended, from what the client exposes: None while it is still open."""
    if stream.error is not None:
        return f"error:{type(stream.error).__name__}:{id(stream.error)}"
    if stream.ended:
        return "response"
    return None


@dataclass
class ClientSide:
    stream: Stream
    request: bytes
    queued: int  # request bytes handed to send_body so far
    end_queued: bool
    taken: bytearray = field(default_factory=bytearray)
    seen: str | None = None  # the first terminal outcome observed
    cancelled: bool = False
    released: bool = False


@dataclass
class ServerSide:
    response: bytes  # what the server will answer (its size was drawn with the request)
    received: bytearray = field(default_factory=bytearray)
    request_ended: bool = False
    unacked: int = 0  # request bytes not yet credited back (the WINDOW_UPDATE held back)
    head_sent: bool = False
    sent: int = 0
    ended: bool = False
    reset_by_server: int | None = None
    reset_by_client: int | None = None
    ignored: bool = False  # above our GOAWAY's last stream id: never processed


class H2Peers(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.client: H2Client
        self.server: h2.connection.H2Connection
        self.c2s = bytearray()
        self.s2c = bytearray()
        self.cs: dict[int, ClientSide] = {}
        self.ss: dict[int, ServerSide] = {}
        self.planned: dict[int, int] = {}  # response size per stream id, drawn at open
        self.goaway_last: int | None = None  # what the server announced (lowest)
        self.goaway_error = False
        self.server_stopped = False  # error GOAWAY: the server reads no more
        self.transport_gone = False
        self.client_closed = False
        self.client_pings: list[bytes] = []
        self.server_pings: set[bytes] = set()
        self.server_pings_acked: set[bytes] = set()
        #: SETTINGS frames the client has not acknowledged yet. h2 pairs an ACK with the
        #: oldest *pending* value of each setting and does not count its preface's SETTINGS,
        #: so the server keeps at most one outstanding, which makes its bookkeeping exact.
        self.settings_outstanding = 0
        self.window_to_announce: int | None = None

    # -- set-up --------------------------------------------------------------------------

    @initialize(
        limit=st.integers(1, 4),
        server_window=st.sampled_from([100, 1000, 16384, 65535]),
        client_window=st.sampled_from([1024, 16384, 65535]),
        client_connection_window=st.sampled_from([65535, 100_000, 1 << 24]),
    )
    def setup(
        self, limit: int, server_window: int, client_window: int, client_connection_window: int
    ) -> None:
        self.client = H2Client(
            receive_window=client_window, connection_window=client_connection_window
        )
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.server = h2.connection.H2Connection(config=config)
        # The stream limit in force from the preface on (a client opens one stream before it
        # has the server's SETTINGS); the window, as RFC 9113 6.9.2 says, only once the client
        # acknowledged it (until then the client may use the default 65,535).
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={MCS: limit})
        self.server.initiate_connection()
        self.settings_outstanding = 1
        self.window_to_announce = server_window  # once the preface's SETTINGS are acked
        self.s2c += self.server.data_to_send()
        self.c2s += self.client.initiate()

    # -- plumbing ------------------------------------------------------------------------

    def _client_out(self) -> None:
        if not self.transport_gone:
            self.c2s += self.client.data_to_send()

    def _server_out(self) -> None:
        if not self.transport_gone and not self.server_stopped:
            self.s2c += self.server.data_to_send()

    def _live(self, sid: int) -> ServerSide | None:
        """The server's view of ``sid`` if it may still act on it."""
        side = self.ss.get(sid)
        if (
            side is None
            or self.server_stopped
            or self.transport_gone
            or side.ignored
            or side.ended
            or side.reset_by_server is not None
            or side.reset_by_client is not None
        ):
            return None
        return side

    def _server_receive(self, data: bytes) -> None:
        limit_before = self.server.local_settings.max_concurrent_streams
        # h2 raises on any protocol violation, TooManyStreamsError included (checked per
        # HEADERS frame against the limit the client has acknowledged by then).
        events = self.server.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                sid = event.stream_id
                assert sid is not None
                # The server's own count, with this stream: never above what it allows.
                # Checked again after the whole read: the limit in force before it or after
                # it (an ACK in the same read may have lowered it).
                in_force = max(limit_before, self.server.local_settings.max_concurrent_streams)
                assert self.server.open_inbound_streams <= in_force, (
                    "more concurrent streams than the server allows"
                )
                ignored = self.goaway_last is not None and sid > self.goaway_last
                self.ss[sid] = ServerSide(
                    response=body(sid, self.planned[sid], 1),
                    request_ended=event.stream_ended is not None,
                    ignored=ignored,
                )
            elif isinstance(event, h2.events.DataReceived):
                side = self.ss[event.stream_id or 0]
                side.received += event.data or b""
                side.unacked += event.flow_controlled_length or 0
                if event.stream_ended is not None:
                    side.request_ended = True
            elif isinstance(event, h2.events.StreamEnded):
                self.ss[event.stream_id or 0].request_ended = True
            elif isinstance(event, h2.events.StreamReset):
                side = self.ss.get(event.stream_id or 0)
                if side is not None and side.reset_by_server is None:
                    side.reset_by_client = int(event.error_code or 0)
            elif isinstance(event, h2.events.SettingsAcknowledged):
                self.settings_outstanding -= 1
            elif isinstance(event, h2.events.PingAckReceived):
                self.server_pings_acked.add(event.ping_data or b"")
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.server_stopped = True  # the client's GOAWAY: it is closing
        if self.window_to_announce and not self.settings_outstanding and not self.server_stopped:
            self.server.update_settings({IWS: self.window_to_announce})
            self.settings_outstanding += 1
            self.window_to_announce = None
        self._server_out()

    def _deliver_to_server(self, n: int) -> None:
        self._client_out()
        if self.server_stopped or self.transport_gone or not self.c2s:
            return
        data = bytes(self.c2s[:n])
        del self.c2s[:n]
        self._server_receive(data)

    def _deliver_to_client(self, n: int) -> None:
        self._server_out()
        if self.transport_gone or self.client_closed or not self.s2c:
            # After close() the driver closes the socket: the client reads nothing more.
            return
        data = bytes(self.s2c[:n])
        del self.s2c[:n]
        self.client.receive(data)
        self._client_out()

    def _open_client_streams(self) -> list[ClientSide]:
        return [c for c in self.cs.values() if not c.released and not c.cancelled]

    # -- the client (what a driver does) -------------------------------------------------

    @rule(
        size=BODY_SIZES,
        first=st.floats(0, 1),
        response=RESPONSE_SIZES,
        headers=st.lists(
            st.sampled_from(
                [
                    (b"Connection", b"keep-alive"),
                    (b"te", b"gzip"),
                    (b"te", b"trailers"),
                    (b"x-tenant", b"t1"),
                    (b"Host", b"ignored.test"),
                ]
            ),
            max_size=3,
        ),
    )
    def open_stream(
        self, size: int, first: float, response: int, headers: list[tuple[bytes, bytes]]
    ) -> None:
        """Open a stream if the client accepts one; beyond the limit it must refuse."""
        client = self.client
        if not client.accepting:
            why = (
                client.closed
                or client.goaway_received
                or client.draining
                or (not client.settings_received and bool(client.streams))
                or client.streams_in_use >= client.max_streams
                or client._h2.open_outbound_streams >= client.max_streams
            )
            assert why, "the client refuses a stream for no reason"
            with pytest.raises(RuntimeError):
                client.open_stream(b"GET", b"https", b"a.test", b"/", [], end_stream=True)
            if client.settings_received and client.streams_in_use >= client.max_streams:
                note_event("a stream refused at the server's stream limit")
            return
        if client.settings_received:
            assert client.streams_in_use < self.client.max_streams
        sid = client._h2.get_next_available_stream_id()
        self.planned[sid] = response
        stream = client.open_stream(
            b"POST" if size else b"GET",
            b"https",
            b"a.test",
            b"/x",
            [(b"content-length", str(size).encode()), *headers],
            end_stream=size == 0,
        )
        assert stream.stream_id == sid
        request = body(sid, size, 0)
        part = int(size * first)
        side = ClientSide(stream, request, queued=0, end_queued=size == 0)
        self.cs[sid] = side
        if size:
            client.send_body(stream, request[:part], end=part == size)
            side.queued, side.end_queued = part, part == size
        self._client_out()

    @rule(data=st.data())
    def send_rest(self, data: st.DataObject) -> None:
        """The caller hands the rest of a request body over (and END_STREAM)."""
        waiting = [c for c in self._open_client_streams() if not c.end_queued]
        if not waiting:
            return
        side = data.draw(st.sampled_from(waiting))
        self.client.send_body(side.stream, side.request[side.queued :], end=True)
        side.queued, side.end_queued = len(side.request), True
        self._client_out()

    @rule(data=st.data())
    def take_body(self, data: st.DataObject) -> None:
        readable = [c for c in self._open_client_streams() if c.stream.chunks]
        if not readable:
            return
        side = data.draw(st.sampled_from(readable))
        chunk = self.client.take_body(side.stream)
        assert chunk is not None
        side.taken += chunk
        self._client_out()

    @rule(data=st.data())
    def release_done(self, data: st.DataObject) -> None:
        """The caller is done with a finished stream (read to the end, or failed)."""
        done = [c for c in self._open_client_streams() if c.stream.done]
        if not done:
            return
        side = data.draw(st.sampled_from(done))
        self.client.release(side.stream)
        side.released = True
        assert side.stream.stream_id not in self.client.streams
        self._client_out()

    @rule(data=st.data(), weight=st.integers(0, 2))
    def cancel(self, data: st.DataObject, weight: int) -> None:
        """The caller gives up (timeout, task cancelled): RST_STREAM, the connection stays."""
        if weight:
            return
        live = self._open_client_streams()
        if not live:
            return
        side = data.draw(st.sampled_from(live))
        self.client.cancel(side.stream)
        side.cancelled = True
        assert side.stream.stream_id not in self.client.streams
        self._client_out()

    @rule()
    def client_ping(self) -> None:
        if not self.client.closed:
            self.client_pings.append(self.client.ping())
            self._client_out()

    @precondition(lambda self: not self.client.draining)
    @rule()
    def drain(self) -> None:
        self.client.drain()
        assert not self.client.accepting

    @precondition(lambda self: not self.transport_gone)
    @rule(weight=st.integers(0, 30))
    def client_closes(self, weight: int) -> None:
        """Close now (GOAWAY(NO_ERROR)); rarely, so that most runs go deep."""
        if weight:
            return
        self.c2s += self.client.close()
        self.client_closed = True

    @precondition(lambda self: not self.transport_gone)
    @rule(weight=st.integers(0, 30), reset=st.booleans())
    def transport_lost(self, weight: int, reset: bool) -> None:
        if weight:
            return
        self.client.connection_lost(ConnectionResetError() if reset else None)
        self.transport_gone = True

    # -- the wire ------------------------------------------------------------------------

    @rule(n=st.integers(1, 70_000))
    def to_server(self, n: int) -> None:
        self._deliver_to_server(n)

    @rule(n=st.integers(1, 70_000))
    def to_client(self, n: int) -> None:
        self._deliver_to_client(n)

    # -- the server ----------------------------------------------------------------------

    def _pick_live(self, data: st.DataObject, ok: object = None) -> tuple[int, ServerSide] | None:
        live = [(sid, side) for sid in sorted(self.ss) if (side := self._live(sid)) is not None]
        if ok is not None:
            live = [(sid, side) for sid, side in live if ok(side)]  # type: ignore[operator]
        if not live:
            return None
        return data.draw(st.sampled_from(live))

    @rule(data=st.data(), informational=st.booleans(), early=st.booleans())
    def server_head(self, data: st.DataObject, informational: bool, early: bool) -> None:
        """The response head (after a 1xx, sometimes); a body-less response ends with it.
        ``early``: answer before the request body has fully arrived (RFC 9113 8.1)."""
        picked = self._pick_live(data, lambda s: not s.head_sent and (early or s.request_ended))
        if picked is None:
            return
        sid, side = picked
        if informational:
            self.server.send_headers(sid, [(b":status", b"100")])
        end = not side.response
        self.server.send_headers(
            sid, [(b":status", b"200"), (b"x-sid", str(sid).encode())], end_stream=end
        )
        side.head_sent, side.ended = True, end
        self._server_out()

    @rule(data=st.data(), size=st.integers(1, 20_000), pad=st.sampled_from([None, 0, 9, 255]))
    def server_data(self, data: st.DataObject, size: int, pad: int | None) -> None:
        """A piece of the response body, as much of ``size`` as the client's windows allow."""
        picked = self._pick_live(data, lambda s: s.head_sent and s.sent < len(s.response))
        if picked is None:
            return
        sid, side = picked
        padding = 0 if pad is None else pad + 1
        window = min(
            self.server.local_flow_control_window(sid), self.server.max_outbound_frame_size
        )
        n = min(size, len(side.response) - side.sent, window - padding)
        if n <= 0:
            return  # the client has not opened its window (yet)
        chunk = side.response[side.sent : side.sent + n]
        end = side.sent + n == len(side.response)
        self.server.send_data(sid, chunk, end_stream=end, pad_length=pad)
        side.sent += n
        side.ended = end
        self._server_out()

    @rule(data=st.data())
    def server_trailers(self, data: st.DataObject) -> None:
        picked = self._pick_live(data, lambda s: s.head_sent and s.sent == len(s.response))
        if picked is None:
            return
        sid, side = picked
        self.server.send_headers(sid, [(b"x-checksum", b"ok")], end_stream=True)
        side.ended = True
        self._server_out()

    def _credit(self, sid: int, side: ServerSide) -> None:
        # h2 credits the connection window, and the stream's while it is open.
        self.server.acknowledge_received_data(side.unacked, sid)
        side.unacked = 0

    @precondition(lambda self: not self.server_stopped and not self.transport_gone)
    @rule(data=st.data())
    def server_credits(self, data: st.DataObject) -> None:
        """The server's WINDOW_UPDATE for what it read of a request body, late."""
        owed = [(sid, side) for sid, side in sorted(self.ss.items()) if side.unacked]
        if not owed:
            return
        self._credit(*data.draw(st.sampled_from(owed)))
        self._server_out()

    @rule(
        data=st.data(),
        code=st.sampled_from([Codes.CANCEL, Codes.INTERNAL_ERROR, Codes.NO_ERROR]),
        weight=st.integers(0, 2),
    )
    def server_resets(self, data: st.DataObject, code: Codes, weight: int) -> None:
        if weight:
            return
        picked = self._pick_live(data)
        if picked is None:
            return
        sid, side = picked
        self.server.reset_stream(sid, code)
        side.reset_by_server = int(code)
        self._server_out()

    @rule(data=st.data())
    def server_stops_request(self, data: st.DataObject) -> None:
        """RFC 9113 8.1: a complete (early) response, then RST_STREAM(NO_ERROR) to stop the
        rest of the request body."""
        if self.server_stopped or self.transport_gone:
            return
        early = [
            (sid, s)
            for sid, s in sorted(self.ss.items())
            if s.ended
            and not s.request_ended
            and s.reset_by_server is None
            and s.reset_by_client is None
        ]
        if not early:
            return
        sid, side = data.draw(st.sampled_from(early))
        self.server.reset_stream(sid, Codes.NO_ERROR)
        side.reset_by_server = int(Codes.NO_ERROR)
        self._server_out()

    @rule(data=st.data(), weight=st.integers(0, 2))
    def server_refuses(self, data: st.DataObject, weight: int) -> None:
        """REFUSED_STREAM: only for a stream the server has not acted on."""
        if weight:
            return
        picked = self._pick_live(data, lambda s: not s.head_sent)
        if picked is None:
            return
        sid, side = picked
        self.server.reset_stream(sid, Codes.REFUSED_STREAM)
        side.reset_by_server = int(Codes.REFUSED_STREAM)
        self._server_out()

    @precondition(lambda self: not self.server_stopped and not self.transport_gone)
    @rule(data=st.data(), error=st.sampled_from([False, False, True]), weight=st.integers(0, 8))
    def server_goaway(self, data: st.DataObject, error: bool, weight: int) -> None:
        """GOAWAY naming a last stream id no lower than any stream it answered (it may have
        acted on those), no higher than the highest it saw; an error GOAWAY stops it. Rarely,
        so that most runs go deep."""
        if weight:
            return
        acted = [
            sid
            for sid, s in self.ss.items()
            if s.head_sent or s.reset_by_server not in (None, Codes.REFUSED_STREAM)
        ]
        low = max(acted, default=0)
        high = self.server.highest_inbound_stream_id
        if self.goaway_last is not None:
            high = min(high, self.goaway_last)
        if low > high:
            return
        last = data.draw(st.integers(low, high))
        saved = self.server.state_machine.state
        code = Codes.INTERNAL_ERROR if error else Codes.NO_ERROR
        self.server.close_connection(error_code=code, last_stream_id=last)
        if error:
            self.goaway_error = True
        else:
            self.server.state_machine.state = saved  # drain: finish the streams up to `last`
        self.goaway_last = last
        for sid, side in self.ss.items():
            if sid > last:
                side.ignored = True
        self._server_out()
        if error:
            self.server_stopped = True

    @rule()
    def server_ping(self) -> None:
        if not self.server_stopped and not self.transport_gone:
            payload = len(self.server_pings).to_bytes(8, "big")
            self.server_pings.add(payload)
            self.server.ping(payload)
            self._server_out()

    @rule(limit=st.integers(1, 4))
    def server_changes_limit(self, limit: int) -> None:
        """New SETTINGS_MAX_CONCURRENT_STREAMS; h2 applies it once the client acknowledges."""
        if self.server_stopped or self.transport_gone or self.settings_outstanding:
            return
        self.server.update_settings({MCS: limit})
        self.settings_outstanding += 1
        self._server_out()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def each_stream_ends_once(self) -> None:
        if not hasattr(self, "client"):
            return
        for sid, side in self.cs.items():
            now = outcome(side.stream)
            if side.seen is not None:
                assert now == side.seen, f"stream {sid} ended twice: {side.seen}, then {now}"
            side.seen = now

    @invariant()
    def bytes_delivered_are_bytes_sent(self) -> None:
        if not hasattr(self, "client"):
            return
        for sid, side in self.cs.items():
            server = self.ss.get(sid)
            got = bytes(server.received) if server is not None else b""
            assert side.request[: len(got)] == got, f"stream {sid}: request bytes differ"
            if server is not None and server.request_ended and not server.reset_by_client:
                assert got == side.request, f"stream {sid}: request cut short"
            sent = server.response[: server.sent] if server is not None else b""
            assert sent[: len(side.taken)] == bytes(side.taken), (
                f"stream {sid}: response bytes differ"
            )

    @invariant()
    def retry_safe_exactly_when_not_processed(self) -> None:
        if not hasattr(self, "client"):
            return
        last = self.client.goaway_last_stream_id
        for sid, side in self.cs.items():
            error = side.stream.error
            server = self.ss.get(sid)
            if isinstance(error, StreamNotProcessed):
                refused = server is not None and server.reset_by_server == Codes.REFUSED_STREAM
                above = last is not None and sid > last
                assert refused or above, f"stream {sid} called retry-safe but was not refused"
                assert server is None or not server.head_sent, (
                    f"stream {sid} called retry-safe but the server answered it"
                )
            elif error is not None:
                assert not getattr(error, "retry_safe", False)
                if isinstance(error, StreamReset):
                    assert server is not None and server.reset_by_server == error.error_code
            if last is not None and sid > last and not side.cancelled and not side.released:
                assert isinstance(error, StreamNotProcessed), (
                    f"stream {sid} is above GOAWAY's last stream id {last} but {error!r}"
                )

    @invariant()
    def nothing_open_after_close(self) -> None:
        if not hasattr(self, "client"):
            return
        if self.client.closed:
            for sid, stream in self.client.streams.items():
                assert stream.error is not None or stream.ended, f"stream {sid} left open"
            assert not self.client.accepting

    # -- the end: run everything to completion ---------------------------------------------

    def teardown(self) -> None:
        if not hasattr(self, "client"):
            return
        for _ in range(5000):
            before = self._progress_marker()
            for side in self._open_client_streams():
                if not side.end_queued:
                    self.client.send_body(side.stream, side.request[side.queued :], end=True)
                    side.queued, side.end_queued = len(side.request), True
            self._deliver_to_server(1 << 30)
            self._server_finishes_everything()
            self._deliver_to_client(1 << 30)
            for side in self._open_client_streams():
                while (chunk := self.client.take_body(side.stream)) is not None:
                    side.taken += chunk
                if side.stream.done:
                    self.client.release(side.stream)
                    side.released = True
            self._client_out()
            self.each_stream_ends_once()
            self.bytes_delivered_are_bytes_sent()
            self.retry_safe_exactly_when_not_processed()
            self.nothing_open_after_close()
            if self._progress_marker() == before:
                break
        else:
            raise AssertionError("the exchange never settled")
        self._check_settled()

    def _progress_marker(self) -> tuple[object, ...]:
        return (
            len(self.c2s),
            len(self.s2c),
            sum(len(s.taken) for s in self.cs.values()),
            sum(len(s.received) + s.sent + s.unacked for s in self.ss.values()),
            sum(s.released for s in self.cs.values()),
            sum(s.ended for s in self.ss.values()),
            sum(s.request_ended for s in self.ss.values()),
        )

    def _server_finishes_everything(self) -> None:
        if self.server_stopped or self.transport_gone:
            return
        for sid in sorted(self.ss):
            if self.ss[sid].unacked:
                self._credit(sid, self.ss[sid])
            side = self._live(sid)
            if side is None:
                continue
            if not side.head_sent:
                end = not side.response
                self.server.send_headers(sid, [(b":status", b"200")], end_stream=end)
                side.head_sent, side.ended = True, end
            while side.sent < len(side.response):
                window = min(
                    self.server.local_flow_control_window(sid), self.server.max_outbound_frame_size
                )
                if window <= 0:
                    break
                n = min(window, len(side.response) - side.sent)
                end = side.sent + n == len(side.response)
                self.server.send_data(sid, side.response[side.sent : side.sent + n], end_stream=end)
                side.sent += n
                side.ended = end
        self._server_out()

    def _check_settled(self) -> None:
        client = self.client
        for side in self.cs.values():
            error = side.stream.error
            note_event(f"stream outcome: {type(error).__name__ if error else side.seen}")
            if len(side.request) > 65535 and side.seen == "response":
                note_event("a request body larger than the connection window, answered")
        if self.goaway_last is not None:
            note_event(f"GOAWAY ({'error' if self.goaway_error else 'graceful'})")
        interrupted = self.transport_gone or self.client_closed or self.goaway_error
        # Every stream the caller opened ended exactly once, and was let go.
        for sid, side in self.cs.items():
            assert side.cancelled or side.released, f"stream {sid} never finished"
            if side.cancelled:
                continue
            assert side.seen is not None
            server = self.ss.get(sid)
            if side.seen == "response":
                assert server is not None
                assert bytes(side.taken) == server.response, f"stream {sid}: body differs"
                if server.request_ended:
                    assert bytes(server.received) == side.request, f"stream {sid}: request"
            elif not interrupted:
                # Nothing broke the connection: only the server's resets fail a stream, and
                # its graceful GOAWAY those above the last stream id (the others complete).
                above = self.goaway_last is not None and sid > self.goaway_last
                reset = server is not None and server.reset_by_server is not None
                assert above or reset, f"stream {sid} failed for no reason: {side.stream.error!r}"
        assert not client.streams, "the client still holds streams"
        if client.closed:
            return
        # Nothing left open on either end: a reusable connection is ready for the next stream.
        assert client._h2.open_outbound_streams == 0 or client.goaway_received, (
            f"{client._h2.open_outbound_streams} h2 streams left open on the client"
        )
        if client.reusable:
            assert self.server.open_inbound_streams == 0, "streams left open on the server"
            assert client.accepting, "an idle, healthy connection takes no new stream"
        else:
            assert client.should_close
        if not self.server_stopped and not interrupted:
            for payload in self.client_pings:
                assert client.ping_answered(payload), "a client PING unanswered"
            assert self.server_pings <= self.server_pings_acked, "a server PING unanswered"


TestH2Peers = H2Peers.TestCase
TestH2Peers.settings = settings(
    max_examples=300,
    stateful_step_count=100,
    deadline=None,
    report_multiple_bugs=False,
)


# -- worked examples: one per invariant, and the bugs the machine above found -----------------


class Pair:
    """An H2Client and an h2 server, connected in memory, settings exchanged."""

    def __init__(self, limit: int = 100, **client: int) -> None:
        self.client = H2Client(**client)
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.server = h2.connection.H2Connection(config=config)
        self.server.local_settings = h2.settings.Settings(client=False, initial_values={MCS: limit})
        self.server.initiate_connection()
        self.events: list[h2.events.Event] = []
        self.to_server(self.client.initiate())
        self.to_client()
        self.to_server()
        assert self.client.settings_received

    def to_server(self, data: bytes | None = None) -> list[h2.events.Event]:
        events = self.server.receive_data(self.client.data_to_send() if data is None else data)
        self.events += events
        return events

    def to_client(self) -> set[int]:
        return self.client.receive(self.server.data_to_send())

    def get(self, end_stream: bool = True) -> Stream:
        return self.client.open_stream(b"GET", b"https", b"a.test", b"/", [], end_stream=end_stream)

    def read_all(self, stream: Stream) -> bytes:
        out = b""
        while (chunk := self.client.take_body(stream)) is not None:
            out += chunk
        return out


def test_a_stream_ends_once_even_when_cancelled_after_its_response() -> None:
    """Regression: cancelling a stream whose response had completed (its request body still
    queued) replaced the response by a "cancelled" error. Now only our half is reset."""
    pair = Pair()
    stream = pair.get(end_stream=False)
    pair.client.send_body(stream, b"x" * 10, end=False)
    pair.to_server()
    pair.server.send_headers(stream.stream_id, [(b":status", b"204")], end_stream=True)
    pair.to_client()
    assert stream.ended and stream.error is None
    pair.client.cancel(stream)
    assert stream.error is None and stream.ended  # still the response it was
    events = pair.to_server()
    assert any(isinstance(e, h2.events.StreamReset) for e in events)  # our half, closed
    assert pair.server.open_inbound_streams == 0


def test_bytes_delivered_equal_bytes_sent_through_small_late_windows() -> None:
    """A request body larger than the stream's and the connection's windows goes out as the
    server's WINDOW_UPDATEs arrive (late, all at once); a response in padded, odd-sized
    chunks through a 1 KiB stream window comes out whole."""
    pair = Pair(receive_window=1024, connection_window=65535)
    pair.server.update_settings({IWS: 1000})
    pair.to_client()
    pair.to_server()  # the client's ACK: 1,000 bytes per stream from now on
    request = body(1, 150_000, 0)
    stream = pair.get(end_stream=False)
    pair.client.send_body(stream, request, end=True)
    received = b""
    for _ in range(1000):
        for event in pair.to_server():
            if isinstance(event, h2.events.DataReceived):
                received += event.data or b""
                pair.server.acknowledge_received_data(event.flow_controlled_length or 0, 1)
        if len(received) == len(request):
            break
        pair.to_client()  # the late WINDOW_UPDATEs
    assert received == request
    assert stream.request_sent
    response = body(1, 20_000, 1)
    pair.server.send_headers(1, [(b":status", b"200")])
    sent, got = 0, b""
    while sent < len(response) or not stream.ended:
        window = pair.server.local_flow_control_window(1)
        n = min(window - 10, 777, len(response) - sent)
        if n > 0:
            end = sent + n == len(response)
            pair.server.send_data(1, response[sent : sent + n], end_stream=end, pad_length=9)
            sent += n
        pair.to_client()
        got += pair.read_all(stream)
        pair.to_server()
    assert got == response


def test_the_client_never_opens_more_streams_than_the_server_allows() -> None:
    pair = Pair(limit=2)
    a, b = pair.get(), pair.get()
    assert not pair.client.accepting
    with pytest.raises(RuntimeError, match="no new stream"):
        pair.get()
    pair.to_server()
    assert pair.server.open_inbound_streams == 2
    pair.server.send_headers(a.stream_id, [(b":status", b"200")], end_stream=True)
    pair.to_client()
    pair.client.release(a)
    assert pair.client.accepting and b.status is None
    pair.get()
    pair.to_server()  # h2 would raise TooManyStreamsError above 2
    assert pair.server.open_inbound_streams == 2


def test_goaway_streams_above_last_are_retry_safe_and_the_others_complete() -> None:
    """Regression: a GOAWAY(NO_ERROR) followed in the same read by the DATA of a stream at or
    below its last stream id (nginx's graceful shutdown) failed every stream as a protocol
    error. Now the streams below complete and those above say "retry elsewhere"."""
    pair = Pair()
    low, high = pair.get(), pair.get()
    pair.to_server()
    pair.server.send_headers(low.stream_id, [(b":status", b"200")])
    state = pair.server.state_machine.state
    pair.server.close_connection(0, last_stream_id=low.stream_id)
    pair.server.state_machine.state = state  # the server keeps serving `low`
    pair.server.send_data(low.stream_id, b"done", end_stream=True)
    pair.to_client()  # HEADERS, GOAWAY and DATA in one read
    assert isinstance(high.error, StreamNotProcessed) and high.error.retry_safe
    assert low.error is None and low.ended and pair.read_all(low) == b"done"
    assert not pair.client.accepting
    pair.client.release(low)
    pair.client.release(high)
    assert pair.client.should_close


def test_an_error_goaway_fails_streams_at_or_below_last_not_retry_safe() -> None:
    pair = Pair()
    low, high = pair.get(), pair.get()
    pair.to_server()
    pair.server.close_connection(Codes.INTERNAL_ERROR, last_stream_id=low.stream_id)
    pair.to_client()
    assert isinstance(high.error, StreamNotProcessed)
    assert low.error is not None and not getattr(low.error, "retry_safe", False)
    assert pair.client.closed


def test_refused_stream_is_retry_safe_other_resets_are_not() -> None:
    pair = Pair()
    refused, reset = pair.get(), pair.get()
    pair.to_server()
    pair.server.reset_stream(refused.stream_id, Codes.REFUSED_STREAM)
    pair.server.reset_stream(reset.stream_id, Codes.INTERNAL_ERROR)
    pair.to_client()
    assert isinstance(refused.error, StreamNotProcessed)
    assert isinstance(reset.error, StreamReset) and not reset.error.retry_safe
    assert reset.error.error_code == Codes.INTERNAL_ERROR
    assert pair.client.accepting  # the connection carries on


def test_no_stream_left_open_after_the_connection_is_lost() -> None:
    pair = Pair()
    streams = [pair.get() for _ in range(3)]
    pair.to_server()
    pair.server.send_headers(streams[0].stream_id, [(b":status", b"200")], end_stream=True)
    pair.to_client()
    pair.client.connection_lost(ConnectionResetError())
    assert streams[0].error is None and streams[0].ended  # it had completed
    assert all(s.error is not None for s in streams[1:])
    assert pair.client.closed and not pair.client.accepting


def test_an_early_response_releases_its_stream_on_both_ends() -> None:
    """Regression: a complete response before the request body (RFC 9113 8.1, no
    RST_STREAM(NO_ERROR) from the server), released by the caller, left the stream half-open
    on both ends for the connection's life; with a stream limit of 1 the connection never
    took another stream. Now the complete response stops the body at once: the rest is
    dropped unsent and our half closes with RST_STREAM(NO_ERROR) (not CANCEL: the exchange
    succeeded), before the caller even releases the stream."""
    pair = Pair(limit=1)
    pair.server.update_settings({IWS: 10})
    pair.to_client()
    pair.to_server()
    stream = pair.get(end_stream=False)
    pair.client.send_body(stream, b"y" * 100, end=True)  # 90 bytes wait for window
    pair.to_server()
    pair.server.send_headers(stream.stream_id, [(b":status", b"413")], end_stream=True)
    pair.to_client()
    assert stream.done and stream.request_sent and stream.abandoned and not stream.fully_sent
    assert pair.client.outbound_pending(stream) == 0 and stream.error is None
    events = pair.to_server()
    (reset,) = [e for e in events if isinstance(e, h2.events.StreamReset)]
    assert (reset.stream_id, reset.error_code) == (stream.stream_id, 0)  # NO_ERROR
    assert pair.server.open_inbound_streams == 0
    assert not [e for e in events if isinstance(e, h2.events.DataReceived)]  # no more body
    assert pair.client.resets_sent == 0  # not a cancellation
    pair.client.release(stream)
    pair.to_server()
    assert pair.server.open_inbound_streams == 0
    assert pair.client.accepting
    pair.get()
    pair.to_server()


def test_acknowledgements_read_just_before_a_goaway_are_sent() -> None:
    """Regression: h2 empties its send buffer when a GOAWAY arrives, dropping the PING ACK
    (and SETTINGS ACK) for frames read just before it in the same read."""
    pair = Pair()
    stream = pair.get()
    pair.to_server()
    pair.server.ping(b"pingpong")
    state = pair.server.state_machine.state
    pair.server.close_connection(0, last_stream_id=stream.stream_id)
    pair.server.state_machine.state = state
    pair.to_client()
    events = pair.to_server()
    assert any(isinstance(e, h2.events.PingAckReceived) for e in events)


def test_a_1xx_crossing_our_reset_fails_only_that_stream() -> None:
    """Regression: a 1xx head arriving on a stream we had just reset was an invalid state
    transition to h2, which failed the whole connection and all its streams."""
    pair = Pair()
    cancelled, other = pair.get(), pair.get()
    pair.to_server()
    pair.server.send_headers(cancelled.stream_id, [(b":status", b"103")])
    pair.client.cancel(cancelled)  # our RST_STREAM crosses the server's 103
    pair.to_client()
    assert not pair.client.closed and other.error is None
    pair.server.send_headers(other.stream_id, [(b":status", b"200")], end_stream=True)
    pair.to_client()
    assert other.ended and other.status == 200
