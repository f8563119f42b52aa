"""The HTTP/1.1 client codec against the two reference parsers, llhttp and h11.

Every framing decision (reject or accept, the body, reuse or close) must be the stricter of
llhttp's (httptools, strict mode) and h11's, on the cases of issue 16 and on responses that
hypothesis generates; plus the codec's own two limits (versions other than 1.0/1.1, heads
over 64 KiB), which only ever make it stricter.
"""

from __future__ import annotations

from dataclasses import dataclass

import h11
import httptools
import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from toolpool._http11 import (
    MAX_HEAD_SIZE,
    ProtocolError,
    ResponseParser,
    encode_chunk,
    encode_request_head,
)

REJECT = "reject"


@dataclass(frozen=True)
class Outcome:
    status: int
    body: bytes
    reusable: bool


def ours(raw: bytes, head_request: bool = False, cuts: list[int] | None = None) -> Outcome | str:
    parser = ResponseParser()
    parser.start(head_request)
    body = b""
    previous = 0
    try:
        for cut in [*(cuts or []), len(raw)]:
            parser.feed(raw[previous:cut])
            body += parser.take_body()
            previous = cut
        if not parser.complete:
            parser.feed_eof()
            body += parser.take_body()
    except ProtocolError:
        return REJECT
    if not parser.complete or parser.head is None:
        return REJECT  # truncated: the drivers raise
    return Outcome(parser.head.status, body, parser.reusable)


class _LL:
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.body = b""
        self.keep_alive = False
        self.done = False
        self.extra = False
        self.final = False

    def on_message_begin(self) -> None:
        if self.done:
            self.extra = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.strip().lower()))

    def on_headers_complete(self) -> None:
        if self.done:
            return
        self.status = self.parser.get_status_code()
        self.final = self.status >= 200
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.final and not self.done:
            self.body += body

    def on_message_complete(self) -> None:
        if self.done:
            return
        if self.final:
            self.done = True
        else:
            self.headers = []


def llhttp(raw: bytes) -> Outcome | str:
    """llhttp's decision (strict mode; it cannot parse a response to HEAD)."""
    ll = _LL()
    try:
        ll.parser.feed_data(raw)
    except httptools.HttpParserUpgrade:
        return REJECT
    except httptools.HttpParserError:
        if not ll.done:
            return REJECT
        ll.extra = True
    if not ll.done:
        # At EOF llhttp completes only a body that is delimited by the close.
        names = dict(ll.headers)
        framed = b"content-length" in names or names.get(b"transfer-encoding", b"").endswith(
            b"chunked"
        )
        if not ll.final or framed:
            return REJECT
        return Outcome(ll.status, ll.body, False)
    return Outcome(ll.status, ll.body, ll.keep_alive and not ll.extra)


def h11_decision(raw: bytes, head_request: bool = False) -> Outcome | str:
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(method="HEAD" if head_request else "GET", target="/", headers=[("Host", "a")])
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    status = 0
    body = b""
    eof = False
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if eof:
                    return REJECT
                conn.receive_data(b"")
                eof = True
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                return REJECT
    except h11.RemoteProtocolError:
        return REJECT
    trailing, _closed = conn.trailing_data
    reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE and not trailing
    return Outcome(status, body, reusable and not eof)


def stricter(raw: bytes) -> Outcome | str:
    """The decision the codec must make: the stricter reference's, plus its own limits."""
    ref_h11 = h11_decision(raw)
    ref_ll = llhttp(raw)
    if ref_ll == REJECT or ref_h11 == REJECT:
        return REJECT
    assert isinstance(ref_ll, Outcome) and isinstance(ref_h11, Outcome)
    if not _own_limits_hold(raw):
        return REJECT
    if ref_ll.status != ref_h11.status or ref_ll.body != ref_h11.body:
        return REJECT  # the references disagree on the framing: ambiguous
    return Outcome(ref_h11.status, ref_h11.body, ref_ll.reusable and ref_h11.reusable)


