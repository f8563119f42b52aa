"""A blocking HTTP/2 client on h2 for frame-level checks of the test bed, TLS + ALPN
connects for toolpool._h2io's connections, and a scripted HTTP/2 server for behaviour the
test bed does not offer (tests only)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trustme

from toolpool._h2io import Handshaken


class RawH2:
    """One TLS connection negotiating ``h2`` (or what the server picks); events are collected."""

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, *, timeout: float = 5.0):
        context.set_alpn_protocols(["h2", "http/1.1"])
        sock = socket.create_connection(address, timeout=timeout)
        self.sock = context.wrap_socket(sock, server_hostname=address[0])
        self.alpn = self.sock.selected_alpn_protocol()
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.closed = False
        if self.alpn == "h2":
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(self, path: str, headers: dict[str, str] | None = None) -> int:
        sid = self.conn.get_next_available_stream_id()
        block = [
            (":method", "GET"),
            (":path", path),
            (":scheme", "https"),
            (":authority", "127.0.0.1"),
            *(headers or {}).items(),
        ]
        self.conn.send_headers(sid, block, end_stream=True)
        self.flush()
        return sid

    def read_until(self, predicate: Any, *, timeout: float = 5.0) -> list[h2.events.Event]:
        """Read until ``predicate(events)`` holds (raises TimeoutError on socket timeout)."""
        self.sock.settimeout(timeout)
        while not predicate(self.events):
            data = self.sock.recv(65536)
            if not data:
                self.closed = True
                if predicate(self.events):
                    break
                raise ConnectionError(f"closed by the server; events: {self.events}")
            self.events.extend(self.conn.receive_data(data))
            self.flush()
        return self.events

    def of(self, kind: type, stream_id: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream_id is None or getattr(e, "stream_id", None) == stream_id)
        ]

    def close(self) -> None:
        self.sock.close()


async def open_tls(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float | None = None,
    alpn: tuple[str, ...] = ("h2", "http/1.1"),
) -> tuple[str | None, asyncio.Transport]:
    """Connect with TLS offering ``alpn``; returns (the protocol the server picked, the
    transport). Hand an ``"h2"`` transport to :meth:`toolpool._h2io.AsyncH2Connection.adopt`."""
    ssl_context.set_alpn_protocols(list(alpn))
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, _ = await loop.create_connection(
            Handshaken, host, port, ssl=ssl_context, server_hostname=server_hostname or host
        )
    ssl_object = transport.get_extra_info("ssl_object")
    chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
    return chosen, transport


def open_tls_sync(
    host: str,
    port: int,
    ssl_context: ssl.SSLContext,
    *,
    server_hostname: str | None = None,
    timeout: float | None = None,
    alpn: tuple[str, ...] = ("h2", "http/1.1"),
) -> tuple[str | None, ssl.SSLSocket]:
    """Connect with TLS offering ``alpn``; returns (the protocol picked, the socket)."""
    ssl_context.set_alpn_protocols(list(alpn))
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
    except BaseException:
        sock.close()
        raise
    return tls.selected_alpn_protocol(), tls


@dataclass
class ScriptedStream:
    """What the scripted server saw of one stream."""

    path: str
    #: Request body bytes received (DATA), and whether the request's END_STREAM arrived.
    received: int = 0
    request_ended: bool = False
    #: The error code of the client's RST_STREAM, if it sent one.
    reset_code: int | None = None
    answered: bool = False


@dataclass
class ScriptedConnection:
    streams: dict[int, ScriptedStream] = field(default_factory=dict)
    #: The most streams open at once on this connection (h2's count of open inbound streams).
    most_open: int = 0
    #: The server's SETTINGS went out (see `ScriptedH2Server`'s `preface`).
    settings_sent: bool = False


#: A script: called with (h2 connection, stream id, the stream's record) when a request's
#: HEADERS arrive and again when its END_STREAM does (`record.request_ended` tells which);
#: it may send frames on the h2 connection (the server writes them after the call).
Script = Callable[[h2.connection.H2Connection, int, ScriptedStream], None]


class ScriptedH2Server:
    """An HTTP/2 server on 127.0.0.1 over TLS (ALPN ``h2`` only), one thread per connection,
    whose answers are a test's `script` and whose SETTINGS the test chooses (e.g.
    ``INITIAL_WINDOW_SIZE`` 0: the client may send no request body at all). It records each
    stream (`connections`) and sets `changed` on every frame it reads::

        with ScriptedH2Server(script, {SettingCodes.INITIAL_WINDOW_SIZE: 0}) as server:
            pool = toolpool.Pool([Destination("x", server.url)], verify=server.client_context())
    """

    def __init__(
        self,
        script: Script,
        settings: dict[int, int] | None = None,
        *,
        preface: str = "settings",
        preface_connections: int | None = None,
        settings_gate: threading.Event | None = None,
    ) -> None:
        """`settings` go out in the server's preface and take effect when the client
        acknowledges them (RFC 9113 6.5.3: before that, the client may rely on the
        defaults). `preface` says what the server does first on its first
        `preface_connections` connections (all by default; later ones: "settings"):

        - ``"settings"``: its SETTINGS at once, as servers do;
        - ``"after_headers"``: nothing until a request's HEADERS arrived, then its SETTINGS
          (ahead of the script's answer); with `settings_gate`, the server reads nothing of
          the connection until the gate is set (at most 30 s), so a test decides when the
          HEADERS, and then the SETTINGS, can come through;
        - ``"goaway"``: no SETTINGS; once a request's HEADERS arrived, GOAWAY(NO_ERROR,
          last stream id 0: nothing processed), and the connection closes;
        - ``"drop"``: no SETTINGS; once a request's HEADERS arrived, the TCP connection
          closes (no GOAWAY)."""
        if preface not in ("settings", "after_headers", "goaway", "drop"):
            raise ValueError(f"unknown preface {preface!r}")
        self.script = script
        self.settings = settings or {}
        self.preface = preface
        self.preface_connections = preface_connections
        self.settings_gate = settings_gate
        self.ca = trustme.CA()
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1").configure_cert(self._context)
        self._context.set_alpn_protocols(["h2"])
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.connections: list[ScriptedConnection] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._closing = False

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def wait(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        """Wait until `predicate()` holds (checked under `lock` on every frame read)."""
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), "the scripted server waited in vain"

    def __enter__(self) -> ScriptedH2Server:
        accept = threading.Thread(target=self._accept, name="scripted-h2", daemon=True)
        accept.start()
        self._threads.append(accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        except OSError:
            pass
        self._listener.close()
        for sock in list(self._socks):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(10)

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _send_settings(self, conn: h2.connection.H2Connection, record: ScriptedConnection) -> None:
        if not record.settings_sent:
            record.settings_sent = True
            conn.initiate_connection()  # h2's defaults, then ours: in effect once acknowledged
            if self.settings:
                conn.update_settings(self.settings)

    def _serve(self, raw: socket.socket) -> None:
        record = ScriptedConnection()
        with self.lock:
            index = len(self.connections)
            self.connections.append(record)
        odd = self.preface_connections is None or index < self.preface_connections
        preface = self.preface if odd else "settings"
        try:
            sock = self._context.wrap_socket(raw, server_side=True)
        except OSError:
            raw.close()
            return
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        try:
            if preface == "settings":
                with self.lock:
                    self._send_settings(conn, record)
                sock.sendall(conn.data_to_send())
            elif preface == "after_headers" and self.settings_gate is not None:
                self.settings_gate.wait(30.0)
            while True:
                data = sock.recv(65536)
                if not data:
                    return
                with self.changed:
                    for event in conn.receive_data(data):
                        if preface == "after_headers" and isinstance(
                            event, h2.events.RequestReceived
                        ):
                            self._send_settings(conn, record)  # ahead of the answer
                        self._event(conn, record, event, answer=preface not in ("goaway", "drop"))
                    record.most_open = max(record.most_open, conn.open_inbound_streams)
                    self.changed.notify_all()
                    headers_seen = bool(record.streams)
                if headers_seen and preface == "goaway":
                    conn.close_connection(
                        error_code=h2.errors.ErrorCodes.NO_ERROR, last_stream_id=0
                    )
                    sock.sendall(conn.data_to_send())
                    return
                if headers_seen and preface == "drop":
                    return
                out = conn.data_to_send()
                if out:
                    sock.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return
        finally:
            sock.close()

    def _event(
        self,
        conn: h2.connection.H2Connection,
        record: ScriptedConnection,
        event: Any,
        answer: bool = True,
    ) -> None:
        # Without `answer` (a server going away before its SETTINGS) the script is not run.
        script = self.script if answer else _silent
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers or ())
            stream = ScriptedStream(headers[b":path"].decode())
            record.streams[event.stream_id] = stream
            script(conn, event.stream_id, stream)
            if event.stream_ended is not None:
                stream.request_ended = True
                script(conn, event.stream_id, stream)
        elif isinstance(event, h2.events.DataReceived):
            stream = record.streams[event.stream_id]
            stream.received += len(event.data or b"")
            conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            if event.stream_ended is not None:
                stream.request_ended = True
                script(conn, event.stream_id, stream)
        elif isinstance(event, h2.events.StreamEnded):
            stream = record.streams[event.stream_id]
            if not stream.request_ended:
                stream.request_ended = True
                script(conn, event.stream_id, stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = record.streams.get(event.stream_id or 0)
            if stream is not None:
                stream.reset_code = int(event.error_code or 0)


def _silent(conn: h2.connection.H2Connection, sid: int, stream: ScriptedStream) -> None:
    pass
