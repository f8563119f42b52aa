"""Retries on a real downstream: what is retried (idempotent requests, connects that never
sent anything) and what is not, the retry budget against a downstream that always fails,
Retry-After honoured (and bounded), pauses for everyone and per tenant."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import eventually, policy_of
from toolpool.resilience import Policy, Retry
from toolpool.testing import Downstream, ServiceSpec

FAST_RETRY = Retry(backoff=0.001, max_backoff=0.002)


def pool_for(ds: Downstream, policy: Policy, **kwargs: object) -> toolpool.Pool:
    dest = toolpool.Destination("crm", ds.url("crm"), policy=policy, **kwargs)  # type: ignore[arg-type]
    return toolpool.Pool([dest], warmup=0)


async def test_idempotent_requests_are_retried_on_503_and_posts_are_not(ds: Downstream) -> None:
    policy = Policy(retry=FAST_RETRY, breaker=None, adaptive=None)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        ds.set_fault("crm", "status", count=1, status=503)
        r = await client.get(ds.url("crm") + "/anything")
        assert r.status_code == 200
        assert ds.stats("crm").requests_total == 2
        ds.reset_stats()
        ds.set_fault("crm", "status", count=1, status=503)
        r = await client.post(ds.url("crm") + "/anything", json={"create": "invoice"})
        assert r.status_code == 503  # a POST may have been processed: returned, not resent
        assert ds.stats("crm").requests_total == 1
        ds.reset_stats()
        ds.set_fault("crm", "status", count=1, status=503)
        r = await client.post(
            ds.url("crm") + "/anything", json={"x": 1}, headers={"Idempotency-Key": "k-1"}
        )
        assert r.status_code == 200  # ...unless the server deduplicates it
        assert ds.stats("crm").requests_total == 2
        stats = policy_of(pool, "crm").stats()
        assert stats.retries_total == {"http_503": 2}


async def test_a_reset_connection_is_retried_for_get_but_not_for_post(ds: Downstream) -> None:
    policy = Policy(retry=FAST_RETRY, breaker=None, adaptive=None)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        ds.set_fault("crm", "reset", count=1)  # on a fresh connection: surfaces from the pool
        assert (await client.get(ds.url("crm") + "/anything")).status_code == 200
        # Two resets: the pool's own stale-connection retry takes the first (the POST went
        # out on a reused connection), the second reaches the policy, which must not resend.
        ds.set_fault("crm", "reset", count=2)
        with pytest.raises(httpx.TransportError):
            await client.post(ds.url("crm") + "/anything", content=b"once")
        assert policy_of(pool, "crm").stats().retries_total == {"connection_lost": 1}


async def test_a_refused_connect_is_retried_for_any_method() -> None:
    # A port that refuses connections: nothing was sent, so even a POST may try again.
    async with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        url = ds.url("crm")
    policy = Policy(retry=FAST_RETRY, breaker=None, adaptive=None)
    dest = toolpool.Destination("crm", url, policy=policy)
    async with toolpool.Pool([dest], warmup=0) as pool:
        with pytest.raises(httpx.ConnectError):
            await pool.client().post(url + "/anything", content=b"x")
        stats = policy_of(pool, "crm").stats()
        assert stats.retries_total == {"connect_error": 2}  # 3 attempts in all


async def test_streamed_bodies_are_never_retried(ds: Downstream) -> None:
    policy = Policy(retry=FAST_RETRY, breaker=None, adaptive=None)
    async with pool_for(ds, policy) as pool:

        async def body() -> object:
            yield b"one-shot"

        ds.set_fault("crm", "status", count=1, status=503)
        r = await pool.client().put(ds.url("crm") + "/anything", content=body())
        assert r.status_code == 503
        assert ds.stats("crm").requests_total == 1


@pytest.mark.parametrize("driver", ["async", "sync"])
async def test_the_retry_budget_caps_load_on_a_downstream_that_always_fails(
    ds: Downstream, driver: str
) -> None:
    """Every call wants 4 retries; the budget allows retries worth 20 % of the calls plus a
    floor of 5, so the downstream sees at most 1.2 x calls + 5 requests, not 5 x calls."""
    calls = 200
    retry = Retry(attempts=5, backoff=0.001, max_backoff=0.002, budget_ratio=0.2, budget_floor=5)
    policy = Policy(retry=retry, breaker=None, adaptive=None)
    url = ds.url("crm") + "/status/503"
    async with pool_for(ds, policy, max_connections=20) as pool:
        if driver == "async":
            client = pool.client()
            statuses = []
            for _ in range(calls // 20):
                rs = await asyncio.gather(*[client.get(url) for _ in range(20)])
                statuses += [r.status_code for r in rs]
        else:
            sync_client = pool.sync_client()

            def call(_: int) -> int:
                return sync_client.get(url).status_code

            statuses = []
            for _ in range(calls // 20):
                statuses += await asyncio.gather(*[asyncio.to_thread(call, i) for i in range(20)])
        assert statuses == [503] * calls
        stats = policy_of(pool, "crm").stats()
    sent = ds.stats("crm").requests_total
    retried = sum(stats.retries_total.values())
    assert sent == calls + retried  # every request the server saw is a call or a counted retry
    assert sent <= (1 + 0.2) * calls + 5
    assert retried >= 0.2 * calls + 5 - 1  # the budget is used, not just refused
    assert stats.retries_denied_total > 0


async def test_without_a_budget_the_same_storm_multiplies(ds: Downstream) -> None:
    """The counterfactual of the test above: with an unlimited budget every call is sent
    five times (so the budget is what held the load down there)."""
    retry = Retry(attempts=5, backoff=0.001, max_backoff=0.002, budget_ratio=100.0)
    async with pool_for(ds, Policy(retry=retry, breaker=None, adaptive=None)) as pool:
        client = pool.client()
        await asyncio.gather(*[client.get(ds.url("crm") + "/status/503") for _ in range(20)])
    assert ds.stats("crm").requests_total == 5 * 20


async def test_retry_after_is_waited_for(ds: Downstream) -> None:
    async with pool_for(ds, Policy(breaker=None, adaptive=None)) as pool:
        client = pool.client()
        ds.set_fault("crm", "status", count=1, status=503, retry_after=1)
        started = time.monotonic()
        first = asyncio.ensure_future(client.get(ds.url("crm") + "/anything"))
        # The 503 pauses the whole destination: a call made during the pause waits for its
        # end instead of reaching the downstream early.
        await eventually(lambda: pool.saturation("crm").reason == "rate_limited", "paused")
        second_started = time.monotonic()
        second = await client.get(ds.url("crm") + "/anything")
        second_elapsed = time.monotonic() - second_started
        assert (await first).status_code == 200
        assert time.monotonic() - started >= 1.0
        assert second.status_code == 200
        assert second_elapsed >= 1.0 - (second_started - started) - 0.01
        assert ds.stats("crm").requests_total == 3  # the 503, its retry, the second call
        stats = policy_of(pool, "crm").stats()
        assert stats.rate_limit_waits_total >= 1
        assert stats.retries_total == {"http_503": 1}


async def test_a_429_pauses_only_its_tenant(ds: Downstream) -> None:
    async with pool_for(ds, Policy(breaker=None, adaptive=None)) as pool:
        client = pool.client()
        acme = toolpool.AuthContext(tenant="acme")
        globex = toolpool.AuthContext(tenant="globex")
        ds.set_fault("crm", "status", count=1, status=429, retry_after=3)
        with toolpool.auth_context(acme):
            slowed = asyncio.ensure_future(client.get(ds.url("crm") + "/anything"))
        limiter = policy_of(pool, "crm").limiter
        await eventually(
            lambda: limiter.pause_end("acme", time.monotonic()) > time.monotonic(), "acme paused"
        )
        with toolpool.auth_context(globex):
            r = await client.get(ds.url("crm") + "/anything")
            assert r.status_code == 200
            # Not held by acme's pause: answered while acme is still paused (3 s).
            assert limiter.pause_end("acme", time.monotonic()) > time.monotonic()
            assert not slowed.done()
        assert (await slowed).status_code == 200


async def test_a_long_retry_after_is_returned_and_pauses_the_destination(
    ds: Downstream,
) -> None:
    policy = Policy(retry=Retry(max_retry_after=5.0), breaker=None, adaptive=None, max_wait=2.0)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        ds.set_fault("crm", "status", count=1, status=503, retry_after=20)
        started = time.monotonic()
        r = await client.get(ds.url("crm") + "/anything")
        assert r.status_code == 503  # 20 s > max_retry_after: not waited for
        assert r.headers["retry-after"] == "20"
        assert time.monotonic() - started < 1.0
        # The destination rests 20 s (> max_wait 2 s): new calls are refused at once.
        with pytest.raises(toolpool.PoolSaturated) as refused:
            await client.get(ds.url("crm") + "/anything")
        assert refused.value.reason == "rate_limited"
        assert 15 < refused.value.retry_after <= 20
        assert "rate-limited" in str(refused.value)
        assert pool.saturation("crm").state == "saturated"
        assert pool.saturation("crm").reason == "rate_limited"
    assert ds.stats("crm").requests_total == 1


async def test_retry_after_is_bounded_by_max_pause(ds: Downstream) -> None:
    policy = Policy(breaker=None, adaptive=None, max_pause=0.5, max_wait=5.0)
    async with pool_for(ds, policy) as pool:
        client = pool.client()
        ds.set_fault("crm", "status", count=1, status=503, retry_after=3600)
        sent = time.monotonic()
        r = await client.get(ds.url("crm") + "/anything")
        answered = time.monotonic()
        assert r.status_code == 503  # an hour is beyond max_retry_after too
        # The destination rests max_pause (0.5 s) from the 503, not an hour: read from the
        # limiter, so a slow machine cannot blur it. An hour would be beyond max_wait (5 s):
        # the next call would be refused at once instead of served after the rest.
        paused_until = policy_of(pool, "crm").limiter.paused_until
        assert sent + 0.5 <= paused_until <= answered + 0.5
        assert (await client.get(ds.url("crm") + "/anything")).status_code == 200
        assert time.monotonic() >= paused_until
