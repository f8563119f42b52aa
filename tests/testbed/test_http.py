"""The HTTP/1.1 layer: the sans-I/O request parser, and the wire behaviour of a service."""

from __future__ import annotations

import itertools

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests._support.raw_http import RawClient
from toolpool.testing import Downstream, ServiceSpec
from toolpool.testing._http import MAX_HEAD, ProtocolError, Request, RequestParser

OPEN = ServiceSpec(require_auth=False)


def _parse_all(chunks: list[bytes]) -> list[Request]:
    parser = RequestParser()
    out: list[Request] = []
    for chunk in chunks:
        parser.feed(chunk)
        while (request := parser.next_request()) is not None:
            out.append(request)
    return out


PIPELINE = (
    b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nX-Tenant: acme\r\n\r\n"
    b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
    b"PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n"
    b"\r\nDELETE /d HTTP/1.0\r\nCookie: a=1\r\nCookie: b=2\r\n\r\n"
)


def _check_pipeline(requests: list[Request]) -> None:
    assert [(r.method, r.path) for r in requests] == [
        ("GET", "/a"),
        ("POST", "/b"),
        ("PUT", "/c"),
        ("DELETE", "/d"),
    ]
    assert requests[0].query == "x=1"
    assert requests[0].headers["x-tenant"] == "acme"
    assert requests[1].body == b"hello"
    assert requests[2].body == b"abc0123456789abcdef"
    assert requests[3].headers["cookie"] == "a=1; b=2"
    assert [r.keep_alive for r in requests] == [True, True, True, False]


def test_parser_reads_pipelined_content_length_chunked_and_http10() -> None:
    _check_pipeline(_parse_all([PIPELINE]))


@given(st.lists(st.integers(min_value=0, max_value=len(PIPELINE)), max_size=12))
def test_parser_result_does_not_depend_on_how_bytes_are_split(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(PIPELINE)]
    _check_pipeline(_parse_all([PIPELINE[a:b] for a, b in itertools.pairwise(points)]))


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nBad : x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD + 10), 431),
    ],
)
def test_parser_rejects_malformed_requests(data: bytes, status: int) -> None:
    parser = RequestParser()
    parser.feed(data)
    with pytest.raises(ProtocolError) as info:
        parser.next_request()
    assert info.value.status == status


def test_request_repr_hides_headers() -> None:
    request = _parse_all([b"GET /x HTTP/1.1\r\nAuthorization: Bearer sekrit\r\n\r\n"])[0]
    assert "sekrit" not in repr(request)


def test_pipelined_requests_are_answered_in_order_on_one_connection(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.send(
            b"GET /delay?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /anything/second HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        first, second, third = conn.response(), conn.response(), conn.response()
        assert first.status == second.status == third.status == 200
        assert httpx.Response(200, content=first.body).json()["path"] == "/delay"
        info = httpx.Response(200, content=second.body).json()
        assert (info["path"], info["request_on_connection"]) == ("/anything/second", 2)
        assert httpx.Response(200, content=third.body).json()["body"] == "hello"
        assert ds.stats("api").connections_accepted == 1


def test_malformed_request_gets_400_and_close(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.send(b"NONSENSE\r\n\r\n")
        response = conn.response()
        assert response.status == 400
        assert response.headers["connection"] == "close"
        assert conn.at_eof()


def test_head_has_the_get_headers_and_no_body(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.request("GET", "/bytes?n=1000")
        get = conn.response()
        conn.request("HEAD", "/bytes?n=1000")
        head = conn.response(head_only=True)
        assert head.headers["content-length"] == get.headers["content-length"] == "1000"
        conn.request("GET", "/anything")  # nothing extra was sent after the HEAD head
        assert conn.response().status == 200


def test_expect_100_continue(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.send(
            b"POST /anything HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        assert conn.response().status == 100
        conn.send(b"abcd")
        response = conn.response()
        assert httpx.Response(200, content=response.body).json()["body_size"] == 4


def test_http10_and_connection_close_requests_close_after_the_answer(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        for request in (
            b"GET /anything HTTP/1.0\r\n\r\n",
            b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        ):
            conn = raw.connect(ds.address("api"))
            conn.send(request)
            response = conn.response()
            assert (response.status, response.headers["connection"]) == (200, "close")
            assert conn.at_eof()


def test_large_request_and_response_bodies_cross_intact() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    with Downstream({"api": OPEN}) as ds, httpx.Client(base_url=ds.url("api")) as client:
        assert client.post("/anything", content=body).json()["body_size"] == len(body)

        def gen():  # a generator body makes httpx send chunked encoding
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        assert client.post("/anything", content=gen()).json()["body_size"] == len(body)
        assert client.get("/bytes", params={"n": len(body)}).content == body


def test_nothing_is_answered_after_a_connection_close_response(raw: RawClient) -> None:
    with Downstream({"api": OPEN}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.send(
            b"GET /anything HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            b"GET /anything HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        assert conn.response().headers["connection"] == "close"
        assert conn.at_eof()
        assert ds.stats("api").requests_total == 1
