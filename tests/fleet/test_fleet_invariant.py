"""The lease invariant under random load, a Redis restart and a vanished replica: four fleet
members on one event loop (so their permits in use can be summed exactly at every grant)
never hold more than the cap between them."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests._support.redis_fleet import RedisServer
from tests._support.resilience_probes import eventually
from toolpool.errors import ConfigError, PoolSaturated
from toolpool.fleet import RedisFleet

CAP = 10


@pytest.mark.timeout(90)
async def test_permits_in_use_never_exceed_the_cap(redis_server: RedisServer) -> None:
    rng = random.Random(21)
    fleets = [
        RedisFleet(
            redis_server.url,
            replicas=4,
            lease_ttl=1.0,
            renew_interval=0.15,
            busy_interval=0.05,
            op_timeout=0.2,
            max_wait=30.0,
            env={},
        )
        for _ in range(4)
    ]
    for f in fleets:
        assert f.replica_cap("api", CAP) == CAP
        await f.start()
    granted = 0
    peak = 0
    active = [True] * 4
    load = [8, 2, 1, 1]

    def in_use() -> int:
        return sum(f.shares()["api"]["in_use"] for f in fleets)

    async def worker(i: int, k: int) -> None:
        nonlocal granted, peak
        while active[i]:
            if k >= load[i]:
                await asyncio.sleep(0.02)
                continue
            async with fleets[i].hold("api", "t"):
                total = in_use()
                assert total <= CAP, [f.shares()["api"] for f in fleets]
                peak = max(peak, total)
                granted += 1
                await asyncio.sleep(rng.uniform(0.0, 0.02))

    tasks = [asyncio.create_task(worker(i, k)) for i in range(4) for k in range(12)]
    try:
        for _ in range(6):  # demand moves between members
            load[:] = [rng.randint(0, 12) for _ in range(4)]
            await asyncio.sleep(0.6)
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
        redis_server.stop()  # through the outage: last leases, nothing, static shares
        await eventually(
            lambda: all(f.shares()["api"]["mode"] == "static" for f in fleets),
            "every member on its static share once its lease expired with Redis down",
        )
        redis_server.start()
        for _ in range(4):
            load[:] = [rng.randint(0, 12) for _ in range(4)]
            await asyncio.sleep(0.6)
        await eventually(
            lambda: all(f.coordinator.up and f.shares()["api"]["mode"] == "lease" for f in fleets),
            "every member back on a lease after Redis restarted",
        )
        # A member vanishes without giving anything back (as after SIGKILL): it stops renewing
        # (a cancelled task alone is not enough on Python 3.11, where wait_for can swallow the
        # cancellation).
        active[3] = False
        fleets[3]._closed = True
        task = fleets[3]._task
        assert task is not None
        task.cancel()
        await asyncio.wait([task], timeout=10)
        assert task.done()
        load[:] = [12, 12, 12, 0]
        # Equal demand: the targets split the whole cap (4 + 3 + 3) and the leases reach them.
        await eventually(
            lambda: sorted(f.shares()["api"]["limit"] for f in fleets[:3]) == [3, 3, 4],
            "the vanished member's capacity leased to the others, split by demand",
        )
        assert not any(t.done() for t in tasks[:36]), [t.exception() for t in tasks if t.done()]
    finally:
        active[:] = [False] * 4
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
        for f in fleets:
            await f.aclose()
    for t in tasks:
        assert t.exception() is None if not t.cancelled() else True
    assert granted > 500 and peak == CAP


@pytest.mark.timeout(30)
async def test_queue_factor_bounds_the_requests_waiting_for_a_fleet_permit(
    redis_server: RedisServer,
) -> None:
    with pytest.raises(ConfigError, match="queue_factor"):
        RedisFleet(redis_server.url, queue_factor=-1, env={})
    fleet = RedisFleet(redis_server.url, queue_factor=0.5, max_wait=20.0, env={})
    fleet.replica_cap("api", 4)
    await fleet.start()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def call() -> None:
        async with fleet.hold("api", "t"):
            entered.set()
            await release.wait()

    try:
        # As one pool of 4 with a queue of 0.5 × 4: six in use or waiting, the seventh refused
        tasks = [asyncio.create_task(call()) for _ in range(6)]
        await eventually(
            lambda: sum(fleet.shares()["api"][k] for k in ("in_use", "waiting")) == 6,
            "six requests in use or waiting",
        )
        with pytest.raises(PoolSaturated) as info:
            await call()
        assert info.value.reason == "queue_full"
        release.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        assert entered.is_set()
    finally:
        release.set()
        await fleet.aclose()
