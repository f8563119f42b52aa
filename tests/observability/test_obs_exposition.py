"""What the exposition contains: no secret and no raw tenant id (with real OAuth tokens on
the wire), the opt-in hashed tenant series, rejections by reason, auth series that match
the token endpoint's counters, and the registry / serving plumbing."""

from __future__ import annotations

import asyncio
import gc
import secrets
import threading
import time
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.registry import REGISTRY

import toolpool
import toolpool.auth
import toolpool.metrics
from tests._support.prometheus_samples import Samples, scrape_registry, scrape_url
from toolpool.testing import Downstream, ServiceSpec

# Random per run, so that finding one in the exposition cannot be a coincidence of a constant.
RUN = secrets.token_hex(5)
TENANTS = [f"tenant{i}-{RUN}" for i in range(3)]
SALT = f"salt-{secrets.token_hex(8)}"


def client_id(tenant: str) -> str:
    return f"app-{tenant}"


def client_secret(tenant: str) -> str:
    return f"cs-{secrets.token_hex(4)}-{tenant}"


def ctx_client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


async def test_no_secret_or_raw_tenant_id_in_exposition() -> None:
    labels = toolpool.metrics.TenantLabels(salt=SALT)
    services = {
        "crm": ServiceSpec(token_latency=0.01),  # bearer tokens of its own token endpoint
        "search": ServiceSpec(require_auth=False),  # the tool sends its own Authorization
    }
    async with Downstream(services, tls=True) as ds:
        contexts = {}
        for tenant in TENANTS:
            secret = client_secret(tenant)
            ds.register_client(
                "crm", client_id=client_id(tenant), client_secret=secret, tenant=tenant
            )
            contexts[tenant] = toolpool.AuthContext(
                tenant=tenant,
                subject=f"user-{tenant}",
                credentials={"client_id": client_id(tenant), "client_secret": secret},
            )
        oauth = toolpool.auth.OAuth2ClientCredentials(ds.token_url("crm"), credentials=ctx_client)
        pool = toolpool.Pool(
            [
                toolpool.Destination("crm", ds.url("crm"), auth=oauth, max_connections=6),
                toolpool.Destination("search", ds.url("search"), max_connections=4),
            ],
            verify=ds.ca_pem_path,
            warmup=0.0,
            queue_factor=20,
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry, tenants=labels)
        tool_secrets = {t: f"tool-key-{secrets.token_hex(8)}" for t in TENANTS}
        tokens: set[str] = set()
        async with pool, pool.client() as client:

            async def call(tenant: str) -> None:
                with toolpool.auth_context(contexts[tenant]):
                    r = await client.get(ds.url("crm") + "/echo")
                    assert r.status_code == 200, r.text
                    tokens.add(r.json()["headers"]["authorization"].split()[-1])
                    r = await client.get(
                        ds.url("search") + "/anything",
                        headers={
                            "Authorization": f"Bearer {tool_secrets[tenant]}",
                            "X-Tenant": tenant,
                        },
                    )
                    assert r.status_code == 200

            await asyncio.gather(*(call(t) for t in TENANTS for _ in range(8)))
            samples = scrape_registry(registry)
            crm = ds.stats("crm")
        text = samples.text
        assert len(tokens) == len(TENANTS)  # one token per tenant, seen by the server
        forbidden = {SALT, *tokens, *tool_secrets.values()}
        for tenant, ctx in contexts.items():
            forbidden |= {tenant, client_id(tenant), ctx.credentials["client_secret"]}
            forbidden |= {f"user-{tenant}", ctx.fingerprint}
        leaked = sorted(s for s in forbidden if s in text)
        assert not leaked, f"found in the exposition: {leaked}"
        assert RUN not in text  # no fragment of any tenant id either
        # The tenants are there, under their hashed labels, with their exact request counts.
        for dest in ("crm", "search"):
            for tenant in TENANTS:
                label = labels.label(tenant)
                assert label != tenant and len(label) == 12
                assert (
                    samples.get(
                        "toolpool_tenant_requests_total",
                        destination=dest,
                        tenant=label,
                        outcome="2xx",
                    )
                    == 8
                )
        # The auth series match the token endpoint's own count: one fetch per tenant.
        assert crm.token_requests == len(TENANTS)
        assert samples.get(
            "toolpool_auth_refreshes_total", destination="crm", reason="initial"
        ) == len(TENANTS)
        assert samples.get("toolpool_auth_fetch_seconds_count", destination="crm") == len(TENANTS)
        assert samples.get("toolpool_auth_failures_total", destination="crm") == 0
        assert samples.get("toolpool_auth_contexts", destination="crm") == len(TENANTS)
        assert "toolpool_auth_refreshes_total" not in "".join(
            line for line in text.splitlines() if 'destination="search"' in line
        )
        # pool.stats() carries the same refresh counts.
        assert pool.stats()["crm"].auth_refreshes_total["initial"] == len(TENANTS)
        assert SALT not in repr(labels)


