"""Rate limits on a real downstream: the pool waits for a start instead of sending a request
that would be rejected, refuses (rate_limited) when the wait would exceed max_wait, keeps
tenants apart, and admits no more calls than the limit can start within max_wait."""

from __future__ import annotations

import asyncio
import time

import pytest

import toolpool
from tests._support.resilience_probes import policy_of
from toolpool.resilience import Policy, RateLimit
from toolpool.testing import Downstream


def pool_for(ds: Downstream, policy: Policy) -> toolpool.Pool:
    dest = toolpool.Destination("crm", ds.url("crm"), policy=policy)
    return toolpool.Pool([dest], warmup=0)


async def test_requests_wait_for_their_start(ds: Downstream) -> None:
    policy = Policy(rate_limit=RateLimit(rate=20, burst=2))
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        started = time.monotonic()
        rs = await asyncio.gather(*[client.get(ds.url("crm") + "/anything") for _ in range(30)])
        elapsed = time.monotonic() - started
        assert [r.status_code for r in rs] == [200] * 30
        assert elapsed >= (30 - 2) / 20 - 0.01  # 2 at once, then one every 50 ms
        stats = policy_of(pool, "crm").stats()
        assert stats.rate_limit_waits_total == 28
        assert stats.rate_limit_wait_seconds_total == pytest.approx(
            sum(i / 20 for i in range(1, 29)), rel=0.05
        )
        assert stats.rate_limited_total == 0
    assert ds.stats("crm").requests_total == 30


def test_sync_requests_wait_for_their_start(ds: Downstream) -> None:
    policy = Policy(rate_limit=RateLimit(rate=10, burst=1))
    with pool_for(ds, policy) as pool, pool.sync_client() as client:
        started = time.monotonic()
        for _ in range(4):
            assert client.get(ds.url("crm") + "/anything").status_code == 200
        assert time.monotonic() - started >= 0.3 - 0.01


async def test_a_start_beyond_max_wait_is_refused_without_sending(ds: Downstream) -> None:
    policy = Policy(rate_limit=RateLimit(rate=2, burst=1), max_wait=0.3)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        results = await asyncio.gather(
            *[client.get(ds.url("crm") + "/anything") for _ in range(3)], return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, toolpool.PoolSaturated)]
        assert len(refused) == 2
        assert {e.reason for e in refused} == {"rate_limited"}
        assert all(0.3 < e.retry_after <= 1.0 for e in refused)
        assert policy_of(pool, "crm").stats().rate_limited_total == 2
    assert ds.stats("crm").requests_total == 1  # never sent what would have been rejected


async def test_tenants_have_their_own_buckets(ds: Downstream) -> None:
    policy = Policy(rate_limit=RateLimit(rate=1, burst=1, per_tenant=True), max_wait=0.0)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        url = ds.url("crm") + "/anything"
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            assert (await client.get(url)).status_code == 200
            with pytest.raises(toolpool.PoolSaturated) as refused:
                await client.get(url)
            assert refused.value.reason == "rate_limited"
        with toolpool.auth_context(toolpool.AuthContext(tenant="globex")):
            assert (await client.get(url)).status_code == 200


async def test_admitted_calls_fit_within_the_rate_limit(ds: Downstream) -> None:
    """Admission lets in no more calls than the limit can start within max_wait
    (burst + rate x max_wait = 12), so no admitted call is refused as rate-limited."""
    policy = Policy(rate_limit=RateLimit(rate=20, burst=2), max_wait=0.5)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        assert pool.saturation("crm").state == "ok"

        async def tool_call() -> int:
            async with pool.admit("crm", timeout=30):
                return (await client.get(ds.url("crm") + "/anything")).status_code

        assert await asyncio.gather(*[tool_call() for _ in range(30)]) == [200] * 30
        stats = policy_of(pool, "crm").stats()
        assert stats.rate_limited_total == 0
        assert stats.admission_waits_total >= 30 - 12
        # With the rate limit's room used up, a call that will not wait is told why.
        blocked = [asyncio.ensure_future(tool_call()) for _ in range(12)]
        await asyncio.sleep(0)
        with pytest.raises(toolpool.PoolSaturated) as refused:
            async with pool.admit("crm", timeout=0):
                pass
        assert refused.value.reason == "rate_limited"
        assert 0 < refused.value.retry_after <= 0.6
        assert await asyncio.gather(*blocked) == [200] * 12
