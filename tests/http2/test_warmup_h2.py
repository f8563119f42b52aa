"""Warm-up and auth preconnect on HTTP/2 destinations: one connection (and one token) per
(destination, warm-up context), opened before the first request, holding no stream; the
requests of those contexts then find their connection and token ready. Checked against what
the test bed counted (connections, streams, token requests, tenants per connection)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import httpx
import pytest

import toolpool
from tests._support.oauth_tenants import ctx_client, register, tenant_ctx
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(60)
TENANTS = ["acme", "globex", "initech"]


@pytest.fixture
def ds() -> Iterator[Downstream]:
    services = {"crm": ServiceSpec(), "idp": ServiceSpec(require_auth=False)}
    with Downstream(services, tls=True) as downstream:
        register(downstream, "crm", TENANTS)
        register(downstream, "idp", TENANTS)
        yield downstream


def _pool(ds: Downstream, token_service: str = "crm", **kwargs: object) -> toolpool.Pool:
    auth = toolpool.auth.OAuth2ClientCredentials(
        ds.token_url(token_service), credentials=ctx_client
    )
    dests = [toolpool.Destination("crm", ds.url("crm"), max_connections=12, auth=auth, **kwargs)]
    if token_service != "crm":
        dests.append(toolpool.Destination(token_service, ds.url(token_service), warmup=0.0))
    return toolpool.Pool(dests, verify=ds.ca_pem_path, http2=True)


def _check_warm(ds: Downstream, pool: toolpool.Pool) -> None:
    """After warm-up: one HTTP/2 connection and one token per context, no stream held."""
    served = ds.stats("crm")
    assert served.connections_accepted == len(TENANTS)
    assert served.http2_connections() == len(TENANTS)
    assert served.connections_open == len(TENANTS)
    assert dict(served.token_requests_by_tenant) == {t: 1 for t in TENANTS}
    assert served.requests_total == len(TENANTS)  # the token requests, no API request
    stats = pool.stats()["crm"]
    assert stats.protocol == "h2"
    assert stats.http2_connections == len(TENANTS)
    assert stats.http2_streams_in_use == 0
    assert stats.in_use == 0


def _check_used_warm(ds: Downstream, calls: int) -> None:
    """The calls after warm-up opened nothing and fetched no token; affinity held."""
    served = ds.wait_stats("crm", lambda s: s.connections_open == 0)
    assert served.connections_accepted == len(TENANTS)
    assert dict(served.token_requests_by_tenant) == {t: 1 for t in TENANTS}
    assert served.requests_total == len(TENANTS) + calls  # tokens at warm-up, then calls
    assert served.mixed_connections() == {}
    assert set(served.connection_protocols.values()) == {"h2"}


async def test_warmup_opens_one_connection_and_token_per_context(ds: Downstream) -> None:
    contexts = [tenant_ctx(t) for t in TENANTS]
    async with _pool(ds, warmup_contexts=contexts) as pool:
        _check_warm(ds, pool)
        client = pool.client()

        async def call(ctx: toolpool.AuthContext) -> httpx.Response:
            with toolpool.auth_context(ctx):
                return await client.get(ds.url("crm") + "/delay?s=0.02")

        responses = await asyncio.gather(*[call(contexts[i % 3]) for i in range(12)])
        assert [r.json()["tenant"] for r in responses] == [TENANTS[i % 3] for i in range(12)]
        assert {r.http_version for r in responses} == {"HTTP/2"}
        assert pool.stats()["crm"].http2_connections == len(TENANTS)
    _check_used_warm(ds, 12)


def test_warmup_on_the_thread_driver(ds: Downstream) -> None:
    contexts = [tenant_ctx(t) for t in TENANTS]
    with _pool(ds, warmup_contexts=contexts) as pool:
        _check_warm(ds, pool)
        client = pool.sync_client()
        for ctx in contexts:
            with toolpool.auth_context(ctx):
                response = client.get(ds.url("crm") + "/anything")
            assert response.http_version == "HTTP/2"
            assert response.json()["tenant"] == ctx.tenant
    _check_used_warm(ds, len(TENANTS))


async def test_warmup_off_opens_nothing(ds: Downstream) -> None:
    contexts = [tenant_ctx(t) for t in TENANTS]
    async with _pool(ds, warmup_contexts=contexts, warmup=0.0) as pool:
        assert pool.stats()["crm"].http2_connections == 0
        assert ds.stats("crm").connections_accepted == 0
        assert ds.stats("crm").token_requests == 0


def _refusing_url() -> str:
    """An https:// URL on loopback where nothing listens (connects are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"https://127.0.0.1:{port}"


@pytest.mark.parametrize("listed", [False, True], ids=["no-context", "listed-context"])
@pytest.mark.parametrize("driver", ["asyncio", "threads"])
async def test_a_failed_warmup_leaves_no_permit_standing_for_a_connection(
    driver: str, listed: bool
) -> None:
    """Warm-up against a server that refuses the connect (for no identity, or for a listed
    context): the stream permit taken for the handshake goes with it, so no idle permit
    stands for a connection that is not there (the HTTP/1.1 warm-up likewise leaves no idle
    slot)."""
    contexts = [toolpool.AuthContext(tenant="acme")] if listed else []
    dest = toolpool.Destination(
        "down", _refusing_url(), connect_timeout=5.0, warmup_contexts=contexts
    )
    pool = toolpool.Pool([dest], http2=True)
    if driver == "asyncio":
        await pool.astart()
    else:
        await asyncio.to_thread(pool.start)
    try:
        stats = pool.stats()["down"]
        assert (stats.idle, stats.in_use, stats.opening) == (0, 0, 0)
        assert stats.protocol == "unknown"
        assert (stats.http2_connections, stats.http2_connections_opened) == (0, 0)
    finally:
        await pool.aclose()


