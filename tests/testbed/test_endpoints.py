"""The API routes of a service, and its /_testbed/stats admin route."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests._support.raw_http import RawClient
from toolpool.testing import Downstream, ServiceSpec, ServiceStats

BASE_FIELDS = {
    "service",
    "tenant",
    "subject",
    "connection_id",
    "request_on_connection",
    "method",
    "path",
}


@pytest.fixture(scope="module")
def ds() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as downstream:
        yield downstream


@pytest.fixture
def client(ds: Downstream) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ds.url("api"), timeout=10) as c:
        yield c


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
def test_anything_answers_any_method_with_the_base_fields(
    client: httpx.Client, method: str
) -> None:
    response = client.request(
        method, "/anything/deep/path?q=1", content=b"abc", headers={"X-Tenant": "acme"}
    )
    info = response.json()
    assert response.status_code == 200
    assert info.keys() >= BASE_FIELDS
    assert info["service"] == "api"
    assert (info["method"], info["path"], info["query"]) == (method, "/anything/deep/path", "q=1")
    assert (info["tenant"], info["subject"], info["body_size"]) == ("acme", None, 3)
    assert response.headers["x-connection-id"] == str(info["connection_id"])


def test_request_on_connection_counts_requests_of_one_connection(client: httpx.Client) -> None:
    infos = [client.get("/anything").json() for _ in range(3)]
    assert len({i["connection_id"] for i in infos}) == 1
    first = infos[0]["request_on_connection"]
    assert [i["request_on_connection"] for i in infos] == [first, first + 1, first + 2]


def test_unknown_paths_behave_like_anything(client: httpx.Client) -> None:
    info = client.get("/v1/customers/42").json()
    assert (info["path"], info["body_size"]) == ("/v1/customers/42", 0)


def test_echo_returns_body_and_headers(client: httpx.Client) -> None:
    info = client.post("/echo", content="héllo".encode(), headers={"X-Custom": "v"}).json()
    assert info.keys() >= BASE_FIELDS
    assert info["body"] == "héllo"
    assert info["headers"]["x-custom"] == "v"


def test_bytes_returns_n_bytes_with_content_length(client: httpx.Client) -> None:
    response = client.get("/bytes", params={"n": 1000})
    assert response.headers["content-length"] == "1000"
    assert response.content == (bytes(range(256)) * 4)[:1000]
    assert client.get("/bytes", params={"n": "x"}).status_code == 400


def test_stream_is_chunked_and_paced(ds: Downstream, raw: RawClient) -> None:
    conn = raw.connect(ds.address("api"))
    started = time.monotonic()
    conn.request("GET", "/stream?chunks=4&size=10&delay=0.05")
    response = conn.response()
    assert time.monotonic() - started >= 3 * 0.05
    assert response.chunked
    assert "content-length" not in response.headers
    assert response.body == (bytes(range(10))) * 4
    conn.request("GET", "/stream?chunks=0")
    assert conn.response().body == b""


def test_status_route(client: httpx.Client) -> None:
    assert client.get("/status/418").status_code == 418
    response = client.get("/status/503", params={"retry_after": "2"})
    assert (response.status_code, response.headers["retry-after"]) == (503, "2")
    no_content = client.get("/status/204")
    assert (no_content.status_code, no_content.content) == (204, b"")
    assert "content-length" not in no_content.headers
    assert client.get("/status/abc").status_code == 400


def test_redirect_stays_on_the_same_origin(client: httpx.Client) -> None:
    response = client.get("/redirect", params={"to": "/anything/target"})
    assert (response.status_code, response.headers["location"]) == (302, "/anything/target")
    followed = client.get("/redirect", params={"to": "/anything/target"}, follow_redirects=True)
    assert followed.json()["path"] == "/anything/target"
    assert client.get("/redirect", params={"to": "http://elsewhere.invalid/"}).status_code == 400
    assert client.get("/redirect", params={"to": "//elsewhere.invalid/"}).status_code == 400


def test_cookies_set_and_echo(client: httpx.Client) -> None:
    response = client.get("/cookies/set", params={"flavour": "oat", "size": "l"})
    assert response.headers.get_list("set-cookie") == ["flavour=oat; Path=/", "size=l; Path=/"]
    assert client.get("/cookies").json()["cookies"] == {"flavour": "oat", "size": "l"}


def test_delay_waits(client: httpx.Client) -> None:
    started = time.monotonic()
    assert client.get("/delay", params={"s": 0.2}).json()["path"] == "/delay"
    assert time.monotonic() - started >= 0.2


def test_hang_reads_the_request_and_never_answers(ds: Downstream, raw: RawClient) -> None:
    ds.reset_stats()
    conn = raw.connect(ds.address("api"))
    conn.request("GET", "/hang")
    ds.wait_stats("api", lambda s: s.requests_in_progress == 1)
    assert not conn.at_eof(timeout=0.3)  # no answer, no close
    conn.close()  # the client gives up: the request is no longer in progress
    stats = ds.wait_stats("api", lambda s: s.requests_in_progress == 0 and s.connections_open == 0)
    assert stats.responses_by_status == {}


def test_close_answers_with_connection_close_then_closes(ds: Downstream, raw: RawClient) -> None:
    conn = raw.connect(ds.address("api"))
    conn.request("GET", "/close")
    response = conn.response()
    assert (response.status, response.headers["connection"]) == (200, "close")
    assert conn.at_eof()


def test_admin_stats_endpoint_is_unauthenticated_json_and_uncounted(ds: Downstream) -> None:
    ds.reset_stats()
    with httpx.Client(base_url=ds.url("api")) as client:
        client.get("/anything", headers={"X-Tenant": "acme"})
        stats = ServiceStats.from_json(client.get("/_testbed/stats").json())
        again = ServiceStats.from_json(client.get("/_testbed/stats").json())
    assert stats.requests_total == again.requests_total == 1
    assert stats.responses_by_status == {200: 1}
    assert list(stats.connection_tenants.values()) == [frozenset({"acme"})]
    assert ds.stats("api").requests_total == 1
