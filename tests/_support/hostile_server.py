"""A raw-socket HTTP/1.1 server on loopback that answers one request with scripted bytes.

The first request on the first connection gets `first` (any bytes, valid HTTP or not) and,
once those are sent, `late` (bytes nobody asked for); the server then sets `late_sent`.
Every other request gets a clean response whose body names its connection and the request
(`conn<N>-<X-Req header>`), so a response handed to the wrong request shows in the body.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import Counter
from pathlib import Path

from toolpool.testing._certs import CertificateAuthority


class HostileServer:
    def __init__(
        self,
        first: bytes,
        late: bytes = b"",
        authority: CertificateAuthority | None = None,
    ) -> None:
        self.first = first
        self.late = late
        self.late_sent = threading.Event()
        self._tls = authority.server_context(require_client_cert=False) if authority else None
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.requests_per_connection: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._accepted = 0
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stopping = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.close()
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._accepted += 1
                number = self._accepted
                self._conns.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock, number), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, raw: socket.socket, number: int) -> None:
        sock: socket.socket = raw
        sock.settimeout(10)
        try:
            if self._tls is not None:
                sock = self._tls.wrap_socket(raw, server_side=True)
                with self._lock:
                    self._conns.append(sock)
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                with self._lock:
                    self.requests_per_connection[number] += 1
                    nth = self.requests_per_connection[number]
                if number == 1 and nth == 1:
                    sock.sendall(self.first)
                    if self.late:
                        sock.sendall(self.late)
                    self.late_sent.set()
                    continue
                req = b"?"
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"x-req":
                        req = value.strip()
                body = b"conn%d-%s" % (number, req)
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except (OSError, ssl.SSLError):
            return
        finally:
            try:
                sock.close()
            except OSError:
                pass


def authority(directory: Path) -> CertificateAuthority:
    return CertificateAuthority(directory)
