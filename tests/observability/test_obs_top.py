"""`toolpool top` on real metrics: two real scrapes of a served registry around known traffic,
the rows it computes checked against the server's and the pool's own counters, the frame
rendered into a rich Console capture, and the command run as `python -m toolpool top`."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys

import httpx
import pytest
from prometheus_client import CollectorRegistry
from rich.console import Console

import toolpool
import toolpool.auth
import toolpool.metrics
from toolpool import _top
from toolpool._state import WAIT_BUCKETS
from toolpool.testing import Downstream, ServiceSpec

WINDOW = 2.0  # the scrapes are stamped 2 s apart, so every rate is an increase / 2


def bucket_of(seconds: float) -> int:
    """Index of the wait-histogram bucket holding `seconds` (le semantics)."""
    return next((i for i, bound in enumerate(WAIT_BUCKETS) if seconds <= bound), len(WAIT_BUCKETS))


def cells(text: str, destination: str) -> list[str]:
    """The cells of a destination's row in a rendered table."""
    for line in text.splitlines():
        parts = [c.strip() for c in line.split("│")]
        if len(parts) > 2 and parts[0] == destination:
            return parts
    raise AssertionError(f"no row for {destination!r} in:\n{text}")


def ctx_client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


async def test_top_rows_and_frame_match_the_real_counters() -> None:
    services = {
        "crm": ServiceSpec(token_latency=0.01),
        # One connection, 50 ms per request: nine concurrent requests wait in a ladder.
        "slow": ServiceSpec(require_auth=False, service_time=0.05),
    }
    async with Downstream(services) as ds:
        ds.register_client("crm", client_id="acme-app", client_secret="s3cret", tenant="acme")
        ctx = toolpool.AuthContext(
            tenant="acme", credentials={"client_id": "acme-app", "client_secret": "s3cret"}
        )
        oauth = toolpool.auth.OAuth2ClientCredentials(ds.token_url("crm"), credentials=ctx_client)
        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    "crm",
                    ds.url("crm"),
                    auth=oauth,
                    max_connections=5,
                    idle_ttl=0.3,
                    health_check_interval=0.1,
                ),
                toolpool.Destination("slow", ds.url("slow"), max_connections=1, queue_factor=20),
            ],
            warmup=0.0,
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry)
        server = toolpool.metrics.serve(0, registry)
        try:
            async with pool, pool.client() as client:
                with toolpool.auth_context(ctx):
                    first = await asyncio.to_thread(_top.fetch, server.url)
                    crm_url = ds.url("crm") + "/bytes?n=10"
                    # crm: four responses held open at once (four connections in use)...
                    held = [await client.send(client.build_request("GET", crm_url), stream=True)]
                    held += [
                        await client.send(client.build_request("GET", crm_url), stream=True)
                        for _ in range(3)
                    ]
                    for response in held:
                        await response.aread()
                    # ...then idle; the pool closes all of them after idle_ttl (evictions).
                    await ds.wait_stats_async("crm", lambda s: s.connections_open == 0)
                    # Two more held open across the second scrape: "used" is 2.
                    held = [
                        await client.send(client.build_request("GET", crm_url), stream=True)
                        for _ in range(2)
                    ]
                    slow = [client.get(ds.url("slow") + "/anything") for _ in range(9)]
                    assert all(r.status_code == 200 for r in await asyncio.gather(*slow))
                    second = await asyncio.to_thread(_top.fetch, server.url)
                    stats = pool.stats()
                    # The pool's default resilience policy (if any) reports a breaker state.
                    policy = pool.destination("crm").policy
                    breaker = policy.stats().breaker_state if policy is not None else None
                    crm_server, slow_server = ds.stats("crm"), ds.stats("slow")
                    for response in held:
                        await response.aread()
        finally:
            server.close()

    # The window is whatever we say it is: stamp the two real scrapes 2 s apart.
    before = _top.Scrape(0.0, first.destinations)
    after = _top.Scrape(WINDOW, second.destinations)
    rows = {r.destination: r for r in _top.rows(before, after)}
    assert set(rows) == {"crm", "slow"}

    crm = rows["crm"]
    assert (crm.used, crm.idle, crm.opening, crm.max_connections) == (2, 0, 0, 5)
    assert crm.utilization == 2 / 5
    assert (crm.pending, crm.pending_max) == (0, 10)
    accepted = crm_server.connections_accepted
    assert accepted >= 6  # four, then two (token requests may have used their own)
    assert crm.created_per_s == accepted / WINDOW
    assert crm.evicted_per_s == (accepted - 2) / WINDOW  # all but the two in use: idle TTL
    assert stats["crm"].closed_total["idle_ttl"] == accepted - 2
    assert crm_server.token_requests == 1
    assert crm.auth_refreshes_per_s == 1 / WINDOW
    assert crm.requests_per_s == stats["crm"].wait_count / WINDOW
    assert crm.breaker == breaker

    slow = rows["slow"]
    assert (slow.used, slow.idle, slow.max_connections) == (0, 1, 1)
    assert slow.created_per_s == slow_server.connections_accepted / WINDOW == 1 / WINDOW
    assert slow.requests_per_s == 9 / WINDOW
    assert slow.evicted_per_s == 0
    assert slow.auth_refreshes_per_s is None  # no auth provider: no auth series at all
    # Nine waits on one connection: the histogram estimate lands in the bucket of the
    # pool's exact percentile (with nine samples both pick the same order statistic).
    assert slow.wait_p50 is not None and slow.wait_p99 is not None
    assert bucket_of(slow.wait_p50) == bucket_of(stats["slow"].wait_p50_seconds)
    assert bucket_of(slow.wait_p99) == bucket_of(stats["slow"].wait_p99_seconds)
    # The 5th request waited for at least four 50 ms services, the 9th for eight.
    assert slow.wait_p50 > 0.1
    assert slow.wait_p99 > 0.25

    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(_top.render(rows.values(), url=server.url, window=WINDOW))
    text = console.export_text()
    assert f"toolpool top · {server.url}" in text
    c = cells(text, "crm")
    assert c[1] == "████░░░░░░  40%"
    assert c[2:4] == ["2/0/5", "0/10"]
    assert c[5:9] == [
        f"{stats['crm'].wait_count / WINDOW:.1f}",
        f"{accepted / WINDOW:.1f}",
        f"{(accepted - 2) / WINDOW:.1f}",
        "0.5",
    ]
    assert c[9] == (breaker or "–")
    s = cells(text, "slow")
    assert s[1] == "░░░░░░░░░░   0%"
    assert s[2:4] == ["0/1/1", "0/20"]
    assert s[4] == f"{_top.format_seconds(slow.wait_p50)}/{_top.format_seconds(slow.wait_p99)}"
    assert s[5:9] == ["4.5", "0.5", "0", "–"]


