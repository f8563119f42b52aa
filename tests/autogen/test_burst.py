"""A 10x burst through `toolpool.autogen.wrap` (issue 20): 4 tenants' agents, 25 parallel
tool calls each, against a destination capped at 10; tools build their own httpx clients and
no destination is declared. Every call is answered with its result, the server never sees
more than 10 connections; a `max_wait` shorter than the burst needs gives busy results only."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent

import toolpool
from tests._support.autogen_replay import describe, replay_model, tenant_headers, tool_results_seen
from toolpool.autogen import wrap
from toolpool.testing import Downstream, ServiceSpec, tenant_fairness

TENANTS = ["acme", "globex", "initech", "umbrella"]
PER_TENANT = 25
CAP = 10


@pytest.fixture(scope="module")
def api() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False, service_time=0.05)}) as ds:
        yield ds


async def _burst(
    api: Downstream, max_wait: float
) -> tuple[list[list[str]], dict[str, list[float]], toolpool.DestinationStats]:
    api.reset_stats()
    url = api.url("api") + "/anything"
    done: dict[str, list[float]] = {}
    started = time.monotonic()

    async def fetch(i: int) -> str:
        """Fetch a record (a naive tool: its own httpx.AsyncClient per call)."""
        async with httpx.AsyncClient(timeout=30.0) as client:
            r = await client.get(url, params={"i": i}, headers=tenant_headers())
        r.raise_for_status()
        ctx = toolpool.current_auth()
        assert ctx is not None and ctx.tenant is not None
        done.setdefault(ctx.tenant, []).append(time.monotonic() - started)
        return describe(r)

    pool = toolpool.Pool([toolpool.Destination("api", api.url("api"), max_connections=CAP)])
    models = []
    agents = []
    async with pool:
        for tenant in TENANTS:
            model = replay_model([("fetch", {"i": i}) for i in range(PER_TENANT)], "done")
            agent = AssistantAgent(
                f"agent_{tenant}", model_client=model, tools=[fetch], reflect_on_tool_use=True
            )
            wrap(agent, pool, auth=toolpool.AuthContext(tenant=tenant), max_wait=max_wait)
            models.append(model)
            agents.append(agent)
        started = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(a.run(task="fetch everything") for a in agents)), timeout=120
        )
        stats = pool.stats()["api"]
    seen = [[r.content for r in tool_results_seen(m, 1)] for m in models]
    results = [
        [("busy:" + c) if c.startswith("tool 'fetch' could not run") else c for c in per]
        for per in seen
    ]
    return results, done, stats


async def test_ten_x_burst_every_call_answered(api: Downstream) -> None:
    results, done, stats = await _burst(api, max_wait=30.0)
    for tenant, per in zip(TENANTS, results, strict=True):
        assert len(per) == PER_TENANT
        assert [json.loads(r)["tenant"] for r in per] == [tenant] * PER_TENANT
    server = api.stats("api")
    assert server.requests_total == len(TENANTS) * PER_TENANT
    assert server.peak_connections <= CAP
    assert server.mixed_connections() == {}
    assert stats.saturated_total == 0
    assert (stats.in_use, stats.waiting, stats.opening) == (0, 0, 0)
    # Fair across tenants: every tenant's last call finishes near the end of the burst
    # (the order of completions, which load does not move; p99s in benchmarks/RESULTS.md).
    fairness = tenant_fairness(done)
    print(f"\nautogen: {fairness}")
    assert fairness.rank_ratio <= 1.5, fairness
    assert fairness.max_lead <= CAP + CAP // 2, fairness


async def test_max_wait_shorter_than_the_burst_gives_busy_results_only(api: Downstream) -> None:
    results, done, stats = await _burst(api, max_wait=0.05)
    flat = [r for per in results for r in per]
    assert len(flat) == len(TENANTS) * PER_TENANT
    busy = [r for r in flat if r.startswith("busy:")]
    ok = [r for r in flat if not r.startswith("busy:")]
    assert busy, "a 0.05 s max_wait cannot serve a 10x burst on 10 connections"
    assert all("destination 'api' is busy" in r for r in busy)
    assert all("tenant" in json.loads(r) for r in ok)  # the rest are real results
    server = api.stats("api")
    assert server.requests_total == len(ok) == sum(len(v) for v in done.values())
    assert server.peak_connections <= CAP
    assert (stats.in_use, stats.waiting, stats.opening) == (0, 0, 0)
