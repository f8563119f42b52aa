"""In-process pools join the fleet with `RedisFleet.attach(pool)`: tokens and rate limits are
shared with every other member, from async code and from threads alike."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import toolpool
from tests._support.redis_fleet import FLEET_KEY, RedisServer
from toolpool.fleet import RedisFleet
from toolpool.resilience import Policy, RateLimit
from toolpool.testing import Downstream, ServiceSpec

TENANTS = ["acme", "globex"]


def oauth_pool(ds: Downstream) -> toolpool.Pool:
    auth = toolpool.auth.OAuth2ClientCredentials(
        ds.token_url("crm"), lambda ctx: (f"{ctx.tenant}-app", f"{ctx.tenant}-secret-123")
    )
    return toolpool.Pool(
        [toolpool.Destination("crm", ds.url("crm"), auth=auth, max_connections=10)],
        warmup=0.0,
    )


@pytest.mark.timeout(60)
def test_pools_in_threads_share_tokens_and_a_401_costs_one_fetch(
    redis_server: RedisServer,
) -> None:
    with Downstream({"crm": ServiceSpec(token_latency=0.05)}) as ds:
        for t in TENANTS:
            ds.register_client(
                "crm", client_id=f"{t}-app", client_secret=f"{t}-secret-123", tenant=t
            )
        env = {"TOOLPOOL_FLEET_KEY": FLEET_KEY}
        fleets = [RedisFleet(redis_server.url, env=env) for _ in range(3)]
        pools = [oauth_pool(ds) for _ in range(3)]
        try:
            for fleet, pool in zip(fleets, pools, strict=True):
                fleet.attach(pool)

            def call(pool: toolpool.Pool, tenant: str) -> int:
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    return pool.request_sync("GET", ds.url("crm") + "/anything").status_code

            jobs = [(p, t) for p in pools for t in TENANTS for _ in range(3)]
            with ThreadPoolExecutor(len(jobs)) as ex:
                statuses = list(ex.map(lambda j: call(*j), jobs))
            assert statuses == [200] * len(jobs)
            assert ds.stats("crm").token_requests == 2  # one per tenant, not one per pool

            ds.revoke_tokens("crm", tenant="acme")
            assert [call(p, "acme") for p in pools] == [200, 200, 200]
            assert ds.stats("crm").token_requests == 3
        finally:
            for pool in pools:
                pool.close()
            for fleet in fleets:
                asyncio.run(fleet.aclose())


@pytest.mark.timeout(60)
def test_sync_callers_share_the_rate_limit(redis_server: RedisServer) -> None:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        policy = Policy(
            retry=None, breaker=None, adaptive=None,
            rate_limit=RateLimit(rate=20, burst=1), max_wait=10.0,
        )  # fmt: skip
        pools = [
            toolpool.Pool(
                [toolpool.Destination("api", ds.url("api"), policy=policy, max_connections=20)],
                warmup=0.0,
            )
            for _ in range(2)
        ]
        fleets = [RedisFleet(redis_server.url, replicas=2, env={}) for _ in pools]
        try:
            for fleet, pool in zip(fleets, pools, strict=True):
                fleet.attach(pool)
            started = time.monotonic()
            with ThreadPoolExecutor(20) as ex:
                codes = list(
                    ex.map(
                        lambda i: (
                            pools[i % 2]
                            .request_sync("GET", ds.url("api") + "/anything", timeout=15)
                            .status_code
                        ),
                        range(20),
                    )
                )
            elapsed = time.monotonic() - started
            assert codes == [200] * 20
            # 20 starts at 20/s, burst 1, from two pools: at least 19 intervals.
            assert elapsed >= 19 / 20 * 0.95, elapsed
        finally:
            for pool in pools:
                pool.close()
            for fleet in fleets:
                asyncio.run(fleet.aclose())
