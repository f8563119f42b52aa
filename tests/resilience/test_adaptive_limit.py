"""The adaptive connection limit on a real downstream (in its own process): it drops when the
downstream slows down or answers 503, admitted calls keep a bounded p99 while it is low, and
it recovers step by step afterwards."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import eventually, policy_of, quantile
from toolpool.resilience import AdaptiveLimit, Policy
from toolpool.testing import ServiceSpec, spawn_downstream

SERVICE = 0.02  # normal service time
SLOW = 0.2  # added when the downstream slows down: 11x the normal time


async def test_the_limit_drops_when_the_downstream_slows_and_recovers_after() -> None:
    with spawn_downstream({"api": ServiceSpec(require_auth=False, service_time=SERVICE)}) as ds:
        adaptive = AdaptiveLimit(latency_tolerance=2.0, interval=0.2, min_samples=5)
        policy = Policy(retry=None, breaker=None, adaptive=adaptive)
        dest = toolpool.Destination("api", ds.url("api"), max_connections=16, policy=policy)
        async with toolpool.Pool([dest], warmup=0) as pool:
            client = pool.client(timeout=httpx.Timeout(30.0, pool=None))
            url = ds.url("api") + "/anything"
            runtime = policy_of(pool, "api")
            phase = "normal"
            done: list[tuple[str, float]] = []  # (phase when admitted, seconds to complete)
            refused: Counter[str] = Counter()
            lowest = [runtime.effective_limit]

            async def tool_call() -> None:
                try:
                    async with pool.admit("api", timeout=0):  # shed load rather than queue
                        admitted_in, started = phase, time.monotonic()
                        assert (await client.get(url)).status_code == 200
                        done.append((admitted_in, time.monotonic() - started))
                except toolpool.PoolSaturated:
                    refused[phase] += 1
                lowest[0] = min(lowest[0], runtime.effective_limit)

            calls: set[asyncio.Task[None]] = set()
            arriving = True

            async def arrivals() -> None:
                # An open loop: about 180 calls per second whatever happens downstream, more
                # than the slowed-down destination can serve at 16 connections (73/s).
                while arriving:
                    task = asyncio.ensure_future(tool_call())
                    calls.add(task)
                    task.add_done_callback(calls.discard)
                    await asyncio.sleep(0.005)

            def count(name: str) -> int:
                return sum(1 for p, _ in done if p == name)

            source = asyncio.ensure_future(arrivals())
            await eventually(lambda: count("normal") >= 200, "normal traffic")

            ds.set_fault("api", "slow", delay=SLOW)
            phase = "slowing"
            await eventually(lambda: runtime.effective_limit <= 8, "the limit drops", timeout=20)
            assert runtime.limit_reason == "latency"
            # Calls admitted from now on, with the limit low: their latency is bounded by
            # the queue bound, which shrinks with the limit (3 service times at queue_factor
            # 2, 0.66 s; more for calls admitted just before the limit fell further: 1.1 s
            # measured), however long the overload lasts.
            phase = "slow"
            await eventually(lambda: count("slow") >= 60, "slow traffic", timeout=30)
            p99 = quantile([s for p, s in done if p == "slow"], 0.99)
            assert p99 <= 2.0, p99
            assert refused["slow"] > 0  # the overload was real: excess calls were shed

            ds.clear_faults("api")
            phase = "recovered"
            await eventually(
                lambda: runtime.effective_limit == 16, "the limit recovers", timeout=30
            )
            assert runtime.limit_reason == "recovery"
            arriving = False
            await source
            await asyncio.gather(*list(calls))
            stats = runtime.stats()
            assert stats.limit_decreases_total >= 3
            assert stats.limit_increases_total >= 16 - lowest[0]
            assert pool.stats()["api"].saturated_total == 0  # admission shed, the pool never
            assert (
                pool.stats()["api"].closed_total["limit"] > 0
            )  # connections returned over the limit were closed


async def run_against_a_limit_of_8(policy: Policy, calls: int) -> tuple[list[int], Any]:
    """16 callers against a downstream that answers 503 above 8 concurrent requests, with a
    pool that allows 16 connections (a wrong documented limit). A caller that gets a 503
    backs off 50 ms."""
    spec = ServiceSpec(require_auth=False, service_time=0.05, concurrency_limit=8)
    with spawn_downstream({"api": spec}) as ds:
        dest = toolpool.Destination("api", ds.url("api"), max_connections=16, policy=policy)
        async with toolpool.Pool([dest], warmup=0) as pool:
            client = pool.client()
            url = ds.url("api") + "/anything"
            statuses: list[int] = []

            async def worker() -> None:
                while len(statuses) < calls:
                    status = (await client.get(url)).status_code
                    statuses.append(status)
                    if status == 503:
                        await asyncio.sleep(0.05)

            await asyncio.gather(*[worker() for _ in range(16)])
            return statuses, policy_of(pool, "api").stats()


async def test_503s_from_an_overloaded_downstream_lower_the_limit() -> None:
    """The 503s teach the pool to stay near 8: after the first round, probing one step too
    high costs a single 503 each time."""
    statuses, stats = await run_against_a_limit_of_8(Policy(retry=None, breaker=None), 600)
    late = statuses[-300:].count(503) / 300
    assert late < 0.05, late
    assert statuses.count(503) / len(statuses) < 0.10
    assert stats.limit_decreases_total >= 3
    assert 6 <= stats.effective_limit <= 9
    assert stats.limit_reason in ("http_503", "recovery")
    # The counterfactual: without the adaptive limit, half the requests are refused.
    policy = Policy(retry=None, breaker=None, adaptive=None)
    statuses, stats = await run_against_a_limit_of_8(policy, 300)
    assert statuses.count(503) / len(statuses) > 0.3
    assert stats.effective_limit == 16


async def test_a_callers_own_short_timeout_does_not_lower_the_limit(ds: Any) -> None:
    """Issue 20: `timeout=0.2` on a 1 s completion is the caller's deadline, not overload;
    everyone else keeps the full limit. A 503 still lowers it (the control)."""
    dest = toolpool.Destination("crm", ds.url("crm"), max_connections=20)
    async with toolpool.Pool([dest], warmup=0) as pool:
        runtime = policy_of(pool, "crm")
        client = pool.client()
        url = ds.url("crm")
        for _ in range(6):
            with pytest.raises(httpx.ReadTimeout):
                await client.get(url + "/delay?s=1", timeout=0.2)
        assert runtime.effective_limit == 20
        assert runtime.limit_reason == "initial"
        # A connect timeout the caller chose below the pool's connect_timeout is its own too.
        assert runtime.stats().limit_decreases_total == 0
        r = await client.get(url + "/status/503")
        assert r.status_code == 503
        assert runtime.effective_limit < 20 and runtime.limit_reason == "http_503"
