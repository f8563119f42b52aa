"""A replica killed with SIGKILL mid-storm: its capacity is back in use by the others (at the
server) within the lease TTL, and the cap holds at the server throughout."""

from __future__ import annotations

import asyncio
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from tests._support.pool_service import AGENT_A_TOKEN, ServiceProcess, write_config
from tests._support.redis_fleet import RedisServer, fleet_config, limits_section
from toolpool.testing import Downstream, ServiceSpec

CAP = 12
TTL = 2.0
RENEW = 0.25
HEADERS = {"Authorization": f"Bearer {AGENT_A_TOKEN}", "X-Toolpool-Tenant": "acme"}
_LIMIT = re.compile(r'^toolpool_fleet_limit\{destination="api",mode="(\w+)"\} ([0-9.]+)$', re.M)


async def limit_of(url: str) -> tuple[str, int]:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(url + "/metrics")).text
    found = _LIMIT.search(text)
    assert found is not None, text[-2000:]
    return found.group(1), int(float(found.group(2)))


@pytest.mark.timeout(120)
async def test_sigkilled_replica_capacity_returns_within_the_lease_ttl(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # 200 ms per request: the replicas' leases, not how fast this process can send requests
    # on a busy machine, decide how many are in progress at the server.
    spec = ServiceSpec(require_auth=False, service_time=0.2, concurrency_limit=CAP)
    with Downstream({"api": spec}) as ds:
        limits = limits_section(3, lease_ttl=TTL, renew_interval=RENEW, op_timeout=0.5)
        text = fleet_config({"api": ds.url("api")}, cap=CAP, limits=limits)
        env = {"TOOLPOOL_REDIS_URL": redis_server.url}
        procs = [ServiceProcess(write_config(tmp_path, text, f"r{i}.toml"), env) for i in range(3)]
        stop = asyncio.Event()
        failures: list[tuple[int, str]] = []
        try:
            clients = [
                httpx.AsyncClient(base_url=p.url, headers=HEADERS, timeout=20) for p in procs
            ]

            async def worker(i: int) -> None:
                while not stop.is_set():
                    try:
                        r = await clients[i].get("/d/api/anything")
                    except httpx.HTTPError as exc:
                        if i != 2:
                            failures.append((i, repr(exc)))
                        return  # the killed replica's callers stop
                    if r.status_code != 200:
                        failures.append((i, r.text[:200]))

            tasks = [asyncio.create_task(worker(i)) for i in range(3) for _ in range(8)]
            # All three hold a share of the cap while each is busy.
            deadline = time.monotonic() + 20
            while True:
                limits_now = [await limit_of(p.url) for p in procs]
                if all(mode == "lease" and n >= 2 for mode, n in limits_now):
                    break
                assert time.monotonic() < deadline, limits_now
                await asyncio.sleep(0.05)
            before = sum(n for _, n in limits_now[:2])
            assert before < CAP
            procs[2].proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()

            async def back_in_use() -> float:
                # The killed replica's last requests end (the survivors alone hold at most
                # `before`), then the server sees the whole cap in progress again: only
                # possible once the survivors were granted the dead replica's share.
                await ds.wait_stats_async(
                    "api", lambda s: s.requests_in_progress <= before, timeout=10
                )
                await ds.wait_stats_async(
                    "api", lambda s: s.requests_in_progress == CAP, timeout=TTL + 10
                )
                return time.monotonic() - killed

            in_use = asyncio.create_task(back_in_use())
            procs[2].proc.wait(10)
            # Its record lapses in Redis: the capacity is free again...
            r = redis_server.client()
            records = "toolpool:default:lease:api:records"
            while len(r.hgetall(records)) == 3:
                assert time.monotonic() - killed < TTL + 5
                await asyncio.sleep(0.005)
            freed_after = time.monotonic() - killed
            r.close()
            # ...and the survivors use it.
            used_after = await in_use
            # Their leases split the whole cap between them (by demand: 6 + 6).
            deadline = time.monotonic() + 10
            while sorted(n for _, n in [await limit_of(p.url) for p in procs[:2]]) != [6, 6]:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            for c in clients:
                await c.aclose()
        finally:
            stop.set()
            for p in procs:
                if p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait(10)
        stats = ds.stats("api")
    assert not failures, failures[:5]
    assert stats.peak_requests_in_progress <= CAP
    assert stats.rejected_over_limit == 0
    # The dead replica's record lapses within the record TTL (lease_ttl - 4 busy intervals),
    # and the survivors, starved, renew every busy_interval and take it: the whole cap is in
    # use again at the server within the lease TTL.
    assert freed_after <= TTL, freed_after
    assert used_after <= TTL, used_after
    print(f"SIGKILL: record dropped after {freed_after:.2f} s, cap in use after {used_after:.2f} s")
