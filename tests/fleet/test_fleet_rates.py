"""Fleet-wide rate limits: two pools (two processes' worth) draw from one GCRA bucket in Redis,
so together they start no faster than the limit; with Redis down each falls back to
rate / replicas, which still keeps the sum within it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

import toolpool
from tests._support.pool_service import AGENT_A_TOKEN, SERVICE_ENV, ServiceThread, write_config
from tests._support.redis_fleet import RedisServer, fleet_config, limits_section
from toolpool.errors import ConfigError
from toolpool.fleet import RedisFleet
from toolpool.resilience import Policy, RateLimit
from toolpool.service import parse_config
from toolpool.testing import Downstream, ServiceSpec

RATE = 20.0


@pytest.fixture
def api() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False, service_time=0.005)}) as ds:
        yield ds


def make_pool(ds: Downstream, per_tenant: bool = False) -> toolpool.Pool:
    policy = Policy(
        retry=None,
        breaker=None,
        adaptive=None,
        rate_limit=RateLimit(rate=RATE, burst=1, per_tenant=per_tenant),
        max_wait=10.0,
    )
    return toolpool.Pool(
        [toolpool.Destination("api", ds.url("api"), max_connections=40, policy=policy)],
        warmup=0.0,
    )


async def burst(pools: list[toolpool.Pool], ds: Downstream, each: int) -> float:
    started = time.monotonic()
    url = ds.url("api") + "/anything"
    jobs = [p.request("GET", url, timeout=15) for p in pools for _ in range(each)]
    responses = await asyncio.wait_for(asyncio.gather(*jobs), 30)
    assert [r.status_code for r in responses] == [200] * len(jobs)
    return time.monotonic() - started


@pytest.mark.timeout(60)
async def test_two_pools_share_one_bucket_and_fall_back_to_half_the_rate_without_redis(
    api: Downstream, redis_server: RedisServer
) -> None:
    fleets = [RedisFleet(redis_server.url, replicas=2, env={}) for _ in range(2)]
    pools = [make_pool(api) for _ in range(2)]
    try:
        for fleet, pool in zip(fleets, pools, strict=True):
            fleet.attach(pool)
        # 40 starts at 20/s with a burst of 1 take at least 39 intervals (1.95 s); each pool's
        # own bucket would let both finish their 20 in 0.95 s.
        elapsed = await burst(pools, api, 20)
        assert elapsed >= 39 / RATE * 0.95, elapsed
        r = redis_server.client()
        assert r.exists("toolpool:default:rate:api") == 1
        r.close()
        assert all(f.rates.fallbacks_total == 0 for f in fleets)
        waits = sum(p.destination("api").policy.stats().rate_limit_waits_total for p in pools)
        assert waits >= 38

        # Redis down: each pool on its own bucket at RATE / 2: still >= 39 / RATE for 20 each.
        redis_server.stop()
        elapsed = await burst(pools, api, 20)
        assert elapsed >= 19 / (RATE / 2) * 0.95, elapsed
        assert all(f.rates.fallbacks_total > 0 for f in fleets)
        assert not any(f.coordinator.up for f in fleets)
    finally:
        for pool in pools:
            await pool.aclose()
        for fleet in fleets:
            await fleet.aclose()


@pytest.mark.timeout(60)
async def test_per_tenant_buckets_are_separate(api: Downstream, redis_server: RedisServer) -> None:
    fleet = RedisFleet(redis_server.url, replicas=1, env={})
    pool = make_pool(api, per_tenant=True)
    fleet.attach(pool)
    try:
        url = api.url("api") + "/anything"

        async def tenant_calls(tenant: str) -> None:
            with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                for _ in range(3):
                    assert (await pool.request("GET", url)).status_code == 200

        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(tenant_calls(f"t{i}") for i in range(4))), 20)
        elapsed = time.monotonic() - started
        # Three starts per tenant take two intervals; tenants do not wait for each other.
        assert elapsed >= 2 / RATE * 0.95
        r = redis_server.client()
        assert len(r.keys("toolpool:default:rate:api:t:*")) == 4
        r.close()
    finally:
        await pool.aclose()
        await fleet.aclose()


def test_config_provider_redis_needs_the_url_variable(tmp_path: Path) -> None:
    text = """
[limits]
provider = "redis"
url_env = "MY_REDIS_URL"
replicas = 3

[destinations.api]
url = "http://127.0.0.1:9/"

[agents.a]
token_sha256 = "%s"
tenants = ["*"]
""" % ("0" * 64)
    with pytest.raises(ConfigError, match=r"MY_REDIS_URL.*not set.*redis://"):
        parse_config(text, env={})
    config = parse_config(text, env={"MY_REDIS_URL": "redis://:pw@127.0.0.1:6390/0"})
    limit = config.limit
    assert isinstance(limit, RedisFleet)
    assert limit.replicas == 3 and limit.tokens is None  # no fleet key: tokens not shared
    assert "pw" not in repr(limit)
    with pytest.raises(ConfigError, match="lease_ttl"):
        parse_config(text.replace("replicas = 3", "replicas = 3\nlease_ttl = 0.5"),
                     env={"MY_REDIS_URL": "redis://127.0.0.1:6390/0"})  # fmt: skip
    with pytest.raises(ConfigError, match="32 characters"):
        parse_config(text, env={"MY_REDIS_URL": "redis://h/0", "TOOLPOOL_FLEET_KEY": "short"})


@pytest.mark.timeout(90)
async def test_service_replicas_share_a_configured_rate_limit(
    api: Downstream, redis_server: RedisServer, tmp_path: Path
) -> None:
    limits = limits_section(2) + "\n[limits.rate_limits.api]\nrate = 10\nburst = 1\n"
    text = fleet_config({"api": api.url("api")}, cap=20, limits=limits)
    env = {**SERVICE_ENV, "TOOLPOOL_REDIS_URL": redis_server.url}
    headers = {"Authorization": f"Bearer {AGENT_A_TOKEN}", "X-Toolpool-Tenant": "acme"}
    with ExitStack() as stack:
        svcs = [
            stack.enter_context(ServiceThread(write_config(tmp_path, text, f"r{i}.toml"), env))
            for i in range(2)
        ]
        async with httpx.AsyncClient(headers=headers, timeout=20) as client:
            started = time.monotonic()
            jobs = [client.get(svcs[i % 2].url + "/d/api/anything") for i in range(20)]
            responses = await asyncio.wait_for(asyncio.gather(*jobs), 30)
            elapsed = time.monotonic() - started
    assert [r.status_code for r in responses] == [200] * 20
    # 20 starts at 10/s with a burst of 1, from two replicas: at least 19 intervals (1.9 s);
    # each replica on its own would finish its 10 in 0.9 s.
    assert elapsed >= 19 / 10 * 0.95, elapsed


def test_rate_limits_config_errors() -> None:
    with pytest.raises(ConfigError, match="takes rate"):
        RedisFleet("redis://127.0.0.1:9/0", rate_limits={"api": {"rat": 5}}, env={})
    with pytest.raises(ConfigError, match="rate must be > 0"):
        RedisFleet("redis://127.0.0.1:9/0", rate_limits={"api": {"rate": 0}}, env={})
