"""A raw HTTP/1.1 client over plain sockets, for what httpx hides (framing, EOF, resets)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

TIMEOUT = 10.0  # generous: nothing in these tests should take a fraction of it


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    chunked: bool = False
    raw_head: bytes = field(default=b"", repr=False)


class RawConnection:
    """One client TCP connection speaking HTTP/1.1 by hand (for what httpx hides)."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self._buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str = "GET",
        path: str = "/anything",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
        all_headers = dict(headers or {})
        if body and "transfer-encoding" not in {k.lower() for k in all_headers}:
            all_headers.setdefault("Content-Length", str(len(body)))
        lines += [f"{k}: {v}" for k, v in all_headers.items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("server closed the connection")
        self._buf += data

    def _read_until(self, marker: bytes) -> bytes:
        while (i := self._buf.find(marker)) < 0:
            self._fill()
        out, self._buf = self._buf[:i], self._buf[i + len(marker) :]
        return out

    def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def response(self, *, head_only: bool = False) -> RawResponse:
        head = self._read_until(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return RawResponse(status, headers, b"", raw_head=head)
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int(self._read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    self._read_until(b"\r\n")
                    return RawResponse(status, headers, body, chunked=True, raw_head=head)
                body += self._read_exact(size)
                self._read_exact(2)
        body = self._read_exact(int(headers.get("content-length", "0")))
        return RawResponse(status, headers, body, raw_head=head)

    def at_eof(self, timeout: float = TIMEOUT) -> bool:
        """True when the server closes (FIN) within ``timeout``; raises on RST."""
        self.sock.settimeout(timeout)
        try:
            if self._buf:
                return False
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(TIMEOUT)


class RawClient:
    """Opens :class:`RawConnection` s and closes them all at the end of the test."""

    def __init__(self) -> None:
        self._open: list[RawConnection] = []

    def connect(self, address: tuple[str, int]) -> RawConnection:
        conn = RawConnection(address)
        self._open.append(conn)
        return conn

    def close_all(self) -> None:
        for conn in self._open:
            conn.close()