def _own_limits_hold(raw: bytes) -> bool:
    """The codec's own rules, per head (interim ones too): version 1.0 or 1.1, <= 64 KiB."""
    pos = 0
    while True:
        head_end = raw.find(b"\r\n\r\n", pos)
        if (
            not raw.startswith((b"HTTP/1.1 ", b"HTTP/1.0 "), pos)
            or head_end + 4 - pos > MAX_HEAD_SIZE
        ):
            return False
        if raw[pos + 9 : pos + 10] != b"1":
            return True
        pos = head_end + 4


H = b"HTTP/1.1 200 OK\r\n"
CHUNKED_HELLO = b"5\r\nhello\r\n0\r\n\r\n"

# Issue 16's cases, then the everyday ones. Each: (name, raw response, expected).
CASES: list[tuple[str, bytes, Outcome | str]] = [
    *[
        (
            f"TE {te!r} with CL",
            H + b"Transfer-Encoding: " + te + b"\r\nContent-Length: 5\r\n\r\nhelloWORLD",
            REJECT,
        )
        for te in [b"gzip", b"identity", b"xchunked", b"chunked;q=1", b"chunked, gzip", b"chunked,"]
    ],
    ("TE gzip alone", H + b"Transfer-Encoding: gzip\r\n\r\nhello", REJECT),
    (
        "two TE headers",
        H + b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        REJECT,
    ),
    (
        "TE chunked twice",
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        REJECT,
    ),
    ("TE gzip, chunked", H + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + CHUNKED_HELLO, REJECT),
    ("CR in a value", H + b"X-A: a\rb\r\nContent-Length: 0\r\n\r\n", REJECT),
    (
        "LF in a value",
        H + b"X-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
        REJECT,
    ),
    ("NUL in a value", H + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n", REJECT),
    ("NUL in a name", H + b"X-\x00A: b\r\nContent-Length: 0\r\n\r\n", REJECT),
    ("space in a name", H + b"X A: b\r\nContent-Length: 0\r\n\r\n", REJECT),
    ("parenthesis in a name", H + b"X(A): b\r\nContent-Length: 0\r\n\r\n", REJECT),
    ("space before the colon", H + b"X-A : b\r\nContent-Length: 0\r\n\r\n", REJECT),
    ("bare LF ending a line", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n", REJECT),
    ("obsolete line folding", H + b"X: a\r\n b\r\nContent-Length: 2\r\n\r\nok", REJECT),
    (
        "CL with TE chunked",
        H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        REJECT,
    ),
    (
        "TE chunked on HTTP/1.0",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO,
        Outcome(200, b"hello", False),
    ),
    *[
        (
            f"chunk size line {line!r}",
            H + b"Transfer-Encoding: chunked\r\n\r\n" + line + b"\r\nhello\r\n0\r\n\r\n",
            REJECT,
        )
        for line in [b"0x5", b" 5", b"5\x0b", b"5 ;ext", b"5;a=b\nc", b"ffffffffffffffffff"]
    ],
    (
        "trailer without a colon",
        H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nbad\r\n\r\n",
        REJECT,
    ),
    (
        "trailer with NUL",
        H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX: a\x00\r\n\r\n",
        REJECT,
    ),
    (
        "chunk data without CRLF",
        H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        REJECT,
    ),
    (
        "close then keep-alive",
        H + b"Connection: close\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", False),
    ),
    (
        "keep-alive, close",
        H + b"Connection: keep-alive, close\r\nContent-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", False),
    ),
    (
        "HTTP/1.0 keep-alive",
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", False),
    ),
    ("100 KiB head", H + b"X: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n", REJECT),
    (
        "CL shorter than the body",
        H + b"Content-Length: 5\r\n\r\nhelloWORLD",
        Outcome(200, b"hello", False),
    ),
    (
        "a second response after",
        H + b"Content-Length: 2\r\n\r\nok" + H + b"Content-Length: 0\r\n\r\n",
        Outcome(200, b"ok", False),
    ),
    ("a blank line after", H + b"Content-Length: 2\r\n\r\nok\r\n", Outcome(200, b"ok", False)),
    (
        "a blank line after chunks",
        H + b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_HELLO + b"\r\n",
        Outcome(200, b"hello", False),
    ),
    ("two CLs", H + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok", REJECT),
    ("CL list", H + b"Content-Length: 2, 2\r\n\r\nok", REJECT),
    ("CL +2", H + b"Content-Length: +2\r\n\r\nok", REJECT),
    ("status 099", b"HTTP/1.1 099 X\r\nContent-Length: 2\r\n\r\nok", REJECT),
    ("HTTP/1.2", b"HTTP/1.2 200 OK\r\nContent-Length: 2\r\n\r\nok", REJECT),
    ("HTTP/2.0", b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", REJECT),
    ("101 upgrade", b"HTTP/1.1 101 Switching\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n", REJECT),
    ("DEL in a value", H + b"X: a\x7fb\r\nContent-Length: 2\r\n\r\nok", REJECT),
    # Everyday responses.
    ("length", H + b"Content-Length: 5\r\n\r\nhello", Outcome(200, b"hello", True)),
    (
        "chunked",
        H + b"Transfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n"
        b"0\r\nX-T: 1\r\n\r\n",
        Outcome(200, b"hello world", True),
    ),
    (
        "TE Chunked (case)",
        H + b"Transfer-Encoding: Chunked\r\n\r\n" + CHUNKED_HELLO,
        Outcome(200, b"hello", True),
    ),
    ("204", b"HTTP/1.1 204 No Content\r\n\r\n", Outcome(204, b"", True)),
    (
        "304 with CL",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        Outcome(304, b"", True),
    ),
    (
        "100 then 200",
        b"HTTP/1.1 100 Continue\r\n\r\n" + H + b"Content-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", True),
    ),
    (
        "103 then 200",
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + H + b"Content-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", True),
    ),
    (
        "Connection: close",
        H + b"Connection: close\r\nContent-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", False),
    ),
    ("HTTP/1.0", b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", Outcome(200, b"ok", False)),
    ("until close", H + b"\r\npart one, part two", Outcome(200, b"part one, part two", False)),
    ("no reason phrase", b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok", Outcome(200, b"ok", True)),
    (
        "obs-text in a value",
        H + b"X: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
        Outcome(200, b"ok", True),
    ),
    ("truncated body", H + b"Content-Length: 9\r\n\r\nok", REJECT),
    ("truncated chunks", H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhel", REJECT),
]


@pytest.mark.parametrize(("name", "raw", "expected"), CASES, ids=[c[0] for c in CASES])
def test_case_table(name: str, raw: bytes, expected: Outcome | str) -> None:
    assert ours(raw) == expected
    # The table itself is the stricter of the references on every row.
    assert stricter(raw) == expected


HEAD_CASES: list[tuple[bytes, Outcome | str]] = [
    (H + b"Content-Length: 99\r\n\r\n", Outcome(200, b"", True)),
    (H + b"Transfer-Encoding: chunked\r\n\r\n", Outcome(200, b"", True)),
    (H + b"Content-Length: 99\r\n\r\nsurprise", Outcome(200, b"", False)),
    (H + b"X: a\x00\r\nContent-Length: 99\r\n\r\n", REJECT),
    (H + b"Transfer-Encoding: gzip\r\n\r\n", REJECT),
]


@pytest.mark.parametrize(("raw", "expected"), HEAD_CASES)
def test_responses_to_head(raw: bytes, expected: Outcome | str) -> None:
    assert ours(raw, head_request=True) == expected
    ref = h11_decision(raw, head_request=True)
    if expected == REJECT:
        assert ref == REJECT or llhttp(raw[: raw.find(b"\r\n\r\n") + 4]) == REJECT
    else:
        assert ref == REJECT or (isinstance(ref, Outcome) and ref.body == b"")


def test_error_messages_quote_no_bytes_from_the_server() -> None:
    secret = b"Bearer sk-live-0123456789"
    for raw in [
        H + b"X-Echo: " + secret + b"\x00\r\nContent-Length: 0\r\n\r\n",
        H + b"Transfer-Encoding: " + secret + b"\r\n\r\n",
        H + secret + b"\r\n\r\n",
        b"HTTP/1.1 " + secret + b"\r\n\r\n",
    ]:
        parser = ResponseParser()
        parser.start(False)
        with pytest.raises(ProtocolError) as info:
            parser.feed(raw)
        assert b"sk-live" not in str(info.value).encode() and "0123" not in str(info.value)


# ---------------------------------------------------------------- generated responses

_VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0"]
_STATUSES = [
    b"200 OK",
    b"200 OK",
    b"404 Not Found",
    b"204 No Content",
    b"304 Not Modified",
    b"099 X",
    b"200",
    b"103 Early",
]
_HEADERS = [
    b"Content-Length: 5",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length: 2",
    b"Content-Length: 5, 5",
    b"Content-Length: -1",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: gzip",
    b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, gzip",
    b"Transfer-Encoding: identity",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Connection: Keep-Alive, Close",
    b"X-A: a\nTransfer-Encoding: chunked",
    b"X-A: a\rb",
    b"X-A: a\x00b",
    b"X-A: caf\xe9",
    b"X A: b",
    b"X-A : b",
    b" folded",
    b"Server: testbed",
    b"Date: Sun, 06 Dec 2026 03:00:00 GMT",
]
_BODIES = [
    b"hello",
    b"",
    b"helloWORLD",
    b"5\r\nhello\r\n0\r\n\r\n",
    b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"0x5\r\nhello\r\n0\r\n\r\n",
    b"5 \r\nhello\r\n0\r\n\r\n",
    b"5\r\nhelloXX0\r\n\r\n",
    b"0\r\nbad trailer\r\n\r\n",
    b"hel",
]
_AFTER = [b"", b"", b"", b"\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", b"junk"]


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status_line = draw(st.sampled_from(_VERSIONS)) + b" " + draw(st.sampled_from(_STATUSES))
    headers = draw(st.lists(st.sampled_from(_HEADERS), max_size=4))
    eol = draw(st.sampled_from([b"\r\n"] * 9 + [b"\n"]))
    interim = draw(st.sampled_from([b""] * 4 + [b"HTTP/1.1 100 Continue\r\n\r\n"]))
    head = interim + eol.join([status_line, *headers]) + b"\r\n\r\n"
    return head + draw(st.sampled_from(_BODIES)) + draw(st.sampled_from(_AFTER))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(responses(), st.data())
def test_generated_responses_match_the_stricter_reference(raw: bytes, data: st.DataObject) -> None:
    expected = stricter(raw)
    assert ours(raw) == expected
    # The same decision however the bytes are split across reads.
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=6)))
    assert ours(raw, cuts=cuts) == expected


