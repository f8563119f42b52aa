"""One token per (destination, tenant) for the fleet: 3 replicas × 10 tenants × 5
destinations fetch 50 tokens, not 150; copies in Redis are encrypted and unnamed; a 401
replaces the fleet's copy once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests._support.pool_service import AGENT_A_TOKEN, SERVICE_ENV, ServiceThread, write_config
from tests._support.redis_fleet import (
    FLEET_KEY,
    RedisServer,
    fleet_config,
    limits_section,
    secret_env,
    secret_of,
)
from toolpool.fleet import RedisFleet
from toolpool.testing import Downstream, ServiceSpec

DESTS = [f"s{i}" for i in range(5)]
TENANTS = [f"tenant-{i}" for i in range(10)]


@pytest.fixture
def ds() -> Iterator[Downstream]:
    spec = ServiceSpec(token_latency=0.05, service_time=0.005)
    with Downstream(dict.fromkeys(DESTS, spec)) as downstream:
        for d in DESTS:
            for t in TENANTS:
                downstream.register_client(
                    d, client_id=f"{d}-{t}", client_secret=secret_of(d, t), tenant=t
                )
        yield downstream


def env_for(redis_server: RedisServer) -> dict[str, str]:
    env = {
        **SERVICE_ENV,
        "TOOLPOOL_REDIS_URL": redis_server.url,
        "TOOLPOOL_FLEET_KEY": FLEET_KEY,
    }
    env.update({secret_env(d, t): secret_of(d, t) for d in DESTS for t in TENANTS})
    return env


async def call(client: httpx.AsyncClient, dest: str, tenant: str) -> int:
    r = await client.get(f"/d/{dest}/anything", headers={"X-Toolpool-Tenant": tenant})
    return r.status_code


@pytest.mark.timeout(120)
async def test_three_replicas_ten_tenants_five_destinations_fetch_fifty_tokens(
    ds: Downstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    text = fleet_config(
        {d: ds.url(d) for d in DESTS},
        cap=10,
        limits=limits_section(3),
        auth=dict.fromkeys(DESTS, TENANTS),
        token_urls={d: ds.token_url(d) for d in DESTS},
    )
    env = env_for(redis_server)
    with ExitStack() as stack:
        svcs = [
            stack.enter_context(ServiceThread(write_config(tmp_path, text, f"r{i}.toml"), env))
            for i in range(3)
        ]
        clients = [
            httpx.AsyncClient(
                base_url=s.url, headers={"Authorization": f"Bearer {AGENT_A_TOKEN}"}, timeout=30
            )
            for s in svcs
        ]
        try:
            # Every replica, every destination, every tenant, twice, all at once.
            jobs = [
                call(c, d, t) for c in clients for d in DESTS for t in TENANTS for _ in range(2)
            ]
            statuses = await asyncio.wait_for(asyncio.gather(*jobs), 90)
            assert statuses == [200] * 300
            fetched = {d: ds.stats(d).token_requests for d in DESTS}
            assert fetched == dict.fromkeys(DESTS, 10), fetched
            assert sum(fetched.values()) == 50  # not 150
            fleets = [s.app.config.limit for s in svcs]
            assert all(isinstance(f, RedisFleet) and f.tokens is not None for f in fleets)
            shared = sum(f.tokens.shared_total for f in fleets)  # type: ignore[union-attr]
            assert shared == 100  # the other two replicas took each token from Redis

            # Redis holds the copies encrypted, under names that reveal no tenant.
            r = redis_server.client()
            keys = [k.decode() for k in r.keys("toolpool:*")]
            token_keys = [k for k in keys if ":token:" in k]
            assert len(token_keys) == 50
            assert not any("tenant-" in k for k in keys), keys
            for k in token_keys:
                blob = r.hget(k, "ct")
                assert blob is not None
                assert b"Bearer" not in blob and b'"v"' not in blob
            r.close()

            # A 401 (tokens revoked at the server) replaces the fleet's copy once: the first
            # replica fetches, the others find the new copy in Redis.
            assert ds.revoke_tokens("s0", tenant="tenant-0") >= 1
            for c in clients:
                assert await call(c, "s0", "tenant-0") == 200
            assert ds.stats("s0").token_requests == 11
            assert ds.stats("s0").http_401 == 3  # each replica met the revoked token once
        finally:
            for c in clients:
                await c.aclose()


@pytest.mark.timeout(60)
async def test_without_a_fleet_key_each_replica_fetches_its_own(
    ds: Downstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    text = fleet_config(
        {"s0": ds.url("s0")},
        cap=10,
        limits=limits_section(2),
        auth={"s0": TENANTS[:2]},
        token_urls={"s0": ds.token_url("s0")},
    )
    env = env_for(redis_server)
    del env["TOOLPOOL_FLEET_KEY"]
    with ExitStack() as stack:
        svcs = [
            stack.enter_context(ServiceThread(write_config(tmp_path, text, f"r{i}.toml"), env))
            for i in range(2)
        ]
        for s in svcs:
            async with httpx.AsyncClient(
                base_url=s.url, headers={"Authorization": f"Bearer {AGENT_A_TOKEN}"}
            ) as c:
                assert [await call(c, "s0", t) for t in TENANTS[:2]] == [200, 200]
    assert ds.stats("s0").token_requests == 4
