"""Policy configuration: defaults and their inheritance (pool-wide, per destination, off,
none), validation with messages that say what to change, the stats names exporters read,
and no secret in any message."""

from __future__ import annotations

import dataclasses

import pytest

import toolpool
from tests._support.resilience_probes import policy_of
from toolpool.resilience import (
    DEFAULT_POLICY,
    AdaptiveLimit,
    CircuitBreaker,
    Policy,
    PolicyRuntime,
    RateLimit,
    Retry,
)
from toolpool.testing import Downstream


def test_defaults() -> None:
    policy = Policy()
    assert policy == DEFAULT_POLICY
    assert policy.retry == Retry()
    assert (policy.retry.attempts, policy.retry.budget_ratio, policy.retry.budget_floor) == (
        3,
        0.2,
        10,
    )
    assert policy.breaker == CircuitBreaker()
    assert policy.rate_limit is None
    assert policy.adaptive == AdaptiveLimit()
    assert policy.adaptive.latency_tolerance is None  # latency reaction is opt-in
    assert (policy.max_wait, policy.max_pause, policy.busy_at) == (5.0, 30.0, 0.8)
    off = Policy.off()
    assert (off.retry, off.breaker, off.rate_limit, off.adaptive) == (None, None, None, None)
    hash(policy)  # frozen and hashable: shareable between destinations and pools
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_wait = 1.0  # type: ignore[misc]


def test_every_destination_gets_the_pool_policy_unless_it_names_its_own(ds: Downstream) -> None:
    own = Policy(retry=Retry(attempts=5))
    pool = toolpool.Pool(
        [
            toolpool.Destination("crm", ds.url("crm")),
            toolpool.Destination("search", ds.url("search"), policy=own),
        ]
    )
    assert policy_of(pool, "crm").policy is DEFAULT_POLICY
    assert policy_of(pool, "search").policy is own
    # Two destinations with one Policy each get their own run-time state.
    shared = Policy()
    other = toolpool.Pool(
        [
            toolpool.Destination("crm", ds.url("crm"), policy=shared),
            toolpool.Destination("search", ds.url("search"), policy=shared),
        ]
    )
    assert policy_of(other, "crm") is not policy_of(other, "search")
    # A pool-wide policy, also for origins pooled on demand.
    wide = Policy(adaptive=AdaptiveLimit(latency_tolerance=3.0))
    with toolpool.Pool(policy=wide) as on_demand:
        assert on_demand.sync_client().get(ds.url("crm") + "/anything").status_code == 200
        assert policy_of(on_demand, ds.url("crm")).policy is wide
    pool.close()
    other.close()


def test_no_policy_means_no_layer(ds: Downstream) -> None:
    with toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))], policy=None) as pool:
        dest = pool.destination("crm")
        assert dest.policy is None
        assert dest.async_send is dest.base_async_send
        assert pool.sync_client().get(ds.url("crm") + "/status/503").status_code == 503
    assert ds.stats("crm").requests_total == 1  # not retried


def test_a_pool_policy_must_be_a_policy() -> None:
    with pytest.raises(toolpool.ConfigError, match=r"must be a toolpool\.resilience\.Policy"):
        toolpool.Pool(policy="retry please")


def test_a_policy_binds_once(ds: Downstream) -> None:
    pool = toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))])
    dest = pool.destination("crm")
    assert isinstance(dest.policy, PolicyRuntime)
    with pytest.raises(toolpool.ConfigError, match="already has a resilience policy"):
        dest.add_layer(PolicyRuntime(Policy(), dest))
    pool.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Policy(retry="3"), "Policy.retry must be a toolpool.resilience.Retry"),
        (lambda: Policy(max_wait=-1), "max_wait must be finite and >= 0"),
        (lambda: Policy(busy_at=0), "busy_at must be a fraction"),
        (lambda: Retry(attempts=0), "attempts must be a whole number >= 1"),
        (lambda: Retry(budget_ratio=-0.1), "budget_ratio"),
        (lambda: Retry(backoff=float("inf")), "backoff must be a finite number"),
        (lambda: RateLimit(rate=-5), "rate must be > 0"),
        (lambda: CircuitBreaker(probes=0), "probes must be a whole number >= 1"),
        (lambda: AdaptiveLimit(interval=0), "interval must be a finite number"),
    ],
)
def test_invalid_configuration_says_what_to_change(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


def test_the_stats_carry_the_names_exporters_read(ds: Downstream) -> None:
    from toolpool.metrics._readings import read_policy

    with toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))]) as pool:
        client = pool.sync_client()
        ds.set_fault("crm", "status", count=1, status=503)
        assert client.get(ds.url("crm") + "/anything").status_code == 200
        runtime = policy_of(pool, "crm")
        stats = runtime.stats()
        assert stats.retries_total == {"http_503": 1}
        assert stats.breaker_state == "closed"
        assert set(stats.rejections_total) == {
            "queue_full",
            "timeout",
            "breaker_open",
            "rate_limited",
        }
        assert stats.limit_reason == "http_503" and stats.effective_limit < stats.max_connections
        reading = read_policy(runtime)
        assert reading is not None
        assert reading.retries == {"http_503": 1}
        assert reading.breaker_state == "closed"
        assert reading.limit_reason == "http_503"


async def test_no_secret_in_refusals_or_stats(ds: Downstream) -> None:
    secret = "sk-live-DO-NOT-LEAK"
    ctx = toolpool.AuthContext(tenant="acme", credentials={"api_key": secret})
    policy = Policy(retry=None, breaker=CircuitBreaker(consecutive_failures=1), max_wait=0)
    dest = toolpool.Destination("crm", ds.url("crm"), policy=policy)
    async with toolpool.Pool([dest], warmup=0) as pool:
        client = pool.client()
        with toolpool.auth_context(ctx):
            await client.get(ds.url("crm") + "/status/503")
            with pytest.raises(toolpool.DestinationUnavailable) as unavailable:
                await client.get(ds.url("crm") + "/anything")
        with pytest.raises(toolpool.PoolSaturated) as refused:
            async with pool.admit("crm"):
                pass
        runtime = policy_of(pool, "crm")
        texts = [str(unavailable.value), str(refused.value), repr(runtime.stats()), repr(runtime)]
        texts.append(repr(pool.saturation("crm")))
        assert all(secret not in text for text in texts)
