"""OAuth 2 client credentials and token exchange against the test bed's token endpoint (TLS):
caching, single-flight, parallel contexts, refresh ahead of expiry, 401 handling, negative
cache, routing of credentials, and the stats counters."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import toolpool
from tests._support.oauth_tenants import (
    TENANTS,
    client_secret,
    destination,
    oauth,
    register,
    tenant_ctx,
)
from toolpool.testing import Downstream, ServiceSpec


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a client-side condition (state the test bed cannot report), bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
async def test_client_credentials_token_is_fetched_once_and_reused(crm, auth_method):
    provider = oauth(crm, scope="contacts:read", auth_method=auth_method)
    async with toolpool.Pool([destination(crm, auth=provider)]) as pool:
        with toolpool.auth_context(tenant_ctx("acme")):
            async with pool.client() as client:
                bodies = [(await client.get(crm.url("crm") + "/anything")).json() for _ in range(5)]
    assert {(b["tenant"], b["client_id"]) for b in bodies} == {("acme", "acme-app")}
    stats = crm.stats("crm")
    assert stats.token_requests == 1
    assert stats.token_requests_by_tenant == {"acme": 1}
    assert stats.http_401 == 0


async def test_200_concurrent_first_calls_make_one_token_request(crm):
    crm.reset_stats()
    dest = destination(crm, auth=oauth(crm), max_connections=100, queue_factor=2)
    async with toolpool.Pool([dest]) as pool, pool.client() as client:
        with toolpool.auth_context(tenant_ctx("acme")):
            responses = await asyncio.gather(
                *(client.get(crm.url("crm") + "/anything") for _ in range(200))
            )
        auth_stats = pool.destination("crm").auth.stats()
    assert [r.status_code for r in responses] == [200] * 200
    assert {r.json()["tenant"] for r in responses} == {"acme"}
    assert crm.stats("crm").token_requests == 1
    assert auth_stats.fetches_total == 1
    assert auth_stats.refreshes_total["initial"] == 1


def test_concurrent_first_calls_from_threads_make_one_token_request():
    with Downstream({"crm": ServiceSpec(token_latency=0.2)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        errors: list[BaseException] = []
        statuses: list[int] = []
        barrier = threading.Barrier(40)
        with toolpool.Pool([destination(ds, auth=oauth(ds))]) as pool:
            client = pool.sync_client()

            def call() -> None:
                barrier.wait()
                try:
                    with toolpool.auth_context(tenant_ctx("acme")):
                        statuses.append(client.get(ds.url("crm") + "/anything").status_code)
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=call) for _ in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        assert not errors
        assert statuses == [200] * 40
        assert ds.stats("crm").token_requests == 1


@pytest.mark.parametrize("driver", ["async", "threads"])
async def test_different_contexts_fetch_in_parallel(driver):
    """10 contexts, each token held 2 s by the server: all 10 token requests must reach the
    server before it has answered any (fetches one after another could not)."""
    tenants = [f"t{i}" for i in range(10)]
    async with Downstream({"crm": ServiceSpec(token_latency=2.0)}, tls=True) as ds:
        register(ds, "crm", tenants)
        pool = toolpool.Pool([destination(ds, auth=oauth(ds), max_connections=20)])
        async with pool:
            url = ds.url("crm") + "/anything"
            if driver == "async":
                client = pool.client()

                async def call(tenant: str) -> httpx.Response:
                    with toolpool.auth_context(tenant_ctx(tenant)):
                        return await client.get(url)

                calls = asyncio.gather(*(call(t) for t in tenants))
            else:
                sync_client = pool.sync_client()

                def call_sync(tenant: str) -> httpx.Response:
                    with toolpool.auth_context(tenant_ctx(tenant)):
                        return sync_client.get(url)

                loop = asyncio.get_running_loop()
                executor = ThreadPoolExecutor(len(tenants))
                calls = asyncio.gather(
                    *(loop.run_in_executor(executor, call_sync, t) for t in tenants)
                )
            snap = await ds.wait_stats_async("crm", lambda s: s.token_requests == 10, timeout=15)
            responses = await calls
            if driver == "threads":
                executor.shutdown()
    # No token (and so no API) response had been sent when the 10th token request arrived.
    assert snap.responses_by_status == {}
    assert [r.json()["tenant"] for r in responses] == tenants
    assert ds.stats("crm").token_requests_by_tenant == dict.fromkeys(tenants, 1)


@pytest.mark.parametrize("driver", ["async", "threads"])
async def test_refresh_ahead_of_expiry_runs_in_the_background(driver):
    """4 s tokens are refreshed 2 s after they were requested (the 30 s margin never moves the
    refresh before half the lifetime); the request that finds the token past that point is
    answered with the old token while the refresh (held 1 s by the server) runs."""
    spec = ServiceSpec(token_latency=1.0, token_ttl=4.0)
    async with Downstream({"crm": spec}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        async with toolpool.Pool([destination(ds, auth=oauth(ds))]) as pool:
            auth = pool.destination("crm").auth
            url = ds.url("crm") + "/anything"
            client = pool.client()
            sync_client = pool.sync_client()

            async def call() -> httpx.Response:
                with toolpool.auth_context(tenant_ctx("acme")):
                    if driver == "async":
                        return await client.get(url)
                    return await asyncio.to_thread(sync_client.get, url)

            assert (await call()).status_code == 200
            assert auth.stats().fetch_duration_count == 1
            entry = auth.cache.entries[tenant_ctx("acme").fingerprint]
            old = entry.cached
            # Past the refresh point: 2 s after the token was requested, which on a busy
            # machine can be well after this test started its first call (TLS, the pool).
            assert old.expires_at - old.refresh_at == pytest.approx(2.0)  # 4 s tokens
            await asyncio.sleep(max(0.0, old.refresh_at + 0.1 - time.monotonic()))
            response = await call()  # past the refresh point: starts the refresh
            after = auth.stats()
            assert response.status_code == 200
            assert after.refreshes_total == {"initial": 1, "expiry": 1, "401": 0}
            assert after.background_refreshes_total == 1
            # The refresh had not finished (the server holds it 1 s), yet the call returned.
            assert after.fetch_duration_count == 1
            await ds.wait_stats_async("crm", lambda s: s.responses_by_status.get(200, 0) >= 4)
            await until(lambda: auth.stats().fetch_duration_count == 2)
            # The refreshed token replaced the old one, and lives longer.
            assert entry.cached is not old
            assert entry.cached.expires_at >= old.expires_at + 2.0
            assert (await call()).status_code == 200
            assert auth.stats().fetches_total == 2
    stats = ds.stats("crm")
    assert stats.token_requests == 2
    assert stats.http_401 == 0


@pytest.mark.parametrize("driver", ["async", "threads"])
async def test_401_invalidates_refreshes_and_retries_once(crm, driver):
    async with toolpool.Pool([destination(crm, auth=oauth(crm))]) as pool, pool.client() as c:
        sync_client = pool.sync_client()

        async def call(method: str, path: str, **kw: object) -> httpx.Response:
            if driver == "async":
                return await c.request(method, crm.url("crm") + path, **kw)
            return await asyncio.to_thread(sync_client.request, method, crm.url("crm") + path, **kw)

        with toolpool.auth_context(tenant_ctx("acme")):
            assert (await call("GET", "/anything")).status_code == 200
            crm.revoke_tokens("crm")
            response = await call("POST", "/echo", json={"n": 1})
        stats = pool.destination("crm").auth.stats()
    assert response.status_code == 200
    assert response.json()["body"] == '{"n":1}'  # the body was sent again, intact
    assert crm.stats("crm").http_401 == 1
    assert crm.stats("crm").token_requests == 2
    assert stats.refreshes_total == {"initial": 1, "expiry": 0, "401": 1}
    assert stats.retries_total == 1


def test_401_with_a_streamed_body_is_returned_and_the_next_call_refreshes(crm):
    with toolpool.Pool([destination(crm, auth=oauth(crm))]) as pool:
        client = pool.sync_client()
        with toolpool.auth_context(tenant_ctx("acme")):
            assert client.get(crm.url("crm") + "/anything").status_code == 200
            crm.revoke_tokens("crm")
            # A generator body cannot be sent twice: the caller gets the 401.
            streamed = client.post(crm.url("crm") + "/echo", content=iter([b"a", b"b"]))
            assert streamed.status_code == 401
            assert crm.stats("crm").token_requests == 1
            again = client.post(crm.url("crm") + "/echo", content=iter([b"a", b"b"]))
        stats = pool.destination("crm").auth.stats()
    assert again.status_code == 200
    assert again.json()["body"] == "ab"
    assert crm.stats("crm").token_requests == 2
    assert stats.refreshes_total["401"] == 1
    assert stats.retries_total == 0


async def test_second_401_raises_auth_error_naming_destination_and_tenant(crm):
    async with toolpool.Pool([destination(crm, auth=oauth(crm))]) as pool, pool.client() as c:
        with toolpool.auth_context(tenant_ctx("acme")):
            assert (await c.get(crm.url("crm") + "/anything")).status_code == 200
            crm.set_fault("crm", "status", status=401)
            with pytest.raises(toolpool.AuthError) as caught:
                await c.get(crm.url("crm") + "/anything")
            # Held briefly: the next call fails at once, without a token request.
            with pytest.raises(toolpool.AuthError, match="failed recently"):
                await c.get(crm.url("crm") + "/anything")
        stats = pool.destination("crm").auth.stats()
    err = caught.value
    assert isinstance(err, httpx.TransportError)  # tool code handling httpx errors sees it
    assert (err.destination, err.tenant) == ("crm", "acme")
    assert "'crm'" in str(err)
    assert "'acme'" in str(err)
    assert "401" in str(err)
    assert client_secret("acme") not in str(err)
    assert "tb-access-" not in str(err)
    assert crm.stats("crm").token_requests == 2  # initial + the one refresh
    assert crm.stats("crm").http_401 == 2
    assert stats.rejected_total == 1
    assert stats.negative_hits_total == 1


async def test_failing_credentials_are_held_and_other_tenants_are_unaffected():
    async with Downstream({"crm": ServiceSpec(token_latency=0.05)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        ds.register_client("crm", client_id="broken-app", client_secret="other", tenant="broken")
        policy = toolpool.auth.TokenPolicy(negative_ttl=0.5)
        dest = destination(ds, auth=oauth(ds, policy=policy))
        async with toolpool.Pool([dest]) as pool, pool.client() as client:
            url = ds.url("crm") + "/anything"

            async def call(tenant: str) -> httpx.Response:
                with toolpool.auth_context(tenant_ctx(tenant)):
                    return await client.get(url)

            # 10 concurrent calls share one failed fetch; 10 later ones hit the negative cache.
            first = await asyncio.gather(
                *(call("broken") for _ in range(10)), return_exceptions=True
            )
            later = [
                await asyncio.gather(call("broken"), return_exceptions=True) for _ in range(10)
            ]
            good = await call("acme")
            assert ds.stats("crm").token_requests == 2  # one for broken, one for acme
            assert all(isinstance(e, toolpool.AuthError) for e in first)
            assert all(isinstance(e[0], toolpool.AuthError) for e in later)
            assert "401 (invalid_client)" in str(first[0])
            assert good.status_code == 200
            # Once the hold has passed, a fixed secret works.
            ds.register_client(
                "crm",
                client_id="broken-app",
                client_secret=client_secret("broken"),
                tenant="broken",
            )
            await asyncio.sleep(0.55)
            fixed = await call("broken")
            stats = pool.destination("crm").auth.stats()
    assert fixed.json()["tenant"] == "broken"
    assert ds.stats("crm").token_requests == 3
    assert stats.failures_total == 1
    assert stats.negative_hits_total == 10


async def test_token_exchange_swaps_the_subject_token_per_user():
    async with Downstream({"crm": ServiceSpec(token_latency=0.01)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        users = {u: ds.subject_token(tenant="acme", subject=u) for u in ("u1", "u2")}
        plain = toolpool.auth.TokenExchange(ds.token_url("crm"), audience="crm")
        with_client = toolpool.auth.TokenExchange(
            ds.token_url("crm"),
            subject_token=lambda ctx: users[ctx.subject],
            client_credentials=("acme-app", client_secret("acme")),
            auth_method="client_secret_post",
        )
        for provider in (plain, with_client):
            async with toolpool.Pool([destination(ds, auth=provider)]) as pool:
                client = pool.client()
                for user, token in users.items():
                    ctx = toolpool.AuthContext(
                        tenant="acme", subject=user, credentials={"subject_token": token}
                    )
                    with toolpool.auth_context(ctx):
                        body = (await client.get(ds.url("crm") + "/anything")).json()
                    assert (body["tenant"], body["subject"]) == ("acme", user)
                    assert body["client_id"] == (None if provider is plain else "acme-app")
                if provider is plain:
                    no_token = toolpool.AuthContext(tenant="acme", subject="x")
                    with (
                        toolpool.auth_context(no_token),
                        pytest.raises(toolpool.AuthError, match=r"credentials\['subject_token'\]"),
                    ):
                        await client.get(ds.url("crm") + "/anything")
        assert ds.stats("crm").token_requests == 4


async def test_token_endpoint_on_another_destination_preconnects_the_api():
    """The token endpoint sits behind a relay (another origin, so another destination). The
    API connection is opened while the token is fetched: the first API request reuses it.
    Without preconnect it opens its own. With the token endpoint on the API's own destination,
    the token request's connection is reused instead."""
    from toolpool.testing import LatencyRelay

    async with Downstream({"crm": ServiceSpec(token_latency=0.3)}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        host, port = ds.address("crm", direct=True)
        async with LatencyRelay(host, port, one_way=0.0) as relay:
            idp_url = relay.url("https")
            reused = {}
            for preconnect in (True, False):
                provider = toolpool.auth.OAuth2ClientCredentials(
                    idp_url + "/oauth/token",
                    credentials=lambda ctx: (
                        ctx.credentials["client_id"],
                        ctx.credentials["client_secret"],
                    ),
                    policy=toolpool.auth.TokenPolicy(preconnect=preconnect),
                )
                idp = toolpool.Destination("idp", idp_url, verify=ds.ca_pem_path, warmup=0.0)
                pool = toolpool.Pool([destination(ds, auth=provider), idp])
                async with pool, pool.client() as client:
                    with toolpool.auth_context(tenant_ctx("acme")):
                        response = await client.get(ds.url("crm") + "/anything")
                    reused[preconnect] = response.extensions["toolpool"]["reused"]
                    assert response.json()["tenant"] == "acme"
                    assert pool.stats()["crm"].created_total == 1
                    assert pool.stats()["idp"].created_total == 1
            # Same destination: the token request's connection carries the API request.
            async with toolpool.Pool([destination(ds, auth=oauth(ds))]) as pool:
                with toolpool.auth_context(tenant_ctx("acme")):
                    same = await pool.client().get(ds.url("crm") + "/anything")
                assert pool.stats()["crm"].created_total == 1
    assert reused == {True: True, False: False}
    assert same.extensions["toolpool"]["reused"] is True
    assert not ds.stats("crm").mixed_connections()


async def test_credentials_only_go_to_their_own_destination():
    services = {"crm": ServiceSpec(token_latency=0.01), "search": ServiceSpec(require_auth=False)}
    async with Downstream(services, tls=True) as ds:
        register(ds, "crm", ["acme"])
        pool = toolpool.Pool(
            [
                destination(ds, "crm", auth=oauth(ds)),
                destination(ds, "search", auth=toolpool.auth.ApiKey(key="k-" + client_secret("x"))),
            ]
        )
        async with pool, pool.client() as client:
            with toolpool.auth_context(tenant_ctx("acme")):
                request = client.build_request("GET", ds.url("crm") + "/echo")
                crm_response = await client.send(request)
                search = (await client.get(ds.url("search") + "/echo")).json()
    echoed = {k.lower() for k in crm_response.json()["headers"]}
    assert "authorization" in echoed
    assert "x-api-key" not in echoed  # search's key never went to crm
    assert "authorization" not in {k.lower() for k in search["headers"]}  # nor crm's token
    assert search["headers"].get("x-api-key") == "k-" + client_secret("x")
    # The caller's request object (and so redirects and recorders built from it) never
    # carried the token: it was set on a copy inside the transport.
    assert "authorization" not in request.headers
    assert "authorization" not in crm_response.request.headers


async def test_a_request_without_context_needs_a_shared_identity(crm):
    per_context = destination(crm, auth=oauth(crm))
    async with toolpool.Pool([per_context]) as pool:
        with pytest.raises(toolpool.AuthError, match=r"toolpool\.auth_context") as caught:
            await pool.client().get(crm.url("crm") + "/anything")
    assert caught.value.tenant is None
    assert crm.stats("crm").token_requests == 0
    shared = oauth(crm, credentials=("acme-app", client_secret("acme")))
    async with toolpool.Pool([destination(crm, auth=shared)]) as pool:
        body = (await pool.client().get(crm.url("crm") + "/anything")).json()
    assert body["tenant"] == "acme"


async def test_stats_count_fetches_failures_and_durations():
    async with Downstream({"crm": ServiceSpec(token_latency=0.06)}, tls=True) as ds:
        register(ds, "crm", TENANTS)
        async with toolpool.Pool([destination(ds, auth=oauth(ds))]) as pool:
            client = pool.client()
            for tenant in [*TENANTS, "nobody"]:
                with toolpool.auth_context(tenant_ctx(tenant)):
                    try:
                        await client.get(ds.url("crm") + "/anything")
                    except toolpool.AuthError:
                        assert tenant == "nobody"
            stats = toolpool.auth.stats(pool)["crm"]
    assert stats.destination == "crm"
    assert stats.provider == "OAuth2ClientCredentials"
    assert stats.fetches_total == 4
    assert stats.refreshes_total == {"initial": 4, "expiry": 0, "401": 0}
    assert stats.failures_total == 1
    assert stats.fetch_duration_count == 4
    assert sum(stats.fetch_duration_buckets) == 4
    assert 4 * 0.06 <= stats.fetch_duration_sum_seconds < 4 * 5.0
    # Every fetch took the server's 60 ms at least: nothing in the buckets up to 50 ms.
    bounds = stats.bucket_bounds
    low = [n for b, n in zip(bounds, stats.fetch_duration_buckets[:-1], strict=True) if b <= 0.05]
    assert sum(low) == 0
    assert stats.contexts == 4


async def test_pool_close_stops_a_background_refresh():
    spec = ServiceSpec(token_latency=(0.0, 0.0), token_ttl=2.0)
    async with Downstream({"crm": spec}, tls=True) as ds:
        register(ds, "crm", ["acme"])
        pool = toolpool.Pool([destination(ds, auth=oauth(ds))])
        async with pool:
            auth = pool.destination("crm").auth
            with toolpool.auth_context(tenant_ctx("acme")):
                await pool.client().get(ds.url("crm") + "/anything")
                ds.set_fault("crm", "slow", delay=30.0, endpoint="token")
                # Past the refresh point (1 s after the token was requested, for 2 s tokens),
                # before its expiry: from the cached token's own times, not the clock here.
                cached = auth.cache.entries[tenant_ctx("acme").fingerprint].cached
                await asyncio.sleep(max(0.0, cached.refresh_at + 0.05 - time.monotonic()))
                await pool.client().get(ds.url("crm") + "/anything")
            await ds.wait_stats_async("crm", lambda s: s.token_requests == 2)
            assert len(auth._tasks) == 1
        # Closing the pool cancelled the refresh waiting on the slow token endpoint (which
        # holds it 30 s).
        await until(lambda: not auth._tasks, timeout=5.0)
        assert auth.stats().abandoned_total == 1


async def test_a_slow_token_endpoint_fails_within_the_policy_timeout(crm):
    crm.set_fault("crm", "slow", delay=30.0, endpoint="token")
    policy = toolpool.auth.TokenPolicy(timeout=0.3)
    async with toolpool.Pool([destination(crm, auth=oauth(crm, policy=policy))]) as pool:
        with toolpool.auth_context(tenant_ctx("acme")):
            started = time.monotonic()
            with pytest.raises(toolpool.AuthError, match="ReadTimeout") as caught:
                await pool.client().get(crm.url("crm") + "/anything")
            elapsed = time.monotonic() - started
    assert isinstance(caught.value.__cause__, httpx.ReadTimeout)
    assert elapsed < 10.0  # the server holds the answer 30 s
    assert crm.stats("crm").token_requests == 1
