"""HTTP/1.1 on the client side, without I/O: request heads out, response events in.

The asyncio and thread drivers both feed received bytes into `ResponseParser` and send what
`encode_request_head` and `encode_chunk` produce; neither parses HTTP itself.

Responses are parsed by llhttp (Node's parser, through `httptools`) in its strict mode: no
leniency flag is ever set. On top of it this module applies the rules where h11 (httpcore's
parser) is stricter, so that every framing decision (accept or reject, where the body ends,
reuse or close) is the stricter of the two; tests/core/test_http11.py checks it against both,
case by case and with generated responses:

    - Transfer-Encoding: exactly one header, exactly `chunked` (h11). Anything else, with or
      without Content-Length, is rejected, never framed some other way.
    - status codes below 100 are rejected (h11); so are versions other than 1.0 and 1.1 and
      protocol upgrades (101).
    - `Connection: close` anywhere, or an HTTP/1.0 response (h11 ignores 1.0 keep-alive),
      means close after this response.
    - any byte after the end of a response, blank lines included (llhttp skips those, h11
      fails the next response on them), means close.

Two limits are this module's own: a response head (status line and headers, interim
responses each counted alone) larger than 64 KiB is rejected, and so is a response to HEAD
carrying anything after its head.

llhttp has no way to be told a response answers HEAD, and skips blank lines between
messages, so the parser finds where each head ends itself (the first CRLF CRLF: llhttp in
strict mode accepts no bare CR or LF in a head, so that is where llhttp ends it too), feeds
llhttp one head at a time, and counts the bytes after the end of the body.

Error messages name the part of the response and the problem; they never quote the bytes
the server sent (a server that echoes a request header would otherwise put a credential
into an exception or a log line).
"""

from __future__ import annotations

from typing import NamedTuple

import httptools

__all__ = [
    "LAST_CHUNK",
    "MAX_HEAD_SIZE",
    "ProtocolError",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "encode_request_head",
]

MAX_HEAD_SIZE = 64 * 1024
LAST_CHUNK = b"0\r\n\r\n"

_HttpParserError = httptools.HttpParserError
_HttpParserUpgrade = httptools.HttpParserUpgrade
_HttpResponseParser = httptools.HttpResponseParser


class ProtocolError(Exception):
    """The peer sent something that is not a valid HTTP/1.1 response."""


class ResponseHead(NamedTuple):
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes


def encode_request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, ending with the blank line.

    Raises ValueError if a header name or value would break the message framing (a CR, LF
    or NUL inside it), which is how header injection and request smuggling start. The
    message names the header (or says it is a name), never its value.
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Exactly one LF per header line, plus the request line and the blank line, and every
    # LF preceded by its CR: anything else means a CR or LF was smuggled into a field.
    lines = len(headers) + 2
    if (
        head.count(b"\n") != lines
        or head.count(b"\r\n") != lines
        or head.count(b"\r") != lines
        or b"\0" in head
    ):
        raise ValueError(_injection_message(method, target, headers))
    return head


