"""What the metrics cost (run by hand; not a test: performance is measured, not asserted).

    .venv/bin/python benchmarks/metrics_overhead.py

1. the request-path recording added for the metrics (one `Durations.observe` per connection
   release and per connection opened);
2. the opt-in per-tenant wrapper: alone (around a no-op send) and on real loopback requests,
   against the same pool without it;
3. one scrape (`exposition()`) of a pool with 20 destinations, without and with 20 tenants.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import timeit
from functools import partial

from prometheus_client import CollectorRegistry

import toolpool
import toolpool.metrics
from toolpool._state import USE_BUCKETS, Durations
from toolpool.metrics._tenants import install
from toolpool.testing import Downstream, ServiceSpec

LABELS = toolpool.metrics.TenantLabels(salt="bench-salt-0123456789")


def bench_observe() -> None:
    hist = Durations(USE_BUCKETS)
    n = 1_000_000
    seconds = min(timeit.repeat(lambda: hist.observe(0.0123), number=n, repeat=5))
    print(f"Durations.observe: {seconds / n * 1e9:.0f} ns per observation")


async def bench_wrapper_alone() -> None:
    pool = toolpool.Pool([toolpool.Destination("crm", "http://127.0.0.1:9")])
    dest = pool.destination("crm")

    class Status:
        status_code = 200

    async def inner_ok(request: object, ctx: object) -> Status:
        return Status()

    dest.async_send = inner_ok  # type: ignore[assignment]
    install(dest, LABELS)
    ctx = toolpool.AuthContext(tenant="acme")
    wrapped = dest.async_send
    n = 200_000

    async def loop(send: object) -> float:
        started = time.perf_counter()
        for _ in range(n):
            await send(None, ctx)  # type: ignore[operator]
        return time.perf_counter() - started

    base = min([await loop(inner_ok) for _ in range(3)])
    with_wrapper = min([await loop(wrapped) for _ in range(3)])
    print(f"tenant wrapper alone: {(with_wrapper - base) / n * 1e9:.0f} ns per request")
    pool.close()


async def bench_wrapper_real(requests: int = 3000, rounds: int = 5) -> None:
    async with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        results: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(rounds):
            for mode in ("off", "on"):
                pool = toolpool.Pool(
                    [toolpool.Destination("crm", ds.url("crm"), max_connections=4)]
                )
                registry = CollectorRegistry()
                toolpool.metrics.register(pool, registry, tenants=LABELS if mode == "on" else None)
                async with pool, pool.client() as client:
                    with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                        for _ in range(200):  # warm
                            await client.get(ds.url("crm"))
                        started = time.perf_counter()
                        for _ in range(requests):
                            await client.get(ds.url("crm"))
                        results[mode].append((time.perf_counter() - started) / requests)
        off, on = statistics.median(results["off"]), statistics.median(results["on"])
        print(
            f"loopback request, median of {rounds}x{requests}: {off * 1e6:.1f} us without "
            f"tenant labels, {on * 1e6:.1f} us with ({(on - off) / off * 100:+.1f} %)"
        )


def bench_scrape() -> None:
    dests = [toolpool.Destination(f"svc{i}", f"http://127.0.0.1:{20000 + i}") for i in range(20)]
    for tenants in (None, LABELS):
        pool = toolpool.Pool(dests)
        registry = CollectorRegistry()
        collector = toolpool.metrics.register(pool, registry, tenants=tenants)
        if tenants is not None:
            # Fill the per-tenant counters as traffic of 20 tenants would.
            for counters in collector._pools[pool].counters.values():
                for t in range(20):
                    ctx = toolpool.AuthContext(tenant=f"tenant{t}")
                    counters.finish(counters.tenant(ctx), "2xx", 0.01)
        n = 200
        scrape = partial(toolpool.metrics.exposition, registry)
        seconds = min(timeit.repeat(scrape, number=n, repeat=3))
        size = len(scrape()) / 1024
        label = "with 20 tenants" if tenants else "no tenants"
        print(f"scrape of 20 destinations ({label}): {seconds / n * 1e3:.2f} ms, {size:.0f} KiB")
        pool.close()


def main() -> None:
    bench_observe()
    asyncio.run(bench_wrapper_alone())
    asyncio.run(bench_wrapper_real())
    bench_scrape()


if __name__ == "__main__":
    main()