async def test_top_counts_http2_connections_not_stream_permits() -> None:
    """On an HTTP/2 destination the slot series count stream permits, which move between
    tenants at the cap (affinity) while their connections stay: new/s and evict/s count
    connections, as the server does."""
    spec = ServiceSpec(require_auth=False, service_time=0.02)
    async with Downstream({"api": spec}, tls=True) as ds:
        pool = toolpool.Pool(
            [toolpool.Destination("api", ds.url("api"), max_connections=3, queue_factor=20)],
            verify=ds.client_ssl_context(),
            warmup=0.0,
            http2=True,
        )
        registry = CollectorRegistry()
        toolpool.metrics.register(pool, registry)
        server = toolpool.metrics.serve(0, registry)
        try:
            async with pool, pool.client() as client:

                async def call(i: int) -> int:
                    tenant = f"t{i % 6}"
                    with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                        r = await client.get(ds.url("api") + "/anything")
                    return r.status_code

                first = await asyncio.to_thread(_top.fetch, server.url)
                # Six tenants over 3 stream permits: permits move between tenants.
                assert set(await asyncio.gather(*(call(i) for i in range(36)))) == {200}
                second = await asyncio.to_thread(_top.fetch, server.url)
                stats = pool.stats()["api"]
                served = ds.stats("api")
        finally:
            server.close()
    (row,) = _top.rows(
        _top.Scrape(0.0, first.destinations), _top.Scrape(WINDOW, second.destinations)
    )
    assert served.connections_accepted == 6  # one per tenant, kept while permits moved
    assert stats.closed_total["affinity"] > 0 and stats.created_total > 6  # the permits
    assert row.created_per_s == 6 / WINDOW
    assert row.evicted_per_s == 0.0
    assert (row.used, row.max_connections) == (0, 3)  # the gauges: stream permits


def test_quantile_matches_histogram_quantile_rules() -> None:
    # 10 observations: 4 in (0, 0.1], 4 in (0.1, 0.2], 2 above 0.2 (the +Inf bucket).
    buckets = {0.1: 4.0, 0.2: 8.0, float("inf"): 10.0}
    assert _top.quantile(0.5, buckets) == 0.1 + 0.1 * (5 - 4) / 4
    assert _top.quantile(0.2, buckets) == 0.1 * 2 / 4
    assert _top.quantile(0.99, buckets) == 0.2  # in +Inf: the highest finite bound
    assert _top.quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None


def test_python_m_toolpool_top_once_against_a_live_process() -> None:
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        registry = CollectorRegistry()
        pool = toolpool.Pool(
            [toolpool.Destination("crm", ds.url("crm"), max_connections=3, warmup=0.0)]
        )
        toolpool.metrics.register(pool, registry)
        with pool, pool.sync_client() as client, toolpool.metrics.serve(0, registry) as server:
            for _ in range(3):
                assert client.get(ds.url("crm") + "/anything").status_code == 200
            env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1", "TERM": "dumb"}
            top = [sys.executable, "-m", "toolpool", "top", "--once", "--interval=0.2"]
            done = subprocess.run(
                [*top, f"--url={server.url}"],
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
            )
        assert done.returncode == 0, done.stderr
        assert "toolpool top" in done.stdout
        row = cells(done.stdout, "crm")
        assert row[2:4] == ["0/1/3", "0/6"]  # one connection, reused three times, now idle
        assert row[4:9] == ["–", "0", "0", "0", "–"]  # nothing happened during the window

        # Nothing listens there any more: a clear error and a failing status.
        failed = subprocess.run(
            [sys.executable, "-m", "toolpool", "top", "--once", "--url", server.url],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert failed.returncode == 1
        assert "cannot scrape" in failed.stdout


def test_fetch_raises_on_a_bad_endpoint() -> None:
    with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        with pytest.raises(httpx.HTTPStatusError, match="500"):
            _top.fetch(ds.url("crm") + "/status/500")
