"""A blocking HTTP/2 client on h2 for frame-level checks of the test bed, and TLS + ALPN
connects for toolpool._h2io's connections (tests only)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

import h2.config
import h2.connection
import h2.events

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
