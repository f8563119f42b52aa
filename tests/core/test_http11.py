"""The HTTP/1.1 client codec: framing, keep-alive decisions, malformed input, any split."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import given

from toolpool._http11 import ProtocolError, ResponseParser, encode_chunk, encode_request_head

RESPONSES = [
    # (bytes, head request, body, reusable)
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False, b"hello", True),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
        False,
        b"hello world",
        True,
    ),
    (b"HTTP/1.1 204 No Content\r\n\r\n", False, b"", True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", True, b"", True),  # HEAD
    (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        False,
        b"ok",
        True,
    ),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False, b"ok", False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False, b"ok", False),
    (
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
        False,
        b"ok",
        True,
    ),
]


@pytest.mark.parametrize(("raw", "head_request", "body", "reusable"), RESPONSES)
def test_framing(raw: bytes, head_request: bool, body: bytes, reusable: bool) -> None:
    parser = ResponseParser()
    parser.start(head_request)
    parser.feed(raw)
    assert parser.complete
    assert parser.take_body() == body
    assert parser.reusable is reusable


@given(st.data())
def test_any_split_parses_the_same(data: st.DataObject) -> None:
    raw, head_request, body, reusable = data.draw(st.sampled_from(RESPONSES))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    parser = ResponseParser()
    parser.start(head_request)
    received = b""
    previous = 0
    for cut in [*cuts, len(raw)]:
        parser.feed(raw[previous:cut])
        received += parser.take_body()
        previous = cut
    assert parser.complete
    assert received == body
    assert parser.reusable is reusable


def test_body_until_close() -> None:
    parser = ResponseParser()
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
    parser.feed(b"part two")
    assert not parser.complete
    parser.feed_eof()
    assert parser.complete
    assert not parser.reusable
    assert parser.take_body() == b"part one, part two"


def test_bytes_after_a_complete_response_make_it_unreusable() -> None:
    parser = ResponseParser()
    parser.start(False)
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert parser.complete
    assert not parser.reusable


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_malformed_responses_raise(raw: bytes) -> None:
    parser = ResponseParser()
    parser.start(False)
    with pytest.raises(ProtocolError):
        parser.feed(raw)


def test_oversized_head_raises() -> None:
    parser = ResponseParser()
    parser.start(False)
    with pytest.raises(ProtocolError, match="64 KiB"):
        parser.feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000)


def test_request_head_refuses_header_injection() -> None:
    ok = encode_request_head(b"GET", b"/x", [(b"Host", b"a"), (b"X", b"1")])
    assert ok == b"GET /x HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n"
    for bad in [
        (b"X", b"1\r\nEvil: yes"),
        (b"X", b"1\nEvil: yes"),
        (b"X\r\nEvil", b"1"),
        (b"X", b"1\r"),
    ]:
        with pytest.raises(ValueError, match="CR or LF"):
            encode_request_head(b"GET", b"/x", [(b"Host", b"a"), bad])
    assert encode_chunk(b"hello") == b"5\r\nhello\r\n"
