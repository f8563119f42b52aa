"""HTTP/1.1 on the client side, without I/O: request heads out, response events in.

The asyncio and thread drivers both feed received bytes into `ResponseParser` and send what
`encode_request_head` and `encode_chunk` produce; neither parses HTTP itself. Only what a
client needs is here: status line and headers, bodies framed by Content-Length, chunked
transfer coding or the end of the connection, interim (1xx) responses skipped, and the
keep-alive decision.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = [
    "LAST_CHUNK",
    "ProtocolError",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "encode_request_head",
]

MAX_HEAD_SIZE = 64 * 1024
MAX_CHUNK_LINE = 4 * 1024
LAST_CHUNK = b"0\r\n\r\n"


class ProtocolError(Exception):
    """The peer sent something that is not a valid HTTP/1.1 response."""


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes


def encode_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, ending with the blank line.

    Raises ValueError if a header name or value would break the message framing (a CR or LF
    inside it), which is how header injection and request smuggling start.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Exactly one LF per header line, plus the request line and the blank line, and every
    # LF preceded by its CR: anything else means a CR or LF was smuggled into a field.
    lines = len(headers) + 2
    if head.count(b"\n") != lines or head.count(b"\r\n") != lines or head.count(b"\r") != lines:
        raise ValueError("a request header name or value contains a CR or LF character")
    return head


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked request body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_WHITESPACE = frozenset(b" \t")
_C_OR_T = frozenset(b"cCtT")

# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


class ResponseParser:
    """Incremental parser for the responses on one connection, one at a time.

    Usage: `start(head_request)` before sending each request, then `feed(data)` with every
    received chunk (and `feed_eof()` at EOF). After each feed, `head` is set once the status
    line and headers are in, `take_body()` returns the body bytes received so far, and
    `complete` tells whether the whole response is in. `reusable` says, after completion,
    whether the connection may carry another request. A malformed response raises
    `ProtocolError` from `feed`.
    """

    __slots__ = (
        "_body",
        "_buf",
        "_head_request",
        "_remaining",
        "_state",
        "body_size",
        "complete",
        "got_bytes",
        "head",
        "pending",
        "reusable",
    )

    def __init__(self) -> None:
        self.start(False)

    def start(self, head_request: bool) -> None:
        """Prepare for the response to the next request (`head_request`: method is HEAD)."""
        self._buf = b""
        self._body: list[bytes] = []
        self._state = _HEAD
        self._remaining = 0
        self._head_request = head_request
        self.head: ResponseHead | None = None
        self.complete = False
        self.reusable = False
        self.got_bytes = False
        self.body_size = 0
        # Body bytes parsed and not yet taken (for flow control).
        self.pending = 0

    def take_body(self) -> bytes:
        """The body bytes received since the last call (may be empty)."""
        body = self._body
        if not body:
            return b""
        self._body = []
        self.pending = 0
        return body[0] if len(body) == 1 else b"".join(body)

    def feed(self, data: bytes) -> None:
        if not data:
            return
        self.got_bytes = True
        if self._state == _DONE:
            # Bytes after a complete response that nobody asked for: the connection's
            # framing can no longer be trusted.
            self.reusable = False
            return
        buf = self._buf + data if self._buf else data
        self._buf = b""
        self._parse(buf)

    def feed_eof(self) -> None:
        """The peer closed its side."""
        state = self._state
        if state == _UNTIL_CLOSE:
            self._state = _DONE
            self.complete = True
        elif state != _DONE:
            self._buf = b""
        self.reusable = False

    def _parse(self, buf: bytes) -> None:
        pos = 0
        end = len(buf)
        while pos < end:
            state = self._state
            if state == _LENGTH:
                take = min(self._remaining, end - pos)
                self._body.append(buf[pos : pos + take] if pos or take != end else buf)
                self.body_size += take
                self.pending += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._finish()
            elif state == _HEAD:
                idx = buf.find(b"\r\n\r\n", pos)
                if idx < 0:
                    if end - pos > MAX_HEAD_SIZE:
                        raise ProtocolError("response head larger than 64 KiB")
                    self._buf = buf[pos:]
                    return
                self._parse_head(buf[pos:idx])
                pos = idx + 4
            elif state == _CHUNK_SIZE:
                idx = buf.find(b"\r\n", pos)
                if idx < 0:
                    if end - pos > MAX_CHUNK_LINE:
                        raise ProtocolError("chunk size line too long")
                    self._buf = buf[pos:]
                    return
                line = buf[pos:idx].split(b";", 1)[0].strip()
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"invalid chunk size {line[:20]!r}") from None
                if size < 0 or not line.isalnum():
                    raise ProtocolError(f"invalid chunk size {line[:20]!r}")
                pos = idx + 2
                if size == 0:
                    self._state = _TRAILERS
                else:
                    self._remaining = size
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                take = min(self._remaining, end - pos)
                self._body.append(buf[pos : pos + take])
                self.body_size += take
                self.pending += take
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if end - pos < 2:
                    self._buf = buf[pos:]
                    return
                if buf[pos : pos + 2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                idx = buf.find(b"\r\n", pos)
                if idx < 0:
                    if end - pos > MAX_HEAD_SIZE:
                        raise ProtocolError("trailers larger than 64 KiB")
                    self._buf = buf[pos:]
                    return
                empty = idx == pos
                pos = idx + 2
                if empty:
                    self._finish()
            elif state == _UNTIL_CLOSE:
                self._body.append(buf[pos:] if pos else buf)
                self.body_size += end - pos
                self.pending += end - pos
                return
            else:  # _DONE with bytes left over
                self.reusable = False
                return

    def _parse_head(self, raw: bytes) -> None:
        lines = raw.split(b"\r\n")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise ProtocolError(f"invalid status line {status_line[:40]!r}")
        version = parts[0]
        code = parts[1]
        if len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"invalid status code in {status_line[:40]!r}")
        status = int(code)
        if status < 100:
            raise ProtocolError(f"invalid status code in {status_line[:40]!r}")
        reason = parts[2] if len(parts) == 3 else b""
        headers: list[tuple[bytes, bytes]] = []
        append = headers.append
        length: int | None = None
        chunked = False
        close = version == b"HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name[-1] in _WHITESPACE or line[0] in _WHITESPACE:
                raise ProtocolError(f"invalid header line {line[:40]!r}")
            value = value.strip(b" \t")
            append((name, value))
            # Only three header names frame the message; all start with c or t.
            if name[0] in _C_OR_T:
                lname = name.lower()
                if lname == b"content-length":
                    if not value.isdigit():
                        raise ProtocolError(f"invalid Content-Length {value[:20]!r}")
                    n = int(value)
                    if length is not None and n != length:
                        raise ProtocolError("conflicting Content-Length headers")
                    length = n
                elif lname == b"transfer-encoding":
                    chunked = value.lower().rsplit(b",", 1)[-1].strip() == b"chunked"
                elif lname == b"connection":
                    tokens = value.lower()
                    if b"close" in tokens:
                        close = True
                    elif b"keep-alive" in tokens:
                        close = False
        if status < 200:
            # Interim response (100 Continue, 103 Early Hints): the real one follows.
            if status == 101:
                raise ProtocolError("protocol upgrades (101) are not supported")
            return
        self.head = ResponseHead(status, reason, headers, version)
        self.reusable = not close
        if self._head_request or status in (204, 304):
            self._finish()
        elif chunked:
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length:
                self._remaining = length
                self._state = _LENGTH
            else:
                self._finish()
        else:
            self._state = _UNTIL_CLOSE
            self.reusable = False

    def _finish(self) -> None:
        self._state = _DONE
        self.complete = True