async def test_preconnect_opens_the_tenants_connection_during_the_token_fetch() -> None:
    """Tokens from another origin (a relay to the service's token endpoint, answering after
    2 s): while the first call's token is on its way, the auth provider opens the tenant's
    HTTP/2 connection to the API; the call then uses that connection."""
    from toolpool.testing import LatencyRelay

    async with Downstream({"crm": ServiceSpec(token_latency=2.0)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        host, port = ds.address("crm", direct=True)
        async with LatencyRelay(host, port, one_way=0.0) as relay:
            auth = toolpool.auth.OAuth2ClientCredentials(
                relay.url("https") + "/oauth/token", credentials=ctx_client
            )
            dests = [
                toolpool.Destination("crm", ds.url("crm"), auth=auth, warmup=0.0),
                toolpool.Destination("idp", relay.url("https"), warmup=0.0),
            ]
            async with toolpool.Pool(dests, verify=ds.ca_pem_path, http2=True) as pool:
                client = pool.client()

                async def call() -> httpx.Response:
                    with toolpool.auth_context(tenant_ctx("acme")):
                        return await client.get(ds.url("crm") + "/anything")

                task = asyncio.create_task(call())
                deadline = asyncio.get_running_loop().time() + 1.5
                while pool.stats()["crm"].http2_connections == 0:
                    assert asyncio.get_running_loop().time() < deadline, "no preconnect"
                    await asyncio.sleep(0.005)
                assert not task.done()  # the token (2 s) is still on its way
                assert pool.stats()["crm"].http2_streams_in_use == 0
                response = await task
                assert response.json()["tenant"] == "acme"
                assert response.http_version == "HTTP/2"
                assert pool.stats()["crm"].http2_connections == 1
                assert pool.stats()["crm"].protocol == "h2"


# -- no context listed: one unbound connection, bound by the first request that needs one ----


def _open_pool(ds: Downstream, **kwargs: object) -> toolpool.Pool:
    dest = toolpool.Destination("api", ds.url("api"), max_connections=12, **kwargs)
    return toolpool.Pool([dest], verify=ds.ca_pem_path, http2=True)


@pytest.mark.parametrize("sync", [False, True], ids=["async", "threads"])
async def test_warmup_without_contexts_warms_one_connection_the_first_request_binds(
    sync: bool,
) -> None:
    """No context listed: warm-up opens one connection for no identity. The first request
    (here a tenant's) takes it and binds it to its context; the next tenant and requests
    outside any context open their own (affinity unchanged)."""
    async with Downstream({"api": ServiceSpec(require_auth=False)}, tls=True) as ds:
        pool = _open_pool(ds)
        if sync:
            await asyncio.to_thread(pool.start)
        else:
            await pool.astart()

        async def get(ctx: toolpool.AuthContext | None) -> httpx.Response:
            with toolpool.auth_context(ctx) if ctx is not None else contextlib.nullcontext():
                if sync:
                    return await asyncio.to_thread(
                        pool.sync_client().get, ds.url("api") + "/anything"
                    )
                return await pool.client().get(ds.url("api") + "/anything")

        try:
            warm = await ds.wait_stats_async("api", lambda s: s.connections_accepted == 1)
            assert warm.http2_connections() == 1
            assert warm.requests_total == 0
            assert pool.stats()["api"].idle == 1  # the unbound permit

            first = await get(toolpool.AuthContext(tenant="acme"))
            assert first.http_version == "HTTP/2"
            assert ds.stats("api").connections_accepted == 1  # on the warm connection
            assert first.json()["connection_id"] == min(warm.connection_protocols)

            second = await get(toolpool.AuthContext(tenant="globex"))
            outside = await get(None)
            again = await get(toolpool.AuthContext(tenant="acme"))
            assert second.json()["connection_id"] != first.json()["connection_id"]
            assert outside.json()["connection_id"] not in {
                first.json()["connection_id"],
                second.json()["connection_id"],
            }
            assert again.json()["connection_id"] == first.json()["connection_id"]
            assert pool.stats()["api"].http2_connections == 3
        finally:
            await pool.aclose()
        served = ds.stats("api")
        assert served.connections_accepted == 3
        assert served.mixed_connections() == {}
        assert sorted(len(t) for t in served.connection_tenants.values()) == [1, 1, 1]


async def test_an_unused_unbound_warm_connection_closes_after_the_idle_ttl() -> None:
    async with Downstream({"api": ServiceSpec(require_auth=False)}, tls=True) as ds:
        async with _open_pool(ds, idle_ttl=0.3) as pool:
            await ds.wait_stats_async("api", lambda s: s.connections_accepted == 1)
            await ds.wait_stats_async("api", lambda s: s.connections_open == 0)
            stats = pool.stats()["api"]
            assert stats.http2_connections == 0
            assert stats.idle == 0
            assert stats.closed_total["idle_ttl"] == 1


async def test_a_per_tenant_oauth_destination_warms_an_unbound_connection_without_token(
    ds: Downstream,
) -> None:
    """A provider with credentials per context has no token without a context: warm-up
    opens the connection only; the first tenant's call binds it and fetches its token."""
    async with _pool(ds) as pool:
        warm = await ds.wait_stats_async("crm", lambda s: s.connections_accepted == 1)
        assert warm.token_requests == 0
        with toolpool.auth_context(tenant_ctx("acme")):
            response = await pool.client().get(ds.url("crm") + "/anything")
        assert response.json()["tenant"] == "acme"
    served = ds.stats("crm")
    assert served.connections_accepted == 1  # the token and the call on the warm connection
    assert dict(served.token_requests_by_tenant) == {"acme": 1}
    assert served.mixed_connections() == {}
