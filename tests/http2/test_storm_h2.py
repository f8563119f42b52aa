"""The randomized affinity storm on HTTP/2: 20 tenants, cancellations, stream resets,
refused streams, GOAWAYs, TCP resets and server idle closes. No connection carries two
tenants, nothing leaks, and the server never sees more concurrent streams than the cap."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

import toolpool
from tests._support.pools import assert_quiet_soon
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(180)
CAP = 10


async def test_randomized_affinity_storm_on_http2() -> None:
    rng = random.Random(4321)
    spec = ServiceSpec(require_auth=False, service_time=(0.0, 0.004), keepalive_timeout=0.15)
    async with Downstream({"api": spec}, tls=True, seed=11) as ds:
        for kind, p in (
            ("goaway", 0.005),
            ("rst_stream", 0.01),
            ("refused_stream", 0.01),
            ("reset", 0.003),
        ):
            ds.set_fault("api", kind, probability=p)  # type: ignore[arg-type]
        # 400 requests queue at once behind 10 streams: no wait limit of httpx (5 s) and a
        # generous one of the pool, so a busy machine makes a wave slower, not failed.
        dest = toolpool.Destination(
            "api",
            ds.url("api"),
            max_connections=CAP,
            queue_factor=100,
            idle_ttl=0.5,
            acquire_timeout=120,
        )
        tenants = [f"tenant-{i}" for i in range(20)]
        outcomes = {"ok": 0, "cancelled": 0, "error": 0}
        async with toolpool.Pool(
            [dest], verify=ds.client_ssl_context(), http2=True, policy=None
        ) as pool:
            client = pool.client(timeout=httpx.Timeout(30.0, pool=None))

            async def call(who: str) -> httpx.Response:
                with toolpool.auth_context(toolpool.AuthContext(tenant=who)):
                    return await client.get(ds.url("api") + "/anything", headers={"x-tenant": who})

            async def one() -> None:
                who = tenants[rng.randrange(20)]
                task = asyncio.ensure_future(call(who))
                if rng.random() < 0.15:
                    await asyncio.sleep(rng.random() * 0.01)
                    task.cancel()
                try:
                    r = await task
                    assert r.json()["tenant"] == who
                    assert r.http_version == "HTTP/2"
                    outcomes["ok"] += 1
                except asyncio.CancelledError:
                    outcomes["cancelled"] += 1
                except httpx.TransportError:
                    outcomes["error"] += 1  # a reset stream or connection surfaces (no policy)

            for wave in range(6):
                await asyncio.gather(*[one() for _ in range(400)])
                if wave % 2:
                    # Pause until the server's idle timeout closed one more connection.
                    idle_closed = ds.stats("api").connections_closed_by_server_idle
                    await ds.wait_stats_async(
                        "api",
                        lambda s, n=idle_closed: s.connections_closed_by_server_idle > n,
                        timeout=30,
                    )
            # Permits held for a cancelled stream come back once the server has read the
            # RST_STREAM (a PING round trip).
            await assert_quiet_soon(pool, timeout=30)
            st = pool.stats()["api"]
            assert (st.in_use, st.waiting, st.opening) == (0, 0, 0)
            assert st.http2_streams_in_use == 0
            assert st.protocol == "h2"
        stats = await ds.wait_stats_async("api", lambda s: s.connections_open == 0)
        assert stats.mixed_connections() == {}
        assert stats.peak_streams_open <= CAP
        assert stats.streams_open == 0
        assert stats.requests_in_progress == 0
        assert outcomes["ok"] > 1800 and outcomes["cancelled"] > 100
        for kind in ("goaway", "rst_stream", "refused_stream", "reset"):
            assert stats.faults_fired.get(kind, 0) > 0, kind
        assert stats.connections_closed_by_server_idle > 0
        assert stats.http2_connections() == stats.connections_accepted
