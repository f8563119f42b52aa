"""The seed's storm, on real loopback servers: a downstream that answers 503 above 30
concurrent requests never sees more than it allows, calls beyond the queue bound are refused
locally with PoolSaturated, and a 10x burst through `pool.admit` completes without a dropped
call and without exceeding max_connections."""

from __future__ import annotations

import asyncio
import threading

import httpx

import toolpool
from tests._support.resilience_probes import eventually, policy_of
from toolpool.resilience import Saturation
from toolpool.testing import Downstream, ServiceSpec

# Long enough that every call of a burst has started before the first one is answered, so
# the numbers below are exact (starting 500 calls takes well under 0.3 s here).
SLOW = 1.0


async def test_500_simultaneous_calls_against_a_limit_of_30_see_no_503() -> None:
    spec = ServiceSpec(require_auth=False, concurrency_limit=30, service_time=SLOW)
    async with Downstream({"crm": spec}) as ds:
        dest = toolpool.Destination("crm", ds.url("crm"), max_connections=30)
        async with toolpool.Pool([dest], warmup=0) as pool:
            # The 60 queued calls wait up to two service times (2 s) plus however slow the
            # machine is: the pool's wait limit (30 s), not httpx's 5 s pool timeout.
            client = pool.client(timeout=httpx.Timeout(30.0, pool=None))
            results = await asyncio.gather(
                *[client.get(ds.url("crm") + "/anything") for _ in range(500)],
                return_exceptions=True,
            )
            ok = [r for r in results if isinstance(r, httpx.Response)]
            refused = [r for r in results if isinstance(r, toolpool.PoolSaturated)]
            assert len(ok) + len(refused) == 500, [r for r in results if r not in ok + refused]
            # 30 in flight + 60 queued (queue_factor 2); everything beyond refused at once.
            assert len(ok) == 90
            assert {r.status_code for r in ok} == {200}
            assert {e.reason for e in refused} == {"queue_full"}
            assert all(e.retry_after > 0 for e in refused)
            assert policy_of(pool, "crm").stats().rejections_total["queue_full"] == 410
            assert pool.stats()["crm"].saturated_total == 410
        server = ds.stats("crm")
        assert server.http_503 == 0
        assert server.rejected_over_limit == 0
        assert server.peak_requests_in_progress <= 30
        assert server.peak_connections <= 30
        assert server.requests_total == 90


def test_the_same_storm_from_threads() -> None:
    spec = ServiceSpec(require_auth=False, concurrency_limit=10, service_time=SLOW)
    with Downstream({"crm": spec}) as ds:
        dest = toolpool.Destination("crm", ds.url("crm"), max_connections=10)
        with toolpool.Pool([dest], warmup=0) as pool, pool.sync_client() as client:
            results: list[object] = []
            lock = threading.Lock()
            start = threading.Barrier(100)

            def call() -> None:
                start.wait()
                try:
                    outcome: object = client.get(ds.url("crm") + "/anything").status_code
                except toolpool.PoolSaturated as exc:
                    outcome = exc
                with lock:
                    results.append(outcome)

            threads = [threading.Thread(target=call) for _ in range(100)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
        # 10 in flight + 20 queued, the rest refused at once: 30 and 70 when the 100 threads
        # run together. On a busy machine a thread may start only after the first answers
        # (1 s) freed room, and then it is served: so the invariant is that each refusal
        # found the connections and the queue full, and the server never saw more than 10.
        assert len(results) == 100
        refused = [r for r in results if isinstance(r, toolpool.PoolSaturated)]
        served = [r for r in results if not isinstance(r, toolpool.PoolSaturated)]
        assert served == [200] * len(served) and 30 <= len(served) < 100
        for exc in refused:
            assert exc.reason == "queue_full"
            assert exc.in_use + exc.opening + exc.closing == exc.max_connections == 10, exc
            assert exc.waiting >= exc.queue_limit == 20, exc
        server = ds.stats("crm")
        assert (server.http_503, server.peak_connections <= 10) == (0, True)
        assert server.requests_total == len(served)


async def test_a_10x_burst_through_admit_drops_nothing() -> None:
    """A pool sized for 10 concurrent calls takes 100 at once: the ones that do not fit wait
    in admit (backpressure) instead of failing, and the downstream never sees more than 10
    connections."""
    spec = ServiceSpec(require_auth=False, service_time=0.1)
    async with Downstream({"crm": spec}) as ds:
        url = ds.url("crm") + "/anything"
        dest = toolpool.Destination("crm", ds.url("crm"), max_connections=10)
        async with toolpool.Pool([dest], warmup=0) as pool:
            client = pool.client()
            changes: list[Saturation] = []
            pool.on_saturation(changes.append)

            async def tool_call() -> int:
                async with pool.admit("crm", timeout=30):
                    return (await client.get(url)).status_code

            # Steady load: what the pool is sized for.
            assert await asyncio.gather(*[tool_call() for _ in range(10)]) == [200] * 10
            # The burst.
            statuses = await asyncio.gather(*[tool_call() for _ in range(100)])
            assert statuses == [200] * 100
            stats = policy_of(pool, "crm").stats()
            # 10 connections + 20 queued were admitted at once; the rest waited their turn.
            assert stats.admission_waits_total >= 60
            assert sum(stats.rejections_total.values()) == 0
            assert pool.stats()["crm"].saturated_total == 0
            assert pool.stats()["crm"].timeouts_total == 0
            states = [c.state for c in changes]
            assert "saturated" in states
            await eventually(lambda: changes[-1].state == "ok", "the burst's end is announced")
            assert changes[-1].queued == 0
            assert changes[-1].utilization < 0.6  # busy_at 0.8 minus the hysteresis
        server = ds.stats("crm")
        assert server.requests_total == 110
        assert server.peak_connections <= 10
        assert server.peak_requests_in_progress <= 10


def test_a_burst_of_threads_through_admit_sync_drops_nothing() -> None:
    spec = ServiceSpec(require_auth=False, service_time=0.05)
    with Downstream({"crm": spec}) as ds:
        url = ds.url("crm") + "/anything"
        dest = toolpool.Destination("crm", ds.url("crm"), max_connections=4)
        with toolpool.Pool([dest], warmup=0) as pool, pool.sync_client() as client:
            statuses: list[int] = []
            lock = threading.Lock()

            def tool_call() -> None:
                with pool.admit_sync("crm", timeout=30):
                    status = client.get(url).status_code
                with lock:
                    statuses.append(status)

            threads = [threading.Thread(target=tool_call) for _ in range(40)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert statuses == [200] * 40
            stats = policy_of(pool, "crm").stats()
            assert stats.admitted_total == 40
            assert stats.admission_waits_total > 0
            assert sum(stats.rejections_total.values()) == 0
        assert ds.stats("crm").peak_connections <= 4