def test_tenant_labels_are_bounded_and_count_outcomes() -> None:
    labels = toolpool.metrics.TenantLabels(salt=SALT, max_tenants=2)
    tenants = [f"t{i}-{RUN}" for i in range(4)]
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        pool = toolpool.Pool(
            [toolpool.Destination("crm", ds.url("crm"), max_connections=2, warmup=0.0)]
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry, tenants=labels)
        with pool, pool.sync_client() as client:
            for i, tenant in enumerate(tenants):  # first seen first labelled
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    for _ in range(i + 1):
                        assert client.get(ds.url("crm") + "/anything").status_code == 200
                    assert client.get(ds.url("crm") + "/status/404").status_code == 404
            assert client.get(ds.url("crm") + "/anything").status_code == 200  # no context
            samples = scrape_registry(registry)
        series = samples.series("toolpool_tenant_requests_total")
        seen = {dict(lab)["tenant"] for lab in series}
        assert seen == {labels.label(tenants[0]), labels.label(tenants[1]), "other", "none"}

        def count(tenant: str, outcome: str) -> float:
            return samples.get(
                "toolpool_tenant_requests_total", destination="crm", tenant=tenant, outcome=outcome
            )

        assert count(labels.label(tenants[0]), "2xx") == 1
        assert count(labels.label(tenants[1]), "2xx") == 2
        assert count("other", "2xx") == 3 + 4
        assert count("other", "4xx") == 2
        assert count("none", "2xx") == 1
        assert samples.total("toolpool_tenant_requests_total") == ds.stats("crm").requests_total
        assert (
            samples.get("toolpool_tenant_request_seconds_count", destination="crm", tenant="other")
            == 9
        )


