"""Client certificates per auth context (mTLS) on HTTP/2: each tenant's requests share one
multiplexed connection that presented that tenant's certificate, and no connection carries
another tenant's streams. The test bed's mTLS service reports, per request, the tenant of
the certificate its connection presented (the certificate's common name) and counts the
tenants and the protocol of every connection."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Iterator

import pytest

import toolpool
from tests._support.oauth_tenants import destination
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(90)
TENANTS = [f"tenant{i}" for i in range(6)]
MTLS = ServiceSpec(mtls=True, require_auth=False, service_time=(0.0, 0.004))


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream({"ledger": MTLS}, tls=True, seed=3) as downstream:
        yield downstream


def _pool(ds: Downstream, **kwargs: object) -> toolpool.Pool:
    auth = toolpool.auth.MutualTLS(cert=lambda ctx: ds.client_cert(ctx.tenant))
    dest = destination(ds, "ledger", auth=auth, max_connections=10, queue_factor=100, **kwargs)
    return toolpool.Pool([dest], http2=True)


def _check_per_tenant_connections(ds: Downstream, pool_stats: toolpool.DestinationStats) -> None:
    """One HTTP/2 connection per tenant, each carrying that tenant only (the certificate's)."""
    served = ds.stats("ledger")
    assert set(served.connection_protocols.values()) == {"h2"}
    assert served.mixed_connections() == {}
    tenants = sorted(t for seen in served.connection_tenants.values() for t in seen if t)
    assert tenants == sorted(TENANTS)  # one connection each: none opened twice, none shared
    assert served.connections_accepted == len(TENANTS)
    assert served.peak_streams_open <= 10  # the cap counts streams across tenants
    assert pool_stats.protocol == "h2"
    assert pool_stats.in_use == 0


async def test_each_tenant_has_one_h2_connection_with_its_certificate(ds: Downstream) -> None:
    """A concurrent storm of 6 tenants (with cancellations) over a cap of 10 streams: every
    answer names the tenant that asked (its connection presented that certificate)."""
    rng = random.Random(7)
    wrong: list[tuple[str, str]] = []
    outcome = {"ok": 0, "cancelled": 0}
    async with _pool(ds) as pool:
        client = pool.client(timeout=30.0)

        async def call(tenant: str) -> None:
            with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                response = await client.get(ds.url("ledger") + "/delay?s=0.005")
            if response.json()["tenant"] != tenant:
                wrong.append((tenant, response.json()["tenant"]))
            assert response.http_version == "HTTP/2"
            outcome["ok"] += 1

        async def worker() -> None:
            for _ in range(20):
                task = asyncio.ensure_future(call(rng.choice(TENANTS)))
                if rng.random() < 0.1:
                    await asyncio.sleep(rng.uniform(0.0, 0.01))
                    task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    outcome["cancelled"] += 1

        # Every tenant first, so that each one opens (and the check can count) its connection.
        await asyncio.gather(*(call(t) for t in TENANTS))
        await asyncio.gather(*(worker() for _ in range(30)))
        stats = pool.stats()["ledger"]
        auth = pool.destination("ledger").auth
        assert auth is not None
        auth_stats = auth.stats()
    assert wrong == []
    assert outcome["ok"] + outcome["cancelled"] == len(TENANTS) + 600
    assert outcome["ok"] > 500
    _check_per_tenant_connections(ds, stats)
    assert auth_stats.fetches_total == len(TENANTS)  # one certificate load per tenant
    assert auth_stats.contexts == len(TENANTS)


def test_each_tenant_has_one_h2_connection_with_its_certificate_threads(ds: Downstream) -> None:
    wrong: list[tuple[str, str]] = []
    lock = threading.Lock()
    rng = random.Random(8)
    with _pool(ds) as pool:
        client = pool.sync_client(timeout=30.0)

        def call(tenant: str) -> None:
            with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                response = client.get(ds.url("ledger") + "/delay?s=0.005")
            assert response.http_version == "HTTP/2"
            if response.json()["tenant"] != tenant:
                with lock:
                    wrong.append((tenant, response.json()["tenant"]))

        def worker() -> None:
            for _ in range(15):
                with lock:
                    tenant = rng.choice(TENANTS)
                call(tenant)

        for tenant in TENANTS:
            call(tenant)
        threads = [threading.Thread(target=worker) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        stats = pool.stats()["ledger"]
    assert wrong == []
    _check_per_tenant_connections(ds, stats)
    assert ds.stats("ledger").requests_total == len(TENANTS) + 12 * 15


async def test_static_certificate_serves_requests_without_context_on_h2(ds: Downstream) -> None:
    static = toolpool.auth.MutualTLS(cert=ds.client_cert("ops"))
    async with toolpool.Pool([destination(ds, "ledger", auth=static)], http2=True) as pool:
        responses = await asyncio.gather(
            *(pool.client().get(ds.url("ledger") + "/anything") for _ in range(5))
        )
        assert pool.stats()["ledger"].protocol == "h2"
    assert {r.json()["tenant"] for r in responses} == {"ops"}
    assert {r.http_version for r in responses} == {"HTTP/2"}
    assert ds.stats("ledger").connections_accepted == 1


async def test_unloadable_certificate_is_an_auth_error_on_h2(ds: Downstream) -> None:
    calls: list[object] = []

    def cert(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
        calls.append(ctx)
        return ("/nonexistent/cert.pem", "/nonexistent/key.pem")

    provider = toolpool.auth.MutualTLS(cert=cert)
    async with toolpool.Pool([destination(ds, "ledger", auth=provider)], http2=True) as pool:
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            with pytest.raises(toolpool.AuthError, match="cannot load client certificate"):
                await pool.client().get(ds.url("ledger") + "/anything")
            with pytest.raises(toolpool.AuthError, match="failed recently"):
                await pool.client().get(ds.url("ledger") + "/anything")
        stats = pool.stats()["ledger"]
        assert stats.in_use == 0
        assert stats.http2_connections == 0
    assert len(calls) == 1
    assert ds.stats("ledger").connections_accepted == 0


async def test_h2_and_http11_contexts_of_one_tenant_are_separate(ds: Downstream) -> None:
    """The layer builds a TLS context per (tenant, ALPN): the HTTP/2 side's offers h2, the
    HTTP/1.1 side's offers nothing, so neither changes what the other one negotiates."""
    auth = toolpool.auth.MutualTLS(cert=lambda ctx: ds.client_cert(ctx.tenant))
    async with toolpool.Pool([destination(ds, "ledger", auth=auth)], http2=True) as pool:
        layer = pool.destination("ledger").auth
        assert layer is not None
        ctx = toolpool.AuthContext(tenant="acme")
        h2 = layer.ssl_context(ctx, ("h2", "http/1.1"))
        plain = layer.ssl_context(ctx)
        assert h2 is not plain
        assert layer.ssl_context(ctx, ("h2", "http/1.1")) is h2  # cached
        with toolpool.auth_context(ctx):
            response = await pool.client().get(ds.url("ledger") + "/anything")
        assert response.http_version == "HTTP/2"
        assert layer.stats().contexts == 1  # one tenant, whatever the protocols


async def test_warmup_without_listed_contexts_opens_nothing_with_per_tenant_certs(
    ds: Downstream,
) -> None:
    """No context listed and a certificate per context: there is no identity to open a
    connection with, so warm-up opens none (as on HTTP/1.1) and the pool starts; the
    tenants' first requests open their own connections."""
    async with _pool(ds, warmup=0.5) as pool:
        assert ds.stats("ledger").connections_accepted == 0
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            response = await pool.client().get(ds.url("ledger") + "/anything")
        assert response.json()["tenant"] == "acme"
        assert pool.stats()["ledger"].http2_connections == 1
    assert ds.stats("ledger").connections_accepted == 1


@pytest.mark.parametrize("sync", [False, True], ids=["async", "threads"])
async def test_warmup_opens_one_h2_connection_per_listed_context(
    ds: Downstream, sync: bool
) -> None:
    contexts = [toolpool.AuthContext(tenant=t) for t in TENANTS[:3]]
    pool = _pool(ds, warmup=0.5, warmup_contexts=contexts)
    if sync:
        await asyncio.to_thread(pool.start)
    else:
        await pool.astart()
    try:
        served = await ds.wait_stats_async("ledger", lambda s: s.connections_accepted == 3)
        assert served.http2_connections() == 3
        assert served.requests_total == 0
        for ctx in contexts:
            with toolpool.auth_context(ctx):
                if sync:
                    response = await asyncio.to_thread(
                        pool.sync_client().get, ds.url("ledger") + "/anything"
                    )
                else:
                    response = await pool.client().get(ds.url("ledger") + "/anything")
            assert response.json()["tenant"] == ctx.tenant
    finally:
        await pool.aclose()
    served = ds.stats("ledger")
    assert served.connections_accepted == 3  # the warm ones carried the requests
    assert served.mixed_connections() == {}
