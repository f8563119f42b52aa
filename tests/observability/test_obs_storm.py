"""During a storm on the test bed, the scraped metrics agree with the server's own counters:
connections created = connections the server accepted, closes by idle TTL after the TTL,
one wait-histogram observation per request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
from prometheus_client import CollectorRegistry

import toolpool
import toolpool.metrics
from tests._support.prometheus_samples import Samples, closed_by_reason, scrape_registry, scrape_url
from toolpool.testing import Downstream, ServiceSpec

TENANTS = [f"tenant-{i}" for i in range(6)]


def check_storm(
    samples: Samples, stats: toolpool.DestinationStats, server, requests: int, warm: int
):
    """The checks shared by the async and the thread storms (after the pool went quiet)."""
    d = {"destination": "crm"}
    created = samples.get("toolpool_connections_created_total", **d)
    # Every connection the pool counts as created is one the server accepted, and back.
    assert created == server.connections_accepted
    assert samples.get("toolpool_connection_create_seconds_count", **d) == created
    # One wait observation and one use observation per request; the server saw each once.
    assert server.requests_total == requests
    assert samples.get("toolpool_connection_wait_seconds_count", **d) == requests
    assert samples.get("toolpool_connection_wait_seconds_bucket", le="+Inf", **d) == requests
    assert samples.get("toolpool_connection_use_seconds_count", **d) == requests
    idle = samples.get("toolpool_connection_acquisitions_total", source="idle", **d)
    new = samples.get("toolpool_connection_acquisitions_total", source="new", **d)
    assert idle + new == requests
    assert new == created - warm  # warm-up connections are created without an acquisition
    # Quiet pool: what is open on the client side is what is open on the server side.
    assert samples.get("toolpool_connections", state="used", **d) == 0
    assert samples.get("toolpool_connections", state="opening", **d) == 0
    assert samples.get("toolpool_connections", state="closing", **d) == 0
    assert samples.get("toolpool_connections", state="idle", **d) == server.connections_open
    assert samples.get("toolpool_pending_requests", **d) == 0
    closed = sum(closed_by_reason(samples, "crm").values())
    assert closed == server.connections_accepted - server.connections_open
    assert server.peak_connections <= samples.get("toolpool_connections_max", **d)
    # pool.stats() is the same data.
    assert stats.created_total == created
    assert stats.wait_count == requests
    assert stats.reused_total == idle
    assert dict(stats.closed_total) == closed_by_reason(samples, "crm")


async def test_async_tls_storm_metrics_agree_with_server() -> None:
    requests = 240
    spec = ServiceSpec(require_auth=False, service_time=(0.002, 0.01))
    async with Downstream({"crm": spec}, tls=True) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "crm", ds.url("crm"), max_connections=6, warmup=0.5, verify=ds.ca_pem_path
                )
            ],
            queue_factor=50,
            http2=False,  # HTTP/1.1: connections against the server's; HTTP/2 twin below
        )
        toolpool.metrics.register(pool, registry)
        server = toolpool.metrics.serve(0, registry)
        try:
            async with pool:
                warm = pool.stats()["crm"].created_total
                assert warm == 3
                # 240 requests queue at once behind 6 connections: the pool's wait limit
                # (30 s), not httpx's 5 s pool timeout, so a busy machine is slower, not failed.
                async with pool.client(timeout=httpx.Timeout(30.0, pool=None)) as client:

                    async def call(i: int) -> None:
                        tenant = TENANTS[i % len(TENANTS)]
                        with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                            r = await client.get(
                                ds.url("crm") + "/anything", headers={"X-Tenant": tenant}
                            )
                        assert r.status_code == 200

                    await asyncio.gather(*(call(i) for i in range(requests)))
                first = await asyncio.to_thread(scrape_url, server.url)
                closed = sum(closed_by_reason(first, "crm").values())
                # Closes the pool counted may still be on their way to the server: wait for
                # the server to see them (an event, not a sleep).
                quiet = await ds.wait_stats_async(
                    "crm", lambda s: s.connections_open == s.connections_accepted - closed
                )
                samples = await asyncio.to_thread(scrape_url, server.url)
                check_storm(samples, pool.stats()["crm"], quiet, requests, warm)
                assert not quiet.mixed_connections()
        finally:
            server.close()


async def test_async_tls_storm_on_http2_metrics_agree_with_server() -> None:
    """HTTP/2: the slot series count stream permits (the unit of the cap); the
    toolpool_http2_* series count what the server counts: connections accepted and closed,
    streams opened, streams reset by the client (here: cancelled requests)."""
    requests, cancelled = 240, 6
    spec = ServiceSpec(require_auth=False, service_time=(0.002, 0.01))
    async with Downstream({"crm": spec}, tls=True) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "crm", ds.url("crm"), max_connections=6, warmup=0.5, verify=ds.ca_pem_path
                )
            ],
            queue_factor=50,
            http2=True,
        )
        toolpool.metrics.register(pool, registry)
        d = {"destination": "crm"}
        # The requests queue at once behind 6 streams: the pool's wait limit, not httpx's 5 s.
        async with pool, pool.client(timeout=httpx.Timeout(30.0, pool=None)) as client:
            # Warm-up: one connection for no identity (no context listed), which the first
            # request binds to its tenant.
            assert pool.stats()["crm"].http2_connections_opened == 1

            async def call(i: int, path: str = "/anything") -> None:
                tenant = TENANTS[i % len(TENANTS)]
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    r = await client.get(ds.url("crm") + path, headers={"X-Tenant": tenant})
                assert r.status_code == 200

            await asyncio.gather(*(call(i) for i in range(requests)))
            # Requests cancelled mid-stream: RST_STREAM, their connections stay.
            hanging = [asyncio.ensure_future(call(i, "/hang")) for i in range(cancelled)]
            await ds.wait_stats_async("crm", lambda s: s.requests_in_progress == cancelled)
            for task in hanging:
                task.cancel()
            await asyncio.gather(*hanging, return_exceptions=True)
            await ds.wait_stats_async("crm", lambda s: s.streams_reset_by_client == cancelled)
            # The permits come back once the server has read the resets (a PING each).
            await _until(lambda: pool.stats()["crm"].in_use == 0)
            samples = scrape_registry(registry)
            server = ds.stats("crm")
            stats = pool.stats()["crm"]
            assert stats.protocol == "h2"
            assert samples.get("toolpool_destination_protocol", protocol="h2", **d) == 1
            # Connections: one per tenant (the warm one went to the first tenant's request),
            # each one the server accepted.
            created = samples.get("toolpool_http2_connections_created_total", **d)
            assert created == server.connections_accepted == len(TENANTS)
            assert samples.get("toolpool_connection_create_seconds_count", **d) == created
            assert samples.get("toolpool_http2_connections", **d) == server.connections_open
            assert sum(closed_by_reason(samples, "crm", h2=True).values()) == 0
            assert server.http2_connections() == created
            # Streams: every request one, the cancelled ones reset, as the server saw them.
            assert samples.get("toolpool_http2_streams_total", **d) == server.streams_total
            assert server.streams_total == requests + cancelled
            resets = samples.get("toolpool_http2_streams_reset_total", **d)
            assert resets == server.streams_reset_by_client == cancelled
            assert samples.get("toolpool_http2_streams_in_use", **d) == 0 == server.streams_open
            assert server.peak_streams_open <= samples.get("toolpool_connections_max", **d)
            # The permit series: one wait and one use per request (the warm-up permit is
            # the state machine's, as on HTTP/1.1: no acquisition); nothing in use or queued.
            total = requests + cancelled
            assert samples.get("toolpool_connection_wait_seconds_count", **d) == total
            assert samples.get("toolpool_connection_use_seconds_count", **d) == total
            idle = samples.get("toolpool_connection_acquisitions_total", source="idle", **d)
            new = samples.get("toolpool_connection_acquisitions_total", source="new", **d)
            assert idle + new == total
            assert samples.get("toolpool_connections", state="used", **d) == 0
            assert samples.get("toolpool_pending_requests", **d) == 0
            assert stats.http2_streams_total == server.streams_total
            assert stats.http2_streams_reset_total == cancelled
            assert not server.mixed_connections()
        # Shutdown: every connection closed, counted as such, and gone at the server.
        quiet = await ds.wait_stats_async("crm", lambda s: s.connections_open == 0)
        after = scrape_registry(registry)
        closed = closed_by_reason(after, "crm", h2=True)
        assert closed == {**dict.fromkeys(closed, 0), "shutdown": quiet.connections_accepted}
        assert after.get("toolpool_http2_connections", **d) == 0


async def _until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_thread_storm_metrics_agree_with_server() -> None:
    requests = 120
    spec = ServiceSpec(require_auth=False, service_time=(0.001, 0.005))
    with Downstream({"crm": spec}) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [toolpool.Destination("crm", ds.url("crm"), max_connections=4, warmup=0.0)],
            queue_factor=10,
        )
        toolpool.metrics.register(pool, registry)
        with pool, pool.sync_client() as client:

            def call(i: int) -> None:
                tenant = TENANTS[i % 3]
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    r = client.get(ds.url("crm") + "/anything", headers={"X-Tenant": tenant})
                assert r.status_code == 200

            with ThreadPoolExecutor(12) as ex:
                list(ex.map(call, range(requests)))
            closed = sum(closed_by_reason(scrape_registry(registry), "crm").values())
            quiet = ds.wait_stats(
                "crm", lambda s: s.connections_open == s.connections_accepted - closed
            )
            check_storm(scrape_registry(registry), pool.stats()["crm"], quiet, requests, 0)
            assert not quiet.mixed_connections()


def test_idle_ttl_closes_appear_after_the_ttl() -> None:
    ttl = 0.4
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [toolpool.Destination("crm", ds.url("crm"), max_connections=4, warmup=0.0)],
            idle_ttl=ttl,
            # The maintenance thread sleeps up to this long before it notices a connection
            # that went idle, so a TTL shorter than it is served late (see the report).
            health_check_interval=0.2,
        )
        toolpool.metrics.register(pool, registry)
        with pool, pool.sync_client() as client:
            # Four responses held open at once hold four connections (no timing involved).
            streams = [client.stream("GET", ds.url("crm") + "/bytes?n=10") for _ in range(4)]
            responses = [s.__enter__() for s in streams]
            assert len({r.extensions["toolpool"]["connection_id"] for r in responses}) == 4
            released_from = time.monotonic()  # every connection goes idle after this instant
            for response, stream in zip(responses, streams, strict=True):
                response.read()  # read to the end: the connection goes back to the pool
                stream.__exit__(None, None, None)
            early = scrape_registry(registry)
            if time.monotonic() - released_from < ttl:
                # Scraped before the TTL can have run out: nothing may be closed yet.
                assert early.get("toolpool_connections", destination="crm", state="idle") == 4
                assert closed_by_reason(early, "crm")["idle_ttl"] == 0
            # The server sees the four closes (woken by its counters, no sleep).
            seen = ds.wait_stats("crm", lambda s: s.connections_open == 0, timeout=20.0)
            seen_at = time.monotonic()
            samples = scrape_registry(registry)
        closed = closed_by_reason(samples, "crm")
        assert closed["idle_ttl"] == 4
        assert sum(closed.values()) == 4
        # A connection went idle after `released_from`; the close came at least ttl later.
        assert seen_at - released_from >= ttl
        # It was the pool's TTL, not the server's keep-alive timeout, that closed them.
        assert seen.connections_closed_by_server_idle == 0
        assert seen.connections_accepted == 4
        assert samples.get("toolpool_connections", destination="crm", state="idle") == 0
        assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 4
        assert samples.get("toolpool_connection_use_seconds_count", destination="crm") == 4
