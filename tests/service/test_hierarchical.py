"""Hierarchical pools: a local pool capped at 3 connections per destination overflows to the
pool service instead of queuing. Server-side evidence: the local tier reaches the downstream
through a counting relay, so the relay's peak of open connections is the local tier's."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

import toolpool
from tests._support.pool_service import (
    AGENT_B_TOKEN,
    CountingRelay,
    ServiceThread,
    service_config,
    write_config,
)
from toolpool.testing import Downstream, ServiceSpec

ACME = toolpool.AuthContext(tenant="acme")


@pytest.fixture
def slow_ds() -> Iterator[Downstream]:
    services = {"crm": ServiceSpec(), "search": ServiceSpec(require_auth=False, service_time=0.2)}
    with Downstream(services) as ds:
        yield ds


def _tier(r: httpx.Response) -> str:
    return str(r.extensions["toolpool"].get("tier", "local"))


async def test_burst_of_50_uses_at_most_3_local_connections_and_overflows_the_rest(
    slow_ds: Downstream, tmp_path: Path
) -> None:
    text = service_config(slow_ds, search_cap=10, search_extra="queue_factor = 10")
    port = int(slow_ds.url("search").rsplit(":", 1)[1])
    with ServiceThread(write_config(tmp_path, text)) as svc, CountingRelay(port) as relay:
        local_url = f"http://127.0.0.1:{relay.port}"
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        pool = toolpool.Pool(
            [toolpool.Destination("search", local_url)], local_max_connections=3, overflow=remote
        )
        async with pool:
            client = pool.client()
            with toolpool.auth_context(ACME):
                responses = await asyncio.gather(
                    *[client.get(local_url + "/anything") for _ in range(50)]
                )
            local_stats = pool.stats()["search"]
        assert remote.closed  # closed with the pool that used it
    assert [r.status_code for r in responses] == [200] * 50
    tiers = [_tier(r) for r in responses]
    overflow = remote.overflow_stats()["search"]
    assert (overflow.local_total, overflow.overflow_total) == (
        tiers.count("local"),
        tiers.count("service"),
    )
    assert overflow.local_total + overflow.overflow_total == 50
    assert overflow.local_total >= 1 and overflow.overflow_total >= 47
    assert overflow.overflow_in_flight == 0
    # Server side: the local tier never held more than 3 connections, and never queued.
    assert 1 <= relay.peak <= 3
    assert local_stats.max_connections == 3 and local_stats.queued_total == 0
    # The rest went through the service (its tenant header reached the downstream) and the
    # downstream served all 50.
    via_service = [r.json() for r in responses if _tier(r) == "service"]
    assert all(body["tenant"] == "acme" for body in via_service)
    assert slow_ds.stats("search").requests_total == 50
    assert slow_ds.stats("search").peak_connections <= 3 + 10


def test_threads_overflow_too(slow_ds: Downstream, tmp_path: Path) -> None:
    text = service_config(slow_ds, search_cap=10, search_extra="queue_factor = 10")
    port = int(slow_ds.url("search").rsplit(":", 1)[1])
    with ServiceThread(write_config(tmp_path, text)) as svc, CountingRelay(port) as relay:
        local_url = f"http://127.0.0.1:{relay.port}"
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        with toolpool.Pool(
            [toolpool.Destination("search", local_url)], local_max_connections=2, overflow=remote
        ) as pool:
            client = pool.sync_client()
            # All 16 start together and the local two stay busy for 2 s, so the other 14 meet
            # a full local tier however slowly a loaded machine schedules the threads.
            start = threading.Barrier(16)

            def call(_: int) -> httpx.Response:
                start.wait(timeout=30)
                with toolpool.auth_context(ACME):
                    return client.get(local_url + "/delay?s=2")

            with ThreadPoolExecutor(16) as ex:
                responses = list(ex.map(call, range(16)))
    assert [r.status_code for r in responses] == [200] * 16
    overflow = remote.overflow_stats()["search"]
    assert overflow.overflow_total == [_tier(r) for r in responses].count("service") >= 14
    assert 1 <= relay.peak <= 2


async def test_when_both_tiers_are_full_the_caller_gets_pool_saturated(
    slow_ds: Downstream, tmp_path: Path
) -> None:
    text = service_config(slow_ds, search_cap=1, search_extra="queue_factor = 0")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        url = slow_ds.url("search")
        async with toolpool.Pool(
            [toolpool.Destination("search", url)], local_max_connections=1, overflow=remote
        ) as pool:
            client = pool.client()
            assert pool.saturation("search").state == "ok"
            with toolpool.auth_context(ACME):
                tasks = [asyncio.ensure_future(client.get(url + "/delay?s=1.0")) for _ in range(6)]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                # A refusal came back while both tiers are busy: the reading covers both.
                assert all(isinstance(t.exception(), toolpool.PoolSaturated) for t in done)
                during = pool.saturation("search")
                results = await asyncio.gather(*tasks, return_exceptions=True)
            after = pool.saturation("search")
    assert (during.state, during.reason) == ("saturated", "overflow_saturated")
    assert during.retry_after > 0
    assert after.state == "ok"  # the local tier is free again: new calls go local
    ok = [r for r in results if isinstance(r, httpx.Response)]
    refused = [r for r in results if isinstance(r, toolpool.PoolSaturated)]
    assert [r.status_code for r in ok] == [200, 200]
    assert sorted(_tier(r) for r in ok) == ["local", "service"]
    assert len(refused) == 4
    assert all(e.destination == "search" and e.max_connections == 1 for e in refused)
    assert all(e.retry_after > 0 for e in refused)
    assert remote.overflow_stats()["search"].overflow_saturated_total == 4


def test_overflow_needs_a_remote_pool() -> None:
    with pytest.raises(toolpool.ConfigError, match="RemotePool"):
        toolpool.Pool([toolpool.Destination("a", "http://127.0.0.1:9")], local_max_connections=2)
    with pytest.raises(toolpool.ConfigError, match="local_max_connections"):
        toolpool.Pool(
            [toolpool.Destination("a", "http://127.0.0.1:9")],
            local_max_connections=0,
            overflow=toolpool.RemotePool("http://127.0.0.1:9", token="t" * 20),
        )


async def test_tool_calls_wait_out_a_saturated_overflow_tier(
    slow_ds: Downstream, tmp_path: Path
) -> None:
    """Issue 20, through the overflow tier: both tiers full (3 local connections, the service
    takes 2 + 2 queued), 30 tool calls at once. Plain requests are refused (`PoolSaturated`);
    tool calls inside a wrapped agent's scope wait (the service's retry-after, within
    max_wait) and are all answered; with a max_wait too short, only busy errors come back."""
    from toolpool.adapters import Admission, atool_call_scope

    text = service_config(slow_ds, search_cap=2, search_extra="queue_factor = 1")
    url = slow_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        pool = toolpool.Pool(
            [toolpool.Destination("search", url)], local_max_connections=3, overflow=remote
        )
        async with pool:
            # The control: without a tool call's scope, the 30 meet both full tiers.
            with toolpool.auth_context(ACME):
                plain = await asyncio.gather(
                    *[pool.client().get(url + "/anything") for _ in range(30)],
                    return_exceptions=True,
                )
            assert any(isinstance(r, toolpool.PoolSaturated) for r in plain)

            async def tool_call(admission: Admission) -> int | str:
                async with atool_call_scope(pool, ACME, tool_name="search", admission=admission):
                    try:
                        async with httpx.AsyncClient(timeout=30.0) as client:
                            return (await client.get(url + "/anything")).status_code
                    except toolpool.PoolSaturated as exc:
                        return f"busy: {exc.reason}"

            waiting = Admission(pool, max_wait=30.0)
            results = await asyncio.gather(*[tool_call(waiting) for _ in range(30)])
            assert results == [200] * 30
            impatient = Admission(pool, max_wait=0.01)
            results = await asyncio.gather(*[tool_call(impatient) for _ in range(30)])
            assert set(results) <= {200, "busy: queue_full"}
            assert "busy: queue_full" in results
            stats = pool.stats()["search"]
            assert (stats.in_use, stats.waiting) == (0, 0)