def _injection_message(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> str:
    bad = frozenset(b"\r\n\0")
    if bad.intersection(method) or bad.intersection(target):
        return "the request method or target contains a CR, LF or NUL character"
    for name, value in headers:
        if bad.intersection(name):
            return "a request header name contains a CR, LF or NUL character"
        if bad.intersection(value):
            shown = name.decode("ascii", "replace")
            return (
                f"the value of request header {shown!r} contains a CR, LF or NUL character; "
                f"remove it (header values are one line of visible characters)"
            )
    return "a request header contains a CR, LF or NUL character"


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked request body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


_CRLF = frozenset(b"\r\n")

# How the body of the current response is framed.
_NONE, _LENGTH, _CHUNKED, _UNTIL_CLOSE = range(4)


class _Extra(Exception):
    """Raised inside llhttp's callback when a second message starts: stop parsing."""


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
        "_chunked_tail",
        "_framing",
        "_head_request",
        "_head_seen",
        "_headers",
        "_in_head",
        "_interim",
        "_ll",
        "_reason",
        "_tail",
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
        self._ll = _HttpResponseParser(self)
        self._head_request = head_request
        self._in_head = True
        self._head_seen = 0
        self._tail = b""  # the last bytes of the head so far (a CRLF CRLF may straddle feeds)
        self._headers: list[tuple[bytes, bytes]] = []
        self._reason = b""
        self._interim = False
        self._framing = _NONE
        self._chunked_tail = 0  # CR/LF bytes ending the chunked body fed so far
        self._body: list[bytes] = []
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
        if self.complete:
            # Bytes after a complete response that nobody asked for: the connection's
            # framing can no longer be trusted.
            self.reusable = False
            return
        pos = 0
        end = len(data)
        while pos < end:
            if self._in_head:
                pos = self._feed_head(data, pos)
                if pos < 0:
                    return  # the head goes on in the next chunk
            else:
                # A view, not a copy: llhttp copies the body bytes it hands out anyway.
                self._feed_body(data if not pos else memoryview(data)[pos:])
                return
            if self.complete:
                if pos < end:
                    self.reusable = False  # bytes after the head of a bodiless response
                return

    def _feed_head(self, data: bytes, pos: int) -> int:
        """Feed llhttp the rest of the current head; the position after it, or -1."""
        tail = self._tail
        if tail:
            window = tail + data[pos:]
            idx = window.find(b"\r\n\r\n")
        else:
            idx = data.find(b"\r\n\r\n", pos)
        if idx < 0:
            self._head_seen += len(data) - pos
            if self._head_seen > MAX_HEAD_SIZE:
                raise ProtocolError("response head larger than 64 KiB")
            self._ll_feed(data if not pos else data[pos:])
            self._tail = (tail + data[pos:])[-3:]
            return -1
        # Where the head ends, in data's coordinates.
        head_end = pos + idx + 4 - len(tail) if tail else idx + 4
        self._head_seen += head_end - pos
        if self._head_seen > MAX_HEAD_SIZE:
            raise ProtocolError("response head larger than 64 KiB")
        self._tail = b""
        self._ll_feed(data[pos:head_end] if pos or head_end != len(data) else data)
        if self._interim:
            # 1xx: its head is done and the real response follows.
            self._interim = False
            self._head_seen = 0
            return head_end
        if self.head is None:  # pragma: no cover - llhttp called on_headers_complete
            raise ProtocolError("response head not recognised")
        self._in_head = False
        if self._head_request:
            self._finish()
        return head_end

    def _feed_body(self, data: bytes | memoryview) -> None:
        before = self.body_size
        try:
            self._ll.feed_data(data)
        except _HttpParserError as exc:
            if not self.complete:
                raise ProtocolError(f"malformed response body: {_reason(exc)}") from None
            self.reusable = False  # a second message (or garbage) right after this one
            return
        if not self.complete:
            if self._framing == _CHUNKED:
                self._track_chunked_tail(data)
            return
        framing = self._framing
        if framing == _LENGTH:
            if len(data) != self.body_size - before:
                self.reusable = False
        elif framing == _CHUNKED:
            # A chunked body ends with exactly CRLF CRLF after a byte that is not CR or LF
            # (the last-chunk size, an extension, or a trailer). More means blank lines,
            # which llhttp skips silently.
            self._track_chunked_tail(data)
            if self._chunked_tail != 4:
                self.reusable = False

    def _track_chunked_tail(self, data: bytes | memoryview) -> None:
        """Count the CR and LF bytes that end the body so far (up to 8: only 4 matters)."""
        size = len(data)
        n = 0
        while n < size and n < 8 and data[size - 1 - n] in _CRLF:
            n += 1
        self._chunked_tail = self._chunked_tail + n if n == size else n

    def _ll_feed(self, data: bytes) -> None:
        try:
            self._ll.feed_data(data)
        except _HttpParserUpgrade:
            raise ProtocolError("protocol upgrades (101) are not supported") from None
        except _HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise ProtocolError(f"malformed response head: {_reason(exc)}") from None

    def feed_eof(self) -> None:
        """The peer closed its side."""
        if not self.complete and not self._in_head and self._framing == _UNTIL_CLOSE:
            self._finish()
        self.reusable = False

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        if self.complete:
            raise _Extra()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        ll = self._ll
        status = ll.get_status_code()
        version = ll.get_http_version()
        if version != "1.1" and version != "1.0":
            raise ProtocolError("unsupported HTTP version in the status line (not 1.0 or 1.1)")
        if status < 100:
            raise ProtocolError("invalid status code (below 100)")
        headers = self._headers
        close = version == "1.0" or not ll.should_keep_alive()
        chunked = False
        length = False
        for name, value in headers:
            # Only three header names frame the message; all start with c or t.
            first = name[0] | 0x20
            if first != 0x63 and first != 0x74:
                continue
            lname = name.lower()
            if lname == b"transfer-encoding":
                if chunked or value.strip(b" \t").lower() != b"chunked":
                    raise ProtocolError(
                        "unsupported Transfer-Encoding: only one header, exactly 'chunked'"
                    )
                chunked = True
            elif lname == b"content-length":
                length = True
            elif lname == b"connection" and not close:
                for token in value.split(b","):
                    if token.strip(b" \t").lower() == b"close":
                        close = True
        if status < 200:
            if status == 101:
                raise ProtocolError("protocol upgrades (101) are not supported")
            # Interim response (100 Continue, 103 Early Hints): the real one follows.
            self._interim = True
            self._headers = []
            self._reason = b""
            return
        if chunked and version == "1.0":
            close = True  # RFC 9112 §6.1: Transfer-Encoding in 1.0 is faulty framing
        if self._head_request or status == 204 or status == 304:
            framing = _NONE
        elif chunked:
            framing = _CHUNKED
        elif length:
            framing = _LENGTH
        else:
            framing = _UNTIL_CLOSE
            close = True
        self._framing = framing
        self.reusable = not close
        self.head = ResponseHead(
            status, self._reason, headers, b"HTTP/1.1" if version == "1.1" else b"HTTP/1.0"
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        n = len(body)
        self.body_size += n
        self.pending += n

    def on_message_complete(self) -> None:
        if not self._interim and self.head is not None and not self._head_request:
            self.complete = True

    def _finish(self) -> None:
        self.complete = True


def _reason(exc: BaseException) -> str:
    """llhttp's description of a parse error (it names the problem, never the bytes)."""
    return str(exc) or type(exc).__name__
