"""HTTP/1.1 wire format, sans I/O: an incremental request parser and response heads.

Written for speed on the small-request path (one ``bytes.find`` for the head, str splits for
the lines) and for exactness on the rest (Content-Length and chunked bodies, pipelining).
"""

from __future__ import annotations

from http import HTTPStatus

#: Largest request head accepted (nginx's ``large_client_header_buffers`` is 4 x 8 KiB).
MAX_HEAD = 64 * 1024
_REASONS: dict[int, str] = {s.value: s.phrase for s in HTTPStatus}


class ProtocolError(Exception):
    """The peer broke HTTP/1.1; answer ``status`` and close the connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Request:
    """One complete request. Header names are lower-case; repeated headers are joined."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "target", "version")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive

    def __repr__(self) -> str:  # no headers: they carry credentials
        return f"<Request {self.method} {self.path}>"


_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS = range(6)


class RequestParser:
    """Feed bytes with :meth:`feed`; take complete requests with :meth:`next_request`."""

    __slots__ = (
        "_body",
        "_buf",
        "_partial",
        "_remaining",
        "_scan_from",
        "_state",
        "continue_wanted",
    )

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._scan_from = 0
        self._partial: Request | None = None
        self._body = bytearray()
        self._remaining = 0
        #: Set when a request asked ``Expect: 100-continue`` and its body has not arrived yet.
        self.continue_wanted = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed by a complete request."""
        return len(self._buf) + len(self._body)

    @property
    def mid_request(self) -> bool:
        """True when part of a request has arrived (a head or body is incomplete)."""
        return self._state != _HEAD or bool(self._buf)

    def next_request(self) -> Request | None:
        """The next complete request, or ``None`` until more bytes arrive.

        Raises :class:`ProtocolError` on malformed input (the connection must then close).
        """
        while True:
            state = self._state
            if state == _HEAD:
                return self._parse_head()
            if state == _BODY:
                return self._take_body()
            if not self._step_chunked():
                return None
            if self._state == _HEAD:
                return self._finish()

    def _parse_head(self) -> Request | None:
        buf = self._buf
        while buf[:2] == b"\r\n":  # RFC 9112 2.2: ignore empty lines before a request line
            del buf[:2]
        end = buf.find(b"\r\n\r\n", self._scan_from)
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError(431, "request head too large")
            self._scan_from = max(0, len(buf) - 3)
            return None
        self._scan_from = 0
        if end > MAX_HEAD:
            raise ProtocolError(431, "request head too large")
        lines = buf[:end].decode("latin-1").split("\r\n")
        del buf[: end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            raise ProtocolError(400, "malformed request line")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            raise ProtocolError(505, f"unsupported version {version!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or name[0] in " \t":
                raise ProtocolError(400, "malformed header line")
            name = name.lower()
            value = value.strip(" \t")
            if name in headers:
                headers[name] += ("; " if name == "cookie" else ", ") + value
            else:
                headers[name] = value
        connection = headers.get("connection", "").lower()
        if version == "HTTP/1.1":
            keep_alive = "close" not in connection
        else:
            keep_alive = "keep-alive" in connection
        request = Request(method, target, version, headers, b"", keep_alive)
        te = headers.get("transfer-encoding")
        if te is not None:
            if te.lower() != "chunked":
                raise ProtocolError(501, f"unsupported transfer-encoding {te!r}")
            self._partial = request
            self._state = _CHUNK_SIZE
            self.continue_wanted = headers.get("expect", "").lower() == "100-continue"
            return self.next_request()
        cl = headers.get("content-length")
        if cl is None or cl == "0":
            return request
        if not cl.isdigit():
            raise ProtocolError(400, "bad content-length")
        length = int(cl)
        if len(buf) >= length:
            request.body = bytes(buf[:length])
            del buf[:length]
            return request
        self._partial = request
        self._remaining = length
        self._state = _BODY
        self.continue_wanted = headers.get("expect", "").lower() == "100-continue"
        return self._take_body()

    def _take_body(self) -> Request | None:
        buf = self._buf
        take = min(self._remaining, len(buf))
        if take:
            self._body += buf[:take]
            del buf[:take]
            self._remaining -= take
            self.continue_wanted = False
        if self._remaining:
            return None
        self._state = _HEAD
        return self._finish()

    def _finish(self) -> Request:
        request = self._partial
        assert request is not None
        request.body = bytes(self._body)
        self._body = bytearray()
        self._partial = None
        self.continue_wanted = False
        return request

    def _step_chunked(self) -> bool:
        """Advance the chunked-body state machine; False when more bytes are needed."""
        buf = self._buf
        state = self._state
        if state == _CHUNK_DATA:
            if not buf:
                return False
            take = min(self._remaining, len(buf))
            self._body += buf[:take]
            del buf[:take]
            self._remaining -= take
            self.continue_wanted = False
            if not self._remaining:
                self._state = _CHUNK_CRLF
            return True
        if state == _CHUNK_CRLF:
            if len(buf) < 2:
                return False
            if buf[:2] != b"\r\n":
                raise ProtocolError(400, "chunk not followed by CRLF")
            del buf[:2]
            self._state = _CHUNK_SIZE
            return True
        end = buf.find(b"\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                raise ProtocolError(400, "chunk header too long")
            return False
        line = bytes(buf[:end])
        del buf[: end + 2]
        if state == _TRAILERS:
            if not line:
                self._state = _HEAD
            return True
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ProtocolError(400, "bad chunk size") from None
        if size < 0:
            raise ProtocolError(400, "bad chunk size")
        if size == 0:
            self._state = _TRAILERS
        else:
            self._remaining = size
            self._state = _CHUNK_DATA
        return True


def response_head(
    status: int, headers: list[tuple[str, str]] | tuple[tuple[str, str], ...] = ()
) -> bytes:
    """``HTTP/1.1 <status> <reason>`` and the header lines, ending with the blank line."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def reason(status: int) -> str:
    return _REASONS.get(status, "Unknown")