def test_rejections_by_reason_and_per_tenant() -> None:
    labels = toolpool.metrics.TenantLabels(salt=SALT)
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        url = ds.url("crm") + "/anything"
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "crm", ds.url("crm"), max_connections=1, queue_factor=1.0, warmup=0.0
                )
            ]
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry, tenants=labels)
        ctx = toolpool.AuthContext(tenant=TENANTS[0])
        served: list[int] = []

        def wait_in_queue() -> None:
            with toolpool.auth_context(ctx):
                served.append(client.get(url, timeout=httpx.Timeout(10.0, pool=10.0)).status_code)

        with pool, pool.sync_client() as client, toolpool.auth_context(ctx):
            # A response not read yet holds the only connection.
            with client.stream("GET", ds.url("crm") + "/bytes?n=10") as held:
                waiter = threading.Thread(target=wait_in_queue)
                waiter.start()
                _wait_for(lambda: pool.stats()["crm"].waiting == 1)
                # The queue (one place) is taken: the next request is refused at once.
                with pytest.raises(toolpool.PoolSaturated):
                    client.get(url)
                held.read()  # the connection goes to the waiter
            waiter.join(10.0)
            assert served == [200]
            with client.stream("GET", ds.url("crm") + "/bytes?n=10") as held:
                with pytest.raises(toolpool.PoolTimeout):
                    client.get(url, timeout=httpx.Timeout(5.0, pool=0.2))
                held.read()
            samples = scrape_registry(registry)
        d = {"destination": "crm"}
        assert samples.get("toolpool_rejections_total", reason="queue_full", **d) == 1
        assert samples.get("toolpool_rejections_total", reason="timeout", **d) == 1
        label = labels.label(TENANTS[0])
        assert (
            samples.get("toolpool_tenant_requests_total", tenant=label, outcome="rejected", **d)
            == 2
        )
        assert samples.get("toolpool_tenant_requests_total", tenant=label, outcome="2xx", **d) == 3
        stats = pool.stats()["crm"]
        assert (stats.saturated_total, stats.timeouts_total) == (1, 1)
        assert stats.queued_total == 2  # the waiter and the request that timed out
        assert ds.stats("crm").requests_total == 3


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    """Poll a condition of the pool (its state changes without an event to wait on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.002)


# ---------------------------------------------------------------------- registries, serving


def _pool_with_traffic(ds: Downstream, requests: int) -> toolpool.Pool:
    pool = toolpool.Pool(
        [toolpool.Destination("crm", ds.url("crm"), max_connections=2, warmup=0.0)]
    )
    with pool.sync_client() as client:
        for _ in range(requests):
            assert client.get(ds.url("crm") + "/anything").status_code == 200
    return pool


def test_global_registry_register_and_unregister() -> None:
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        pool = _pool_with_traffic(ds, 3)
        try:
            toolpool.metrics.register(pool)
            toolpool.metrics.register(pool)  # twice is harmless: no duplicate series
            samples = Samples(toolpool.metrics.exposition())
            assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 3
            assert "process_cpu_seconds_total" in samples.text or "python_info" in samples.text
            toolpool.metrics.unregister(pool)
            assert not Samples(toolpool.metrics.exposition()).series(
                "toolpool_connection_wait_seconds_count"
            )
        finally:
            toolpool.metrics.unregister(pool)
            pool.close()
    # The registry's collector stays registered (names reserved), reporting no pool.
    with pytest.raises(ValueError, match="Duplicated"):
        Counter("toolpool_connections_created", "clash", registry=REGISTRY)


def test_pools_sharing_a_registry_are_summed_and_dropped_when_collected() -> None:
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        registry = CollectorRegistry()
        first = _pool_with_traffic(ds, 2)
        second = _pool_with_traffic(ds, 5)
        toolpool.metrics.register(first, registry)
        toolpool.metrics.register(second, registry)
        samples = scrape_registry(registry)
        assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 7
        assert samples.get("toolpool_connections_created_total", destination="crm") == (
            ds.stats("crm").connections_accepted
        )
        assert samples.get("toolpool_connections_max", destination="crm") == 4
        second.close()
        del second
        gc.collect()
        samples = scrape_registry(registry)
        assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 2
        first.close()


def test_serve_and_asgi_app_answer_with_the_exposition() -> None:
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        registry = CollectorRegistry()
        pool = _pool_with_traffic(ds, 4)
        toolpool.metrics.register(pool, registry)
        with toolpool.metrics.serve(0, registry) as server:
            assert server.host == "127.0.0.1"
            assert server.url.startswith("http://127.0.0.1:")
            samples = scrape_url(server.url)
            assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 4
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url, timeout=2.0, trust_env=False)

        async def over_asgi() -> Samples:
            transport = httpx.ASGITransport(app=toolpool.metrics.asgi_app(registry))
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            return Samples(response.text)

        samples = asyncio.run(over_asgi())
        assert samples.get("toolpool_connection_wait_seconds_count", destination="crm") == 4
        pool.close()
