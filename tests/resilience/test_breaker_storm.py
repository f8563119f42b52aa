"""A destination goes down: its breaker opens and its calls fail fast (no connection is
even tried), another destination keeps its throughput, and when the downstream returns the
breaker half-opens, a probe succeeds, and calls flow again.

The downstream runs in its own process (spawn_downstream) so that the servers' work does not
share this process's interpreter with the throughput being measured.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import eventually, policy_of
from toolpool.resilience import CircuitBreaker, Policy
from toolpool.resilience._breaker import CLOSED, HALF_OPEN, OPEN
from toolpool.testing import ServiceSpec, spawn_downstream


async def search_batch(client: httpx.AsyncClient, url: str, calls: int = 200) -> float:
    """Run `calls` searches, 10 at a time; returns calls per second. Every one must succeed."""
    queue = list(range(calls))

    async def worker() -> None:
        while queue:
            queue.pop()
            assert (await client.get(url)).status_code == 200

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(10)])
    return calls / (time.perf_counter() - started)


async def test_a_down_destination_fails_fast_and_recovers_while_another_keeps_its_pace() -> None:
    specs = {
        "crm": ServiceSpec(require_auth=False),
        "search": ServiceSpec(require_auth=False, service_time=0.05),
    }
    with spawn_downstream(specs) as ds:
        breaker = CircuitBreaker(consecutive_failures=5, open_for=1.0, max_open_for=2.0)
        crm = toolpool.Destination("crm", ds.url("crm"), policy=Policy(breaker=breaker))
        search = toolpool.Destination("search", ds.url("search"), max_connections=10)
        async with toolpool.Pool([crm, search], warmup=0) as pool:
            client = pool.client()
            crm_url, search_url = ds.url("crm") + "/anything", ds.url("search") + "/anything"
            runtime = policy_of(pool, "crm")
            assert (await client.get(crm_url)).status_code == 200
            before = await search_batch(client, search_url)

            ds.set_fault("crm", "down")
            failures = 0
            for _ in range(20):
                try:
                    await client.get(crm_url)
                except toolpool.DestinationUnavailable:
                    break
                except httpx.TransportError:
                    failures += 1
            else:
                pytest.fail("the breaker never opened")
            assert runtime.breaker is not None
            assert runtime.breaker.state == OPEN
            assert failures <= 2  # each failed call made 3 attempts; 5 failures open it
            assert "5 consecutive failures" in runtime.breaker.reason

            # While open: calls fail fast, and not a single connection is tried.
            accepted = ds.stats("crm").connections_accepted
            durations = []
            for _ in range(100):
                started = time.perf_counter()
                with pytest.raises(toolpool.DestinationUnavailable) as unavailable:
                    await client.get(crm_url)
                durations.append(time.perf_counter() - started)
            assert runtime.breaker.transitions[HALF_OPEN] == 0, "rested past open_for"
            assert statistics.median(durations) < 0.005
            assert 0 < unavailable.value.retry_after <= 1.0
            assert ds.stats("crm").connections_accepted == accepted
            with pytest.raises(toolpool.DestinationUnavailable):
                await asyncio.to_thread(pool.sync_client().get, crm_url)

            # Another destination keeps its throughput while crm's callers keep hammering.
            hammering = True

            async def hammer() -> None:
                while hammering:
                    try:
                        await client.get(crm_url)
                    except httpx.TransportError:  # DestinationUnavailable, or a failed probe
                        pass
                    await asyncio.sleep(0.002)

            hammers = [asyncio.ensure_future(hammer()) for _ in range(10)]
            during = await search_batch(client, search_url)
            assert during >= 0.5 * before, (before, during)

            # The downstream returns: a probe gets through and the breaker closes.
            ds.clear_faults("crm")
            await eventually(
                lambda: runtime.breaker is not None and runtime.breaker.state == CLOSED,
                "the breaker closed after a successful probe",
                timeout=20,
            )
            hammering = False
            await asyncio.gather(*hammers)
            assert (await client.get(crm_url)).status_code == 200
            transitions = runtime.breaker.transitions
            assert transitions[OPEN] >= 1 and transitions[HALF_OPEN] >= 1
            assert transitions[CLOSED] == 1
            assert pool.stats()["search"].saturated_total == 0
            stats = runtime.stats()
            assert stats.breaker_state == "closed"
            assert stats.breaker_rejections_total >= 100
