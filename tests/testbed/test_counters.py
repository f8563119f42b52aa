"""Exact counters: concurrency limit, peaks, idle closes, tenants per connection, resets."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from tests._support.raw_http import RawClient
from toolpool.testing import Downstream, ServiceSpec


def test_concurrency_limit_answers_503_above_it_and_tracks_the_peak(raw: RawClient) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False, concurrency_limit=3)}) as ds:
        hanging = [raw.connect(ds.address("api")) for _ in range(3)]
        for conn in hanging:
            conn.request("GET", "/hang")
        ds.wait_stats("api", lambda s: s.requests_in_progress == 3)
        with httpx.Client(base_url=ds.url("api")) as client:
            over = [client.get("/anything") for _ in range(2)]
            assert [r.status_code for r in over] == [503, 503]
            stats = ds.stats("api")
            assert (stats.peak_requests_in_progress, stats.rejected_over_limit) == (3, 2)
            assert (stats.http_503, stats.requests_in_progress) == (2, 3)
            for conn in hanging:
                conn.close()
            ds.wait_stats("api", lambda s: s.requests_in_progress == 0)
            assert client.get("/anything").status_code == 200
        assert ds.stats("api").peak_requests_in_progress == 3


def test_counters_are_exact_with_200_concurrent_connections(raw: RawClient) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        conns = [raw.connect(ds.address("api")) for _ in range(200)]
        for i, conn in enumerate(conns):
            conn.request("GET", "/hang", headers={"X-Tenant": f"t{i % 4}"})
        stats = ds.wait_stats("api", lambda s: s.requests_in_progress == 200)
        assert stats.peak_requests_in_progress == 200
        assert (stats.connections_open, stats.peak_connections) == (200, 200)
        assert stats.connections_accepted == stats.requests_total == 200
        assert len(stats.connection_tenants) == 200
        assert stats.mixed_connections() == {}
        for conn in conns:
            conn.close()
        stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
        assert (stats.requests_in_progress, stats.peak_connections) == (0, 200)
        assert stats.responses_by_status == {}


async def test_counters_are_exact_under_200_concurrent_requests() -> None:
    spec = ServiceSpec(require_auth=False, service_time=(0.05, 0.15))
    async with Downstream({"api": spec}, seed=7) as ds:
        tenants = ["acme", "beta", "gamma", "delta"]
        clients = {
            t: httpx.AsyncClient(
                base_url=ds.url("api"),
                headers={"X-Tenant": t},
                limits=httpx.Limits(max_connections=50),
                timeout=30,
            )
            for t in tenants
        }
        try:
            responses = await asyncio.gather(
                *(clients[tenants[i % 4]].get("/anything") for i in range(200))
            )
        finally:
            for client in clients.values():
                await client.aclose()
        seen: dict[int, set[str]] = {}
        for response in responses:
            info = response.json()
            seen.setdefault(info["connection_id"], set()).add(info["tenant"])
        stats = await ds.wait_stats_async("api", lambda s: s.connections_open == 0)
    assert stats.requests_total == 200
    assert stats.responses_by_status == {200: 200}
    assert stats.requests_in_progress == 0
    assert 1 <= stats.peak_requests_in_progress <= 200
    assert stats.connections_accepted == len(seen)
    assert stats.peak_connections <= stats.connections_accepted <= 200
    assert {c: frozenset(t) for c, t in seen.items()} == dict(stats.connection_tenants)
    assert stats.mixed_connections() == {}


def test_keepalive_timeout_closes_idle_connections(raw: RawClient) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False, keepalive_timeout=0.3)}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.request()
        assert conn.response().status == 200
        answered = time.monotonic()
        assert conn.at_eof(timeout=10)
        assert time.monotonic() - answered >= 0.3 - 0.01  # not before the timeout
        stats = ds.wait_stats("api", lambda s: s.connections_closed_by_server_idle == 1)
        assert stats.connections_open == 0


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("path", ["/anything", "/close"])
def test_tls_connections_closed_by_the_server_are_gone_promptly(loop: str, path: str) -> None:
    """A client that never answers close_notify (httpx, idle) must not keep them open."""
    spec = ServiceSpec(require_auth=False, mtls=True, keepalive_timeout=0.3)
    with Downstream({"api": spec}, tls=True, loop=loop) as ds:  # type: ignore[arg-type]
        with httpx.Client(verify=ds.client_ssl_context("acme")) as client:
            assert client.get(ds.url("api") + path).status_code == 200
            if path == "/anything":
                ds.wait_stats("api", lambda s: s.connections_closed_by_server_idle == 1)
            # The client still holds its socket; the server gives up on close_notify.
            ds.wait_stats("api", lambda s: s.connections_open == 0, timeout=10)


def test_keepalive_timeout_never_cuts_a_request_in_progress(raw: RawClient) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False, keepalive_timeout=0.2)}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.request("GET", "/delay?s=0.6")  # three idle timeouts long
        assert conn.response().status == 200
        conn.request("GET", "/anything")  # and the connection still serves afterwards
        assert conn.response().status == 200
        assert conn.at_eof()
        assert ds.wait_stats("api", lambda s: s.connections_closed_by_server_idle == 1)


def test_reset_stats_keeps_gauges(raw: RawClient) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        conn = raw.connect(ds.address("api"))
        conn.request("GET", "/hang", headers={"X-Tenant": "acme"})
        ds.wait_stats("api", lambda s: s.requests_in_progress == 1)
        ds.reset_stats("api")
        stats = ds.stats("api")
        assert (stats.requests_total, stats.connections_accepted, stats.connection_tenants) == (
            0,
            0,
            {},
        )
        assert (stats.connections_open, stats.requests_in_progress) == (1, 1)
        assert (stats.peak_connections, stats.peak_requests_in_progress) == (1, 1)


def test_stats_are_readable_from_other_threads_during_load() -> None:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        snapshots = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                snapshots.append(ds.stats("api"))
                time.sleep(0.0005)  # leave the GIL to the server and the client

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            with httpx.Client(base_url=ds.url("api")) as client:
                for _ in range(200):
                    client.get("/anything")
        finally:
            stop.set()
            thread.join()
        totals = [s.requests_total for s in snapshots]
        assert totals == sorted(totals)  # monotonic: every snapshot is consistent
        assert all(sum(s.responses_by_status.values()) <= s.requests_total for s in snapshots)
        assert ds.stats("api").requests_total == 200


def test_wait_stats_times_out_with_the_last_snapshot() -> None:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        with pytest.raises(TimeoutError, match="requests_total=0"):
            ds.wait_stats("api", lambda s: s.requests_total == 1, timeout=0.1)
