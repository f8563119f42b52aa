"""The randomized affinity test of the core, with auth providers: 20 tenants, thousands of
requests, random cancellations, server idle closes, resets and silent closes. Whatever
happens, every connection the server saw carried one tenant only (tokens included: token
requests are requests of their context), every answer is for the tenant that asked, and the
pool ends with nothing in use."""

from __future__ import annotations

import asyncio
import random
import threading

import httpx
import pytest

import toolpool
from tests._support.oauth_tenants import destination, oauth, register, tenant_ctx
from toolpool.testing import Downstream, ServiceSpec

TENANTS = [f"tenant{i:02d}" for i in range(20)]


def make_provider(kind: str, ds: Downstream) -> object:
    if kind == "oauth2":
        return oauth(ds)
    return toolpool.auth.MutualTLS(cert=lambda ctx: ds.client_cert(ctx.tenant))  # mtls, mtls-h2


def spec_for(kind: str) -> ServiceSpec:
    return ServiceSpec(
        service_time=(0.0, 0.004),
        # Idle connections are closed by the server after 0.25 s (the pool keeps them 45 s).
        keepalive_timeout=0.25,
        token_latency=(0.002, 0.01),
        require_auth=kind == "oauth2",
        mtls=kind.startswith("mtls"),
    )


def arm_faults(ds: Downstream) -> None:
    ds.set_fault("crm", "reset", probability=0.02)
    ds.set_fault("crm", "close_after_response", probability=0.03)


def check_server_side(ds: Downstream, kind: str) -> None:
    stats = ds.stats("crm")
    assert stats.connection_tenants, "no request reached the server"
    sizes = {len(tenants) for tenants in stats.connection_tenants.values()}
    assert stats.mixed_connections() == {}
    assert sizes == {1}
    assert set().union(*stats.connection_tenants.values()) == set(TENANTS)
    # The scenario really happened: faults fired and the server closed idle connections.
    assert stats.faults_fired.get("reset", 0) > 0
    assert stats.faults_fired.get("close_after_response", 0) > 0
    assert stats.connections_closed_by_server_idle > 0
    if kind == "oauth2":
        assert set(stats.token_requests_by_tenant) == set(TENANTS)
        assert stats.http_401 == 0


@pytest.mark.parametrize("kind", ["oauth2", "mtls", "mtls-h2"])
async def test_randomized_affinity_async(kind):
    rng = random.Random(5)
    workers, per_worker = 30, 100
    outcome = {"ok": 0, "errors": 0, "cancelled": 0, "wrong_tenant": 0}
    async with Downstream({"crm": spec_for(kind)}, tls=True, seed=11) as ds:
        register(ds, "crm", TENANTS)
        arm_faults(ds)
        # mtls-h2: per-tenant client certificates on HTTP/2 (one connection per tenant).
        dest = destination(
            ds,
            auth=make_provider(kind, ds),
            max_connections=12,
            queue_factor=40,
            warmup=0.25,
            http2=True if kind == "mtls-h2" else None,
        )
        pool = toolpool.Pool([dest])
        async with pool, pool.client(timeout=20.0) as client:
            url = ds.url("crm")

            async def one(tenant: str, path: str) -> None:
                with toolpool.auth_context(tenant_ctx(tenant)):
                    response = await client.get(url + path)
                if response.json()["tenant"] != tenant:
                    outcome["wrong_tenant"] += 1
                outcome["ok"] += 1

            async def worker() -> None:
                for _ in range(per_worker // 2):
                    tenant = rng.choice(TENANTS)
                    path = rng.choice(["/anything", "/anything", "/delay?s=0.01"])
                    task = asyncio.ensure_future(one(tenant, path))
                    if rng.random() < 0.1:
                        # Cancel at a random point: waiting, connecting, fetching a token,
                        # sending or reading.
                        await asyncio.sleep(rng.uniform(0.0, 0.02))
                        task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        outcome["cancelled"] += 1
                    except httpx.HTTPError:
                        outcome["errors"] += 1

            await asyncio.gather(*(worker() for _ in range(workers)))
            # Everyone pauses: the server closes the idle connections the pool still holds,
            # and the second half meets them dead.
            await ds.wait_stats_async("crm", lambda s: s.connections_closed_by_server_idle > 0)
            await asyncio.gather(*(worker() for _ in range(workers)))
            # Every request has ended (cancelled ones included): nothing may be in use. On
            # HTTP/2 a cancelled stream's permit comes back once the server has read the
            # RST_STREAM (a PING round trip), so the last ones may take a moment.
            for _ in range(500):
                final = pool.stats()["crm"]
                if final.in_use == final.waiting == final.opening == 0:
                    break
                await asyncio.sleep(0.01)
        check_server_side(ds, kind)
    total = workers * per_worker
    assert outcome["wrong_tenant"] == 0, outcome
    assert sum(outcome[k] for k in ("ok", "errors", "cancelled")) == total, outcome
    assert outcome["cancelled"] > 0, outcome
    assert outcome["ok"] > 0.8 * total, outcome
    assert final.in_use == 0, final
    assert final.waiting == 0, final
    assert final.opening == 0, final


def test_randomized_affinity_threads_oauth2():
    """The thread driver with OAuth 2: read timeouts stand in for cancellations."""
    rng_lock = threading.Lock()
    rng = random.Random(6)
    threads, per_thread = 12, 120
    outcome = {"ok": 0, "errors": 0, "wrong_tenant": 0}
    with Downstream({"crm": spec_for("oauth2")}, tls=True, seed=12) as ds:
        register(ds, "crm", TENANTS)
        arm_faults(ds)
        dest = destination(ds, auth=make_provider("oauth2", ds), max_connections=8, queue_factor=4)
        with toolpool.Pool([dest]) as pool:
            client = pool.sync_client(timeout=20.0)
            url = ds.url("crm")

            def worker() -> None:
                for _ in range(per_thread // 2):
                    with rng_lock:
                        tenant = rng.choice(TENANTS)
                        abandon = rng.random() < 0.1
                    try:
                        with toolpool.auth_context(tenant_ctx(tenant)):
                            if abandon:
                                # Given up while the server still works on it.
                                client.get(url + "/delay?s=0.05", timeout=0.01)
                            response = client.get(url + "/anything")
                        with rng_lock:
                            outcome["ok"] += 1
                            if response.json()["tenant"] != tenant:
                                outcome["wrong_tenant"] += 1
                    except httpx.HTTPError:
                        with rng_lock:
                            outcome["errors"] += 1

            for phase in range(2):
                if phase:  # as in the async test: idle closes by the server between phases
                    ds.wait_stats("crm", lambda s: s.connections_closed_by_server_idle > 0)
                pool_threads = [threading.Thread(target=worker) for _ in range(threads)]
                for t in pool_threads:
                    t.start()
                for t in pool_threads:
                    t.join(120)
            final = pool.stats()["crm"]
        check_server_side(ds, "oauth2")
    assert outcome["wrong_tenant"] == 0, outcome
    assert outcome["ok"] > 0.7 * threads * per_thread, outcome
    assert outcome["errors"] > 0, outcome  # the abandoned requests
    assert final.in_use == 0, final
    assert final.waiting == 0, final