@given(st.data())
def test_any_split_parses_the_same(data: st.DataObject) -> None:
    name, raw, expected = data.draw(st.sampled_from(CASES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    assert ours(raw, cuts=cuts) == expected, name


def test_bytes_after_a_complete_response_make_it_unreusable() -> None:
    parser = ResponseParser()
    parser.start(False)
    parser.feed(H + b"Content-Length: 2\r\n\r\nok")
    assert parser.complete and parser.reusable
    parser.feed(b"EXTRA")
    assert not parser.reusable


def test_oversized_head_raises_even_when_split() -> None:
    parser = ResponseParser()
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nX: ")
    for _ in range(9):
        parser.feed(b"a" * 7000)  # 63 KiB so far: fine
    with pytest.raises(ProtocolError, match="64 KiB"):
        parser.feed(b"a" * 7000)


def test_request_head_refuses_header_injection() -> None:
    ok = encode_request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X", b"1")])
    assert ok == b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n"
    for bad in [
        (b"X", b"1\r\nEvil: yes"),
        (b"X", b"1\nEvil: yes"),
        (b"X", b"1\r"),
        (b"X", b"1\x00"),
    ]:
        with pytest.raises(ValueError, match="value of request header 'X'") as info:
            encode_request_head(b"GET", b"/x", [(b"Host", b"a"), bad])
        assert "Evil" not in str(info.value)
    with pytest.raises(ValueError, match="header name"):
        encode_request_head(b"GET", b"/x", [(b"X\r\nEvil", b"1")])
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
