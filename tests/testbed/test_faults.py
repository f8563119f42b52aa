"""Faults armed with set_fault (or the X-Testbed-Fault header) behave as documented."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests._support.raw_http import RawClient
from toolpool.testing import Downstream, ServiceSpec
from toolpool.testing._loop import LoopName

OPEN = ServiceSpec(require_auth=False, token_latency=0.0)


@pytest.fixture(params=["asyncio", "uvloop"])
def ds(request: pytest.FixtureRequest) -> Iterator[Downstream]:
    loop: LoopName = request.param
    with Downstream({"api": OPEN, "other": OPEN}, loop=loop) as downstream:
        downstream.register_client("api", client_id="app", client_secret="s", tenant="acme")
        yield downstream


def _expect_reset(conn_sock: socket.socket) -> None:
    """The server's answer is a TCP RST: not data, not a clean FIN."""
    try:
        data = conn_sock.recv(1)
    except ConnectionResetError:
        return
    raise AssertionError(f"expected a reset, got {data!r}")


def test_close_after_response_answers_then_closes_silently(ds: Downstream, raw: RawClient) -> None:
    ds.set_fault("api", "close_after_response", count=1)
    conn = raw.connect(ds.address("api"))
    conn.request()
    response = conn.response()
    assert response.status == 200
    assert "connection" not in response.headers  # unannounced, like a dying keep-alive
    assert conn.at_eof()
    with httpx.Client(base_url=ds.url("api")) as client:  # disarmed after count=1
        first, second = client.get("/anything").json(), client.get("/anything").json()
        assert first["connection_id"] == second["connection_id"]
    assert ds.stats("api").faults_fired == {"close_after_response": 1}


def test_reset_sends_rst_instead_of_answering(ds: Downstream, raw: RawClient) -> None:
    ds.set_fault("api", "reset", count=2)
    for _ in range(2):
        conn = raw.connect(ds.address("api"))
        conn.request()
        _expect_reset(conn.sock)
    with httpx.Client(base_url=ds.url("api")) as client:
        assert client.get("/anything").status_code == 200
    stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert stats.faults_fired == {"reset": 2}
    assert stats.requests_total == 3
    assert stats.responses_by_status == {200: 1}


@pytest.mark.parametrize(("status", "retry_after"), [(503, 2.0), (429, 0.5), (503, None)])
def test_status_answers_for_count_requests_with_retry_after(
    ds: Downstream, status: int, retry_after: float | None
) -> None:
    ds.set_fault("api", "status", count=3, status=status, retry_after=retry_after)
    with httpx.Client(base_url=ds.url("api")) as client:
        responses = [client.get("/anything") for _ in range(4)]
    assert [r.status_code for r in responses] == [status] * 3 + [200]
    expected = None if retry_after is None else f"{retry_after:g}"
    assert {r.headers.get("retry-after") for r in responses[:3]} == {expected}
    stats = ds.stats("api")
    assert stats.responses_by_status == {status: 3, 200: 1}
    assert (stats.http_503, stats.http_429) == ((3, 0) if status == 503 else (0, 3))


def test_status_defaults_to_503_until_cleared(ds: Downstream) -> None:
    ds.set_fault("api", "status")
    with httpx.Client(base_url=ds.url("api")) as client:
        assert [client.get("/x").status_code for _ in range(5)] == [503] * 5
        ds.clear_faults("api")
        assert client.get("/x").status_code == 200
        assert client.get(ds.url("other") + "/x").status_code == 200  # per service


def test_slow_adds_delay(ds: Downstream) -> None:
    ds.set_fault("api", "slow", delay=0.3, count=1)
    with httpx.Client(base_url=ds.url("api")) as client:
        started = time.monotonic()
        assert client.get("/anything").status_code == 200
        assert time.monotonic() - started >= 0.3


def test_down_resets_new_connections_and_drops_requests_of_open_ones(
    ds: Downstream, raw: RawClient
) -> None:
    before = raw.connect(ds.address("api"))
    before.request()
    assert before.response().status == 200
    ds.set_fault("api", "down")
    try:
        refused = raw.connect(ds.address("api"))
    except ConnectionResetError:
        pass  # the reset can beat connect() back to the client: refused all the same
    else:
        _expect_reset(refused.sock)
    before.request()
    assert before.at_eof()  # closed, unanswered
    with httpx.Client(base_url=ds.url("api")) as client:
        with pytest.raises(httpx.TransportError):
            client.get("/anything")
        ds.clear_faults("api")
        assert client.get("/anything").status_code == 200
    assert ds.stats("api").faults_fired["down"] >= 3


def test_probability_zero_never_fires_and_one_always_fires(ds: Downstream) -> None:
    with httpx.Client(base_url=ds.url("api")) as client:
        ds.set_fault("api", "status", probability=0.0)
        assert {client.get("/x").status_code for _ in range(20)} == {200}
        ds.set_fault("api", "status", probability=1.0)
        assert {client.get("/x").status_code for _ in range(20)} == {503}


def test_probability_draws_follow_the_seed() -> None:
    def run() -> list[int]:
        with Downstream({"api": OPEN}, seed=42) as ds:
            ds.set_fault("api", "status", probability=0.5)
            with httpx.Client(base_url=ds.url("api")) as client:
                return [client.get("/x").status_code for _ in range(40)]

    first = run()
    assert first == run()
    assert {200, 503} == set(first)


def test_fault_endpoint_selects_token_or_api_requests(ds: Downstream) -> None:
    form = {"grant_type": "client_credentials"}
    with httpx.Client(base_url=ds.url("api")) as client:
        ds.set_fault("api", "status", endpoint="token")
        assert client.post("/oauth/token", data=form, auth=("app", "s")).status_code == 503
        assert client.get("/anything").status_code == 200
        ds.clear_faults("api")
        ds.set_fault("api", "status")  # endpoint="api" by default
        assert client.post("/oauth/token", data=form, auth=("app", "s")).status_code == 200
        assert client.get("/anything").status_code == 503


def test_fault_header_applies_to_one_request(ds: Downstream, raw: RawClient) -> None:
    with httpx.Client(base_url=ds.url("api")) as client:
        throttled = client.get("/x", headers={"X-Testbed-Fault": "status;status=429;retry_after=1"})
        assert (throttled.status_code, throttled.headers["retry-after"]) == (429, "1")
        assert client.get("/x").status_code == 200
        started = time.monotonic()
        assert client.get("/x", headers={"X-Testbed-Fault": "slow;delay=0.2"}).status_code == 200
        assert time.monotonic() - started >= 0.2
        bad = client.get("/x", headers={"X-Testbed-Fault": "explode"})
        assert bad.status_code == 400
    conn = raw.connect(ds.address("api"))
    conn.request(headers={"X-Testbed-Fault": "reset"})
    _expect_reset(conn.sock)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "melt"}, "unknown fault kind"),
        ({"kind": "slow"}, "needs delay"),
        ({"kind": "status", "status": 200}, "4xx or 5xx"),
        ({"kind": "status", "count": 0}, "count"),
        ({"kind": "status", "probability": 1.5}, "probability"),
        ({"kind": "status", "endpoint": "admin"}, "endpoint"),
    ],
)
def test_invalid_faults_are_rejected(kwargs: dict[str, object], message: str) -> None:
    with Downstream({"api": OPEN}) as ds, pytest.raises(ValueError, match=message):
        ds.set_fault("api", **kwargs)  # type: ignore[arg-type]


def test_unknown_service_is_a_key_error() -> None:
    with Downstream({"api": OPEN}) as ds, pytest.raises(KeyError, match="api"):
        ds.set_fault("nope", "reset")
