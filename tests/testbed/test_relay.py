"""LatencyRelay: a wire with a one-way delay, a simulated handshake, ordered and overlapping."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests._support.raw_http import RawClient
from toolpool.testing import Downstream, LatencyRelay, ServiceSpec

OW = 0.1  # one-way delay: large against scheduling noise, so the bounds below are safe
EPS = 0.002
OPEN = ServiceSpec(require_auth=False)


def _timed_get(client: httpx.Client, url: str) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.get(url)
    return time.perf_counter() - started, response


def test_fresh_request_costs_four_one_way_delays_and_a_reused_one_two() -> None:
    with Downstream({"api": OPEN}, latency=OW) as ds:
        assert ds.url("api") == ds.relay("api").url("http")  # type: ignore[union-attr]
        with httpx.Client() as client:
            fresh, first = _timed_get(client, ds.url("api") + "/anything")
            reused, second = _timed_get(client, ds.url("api") + "/anything")
        assert first.json()["connection_id"] == second.json()["connection_id"]
        assert fresh >= 4 * OW - EPS
        assert 2 * OW - EPS <= reused < 4 * OW
        with httpx.Client() as client:  # the direct URL bypasses the relay
            direct, _ = _timed_get(client, ds.url("api", direct=True) + "/anything")
        assert direct < 2 * OW


def test_tls_handshake_costs_at_least_one_more_round_trip() -> None:
    with Downstream({"api": OPEN}, tls=True, latency=OW) as ds:
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            fresh, _ = _timed_get(client, ds.url("api") + "/anything")
            reused, _ = _timed_get(client, ds.url("api") + "/anything")
        assert fresh >= 6 * OW - EPS
        assert 2 * OW - EPS <= reused < 4 * OW


def test_chunks_overlap_in_flight_and_keep_their_order() -> None:
    with Downstream({"api": OPEN}, latency=OW) as ds, httpx.Client() as client:
        url = ds.url("api") + "/stream?chunks=20&size=300&delay=0.01"
        elapsed, response = _timed_get(client, url)
    assert response.content == ((bytes(range(256)) * 2)[:300]) * 20
    # A per-chunk sleep would take 20 * OW; a wire takes its latency once.
    assert 4 * OW - EPS <= elapsed < 4 * OW + 0.19 + 4 * OW


def test_one_upstream_connection_per_client_connection() -> None:
    with Downstream({"api": OPEN}, latency=0.01) as ds:
        ids = set()
        for _ in range(3):
            with httpx.Client() as client:
                for _ in range(2):
                    ids.add(client.get(ds.url("api") + "/anything").json()["connection_id"])
        assert len(ids) == 3
        relay = ds.relay("api")
        assert relay is not None
        assert relay.connections_accepted == 3
        assert ds.stats("api").connections_accepted == 3


def test_server_close_and_reset_cross_the_relay_after_the_delay(raw: RawClient) -> None:
    spec = ServiceSpec(require_auth=False, keepalive_timeout=0.5)
    with Downstream({"api": spec}, latency=OW) as ds:
        conn = raw.connect(ds.address("api"))
        sent = time.perf_counter()
        conn.request()
        assert conn.response().status == 200
        assert conn.at_eof()  # the server's idle close, relayed
        # The server answered at sent + 3 OW and closed 0.5 s later; the FIN takes one more OW.
        assert time.perf_counter() - sent >= 4 * OW + 0.5 - EPS
        ds.set_fault("api", "reset", count=1)
        conn = raw.connect(ds.address("api"))
        conn.request()
        with pytest.raises(ConnectionResetError):
            conn.sock.recv(1)


def test_client_close_reaches_the_server(raw: RawClient) -> None:
    with Downstream({"api": OPEN}, latency=OW) as ds:
        conn = raw.connect(ds.address("api"))
        conn.request("GET", "/hang")
        ds.wait_stats("api", lambda s: s.requests_in_progress == 1)
        conn.close()
        ds.wait_stats("api", lambda s: s.connections_open == 0 and s.requests_in_progress == 0)


@pytest.fixture
def echo_on_eof() -> Iterator[tuple[str, int]]:
    """A loopback server that reads until EOF, then sends back what it read and closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                conn.sendall(b"got:" + data)

    thread = threading.Thread(target=serve)
    thread.start()
    yield listener.getsockname()[:2]
    thread.join(10)


def test_half_close_crosses_the_relay(echo_on_eof: tuple[str, int]) -> None:
    host, port = echo_on_eof
    with LatencyRelay(host, port, one_way=OW) as relay:
        with socket.create_connection(relay.address, timeout=10) as sock:
            sock.sendall(b"hello")
            started = time.perf_counter()
            sock.shutdown(socket.SHUT_WR)  # we may still read
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            assert data == b"got:hello"
            assert time.perf_counter() - started >= 2 * OW - EPS


async def test_relay_as_async_context_manager_and_refused_upstream() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: connections are refused
    async with LatencyRelay("127.0.0.1", port, one_way=0.01) as relay:
        assert relay.url().startswith("http://127.0.0.1:")
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.TransportError):
                await client.get(relay.url() + "/anything")


def test_relay_only_targets_loopback() -> None:
    with pytest.raises(ValueError, match="loopback"):
        LatencyRelay("192.0.2.1", 80)
    with pytest.raises(ValueError, match="one_way"):
        LatencyRelay("127.0.0.1", 80, one_way=-1)


def test_zero_latency_relay_passes_through() -> None:
    with Downstream({"api": OPEN}) as ds, LatencyRelay(*ds.address("api"), one_way=0) as relay:
        with httpx.Client() as client:
            assert client.get(relay.url() + "/anything").json()["service"] == "api"
