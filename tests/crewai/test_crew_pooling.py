"""A real three-agent crew, kicked off for two tenants at once: every tool call is pooled,
acts for its kickoff's tenant, and the downstream sees few connections, each carrying one
tenant, and one token fetch per (service, tenant)."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

import toolpool
from tests._support.crewai_crews import (
    CALLS_PER_KICKOFF,
    TENANTS,
    CallLog,
    make_pool,
    tenant_ctx,
    tenants_in,
    three_agent_crew,
)
from toolpool.crewai import is_wrapped, wrap
from toolpool.testing import Downstream

#: Two concurrent lanes per tenant, each kicking off its own copy of the crew ROUNDS times.
LANES = [tenant for tenant in TENANTS for _ in range(2)]
ROUNDS = 3
#: Sized for the burst: at most 2 lanes x 6 parallel calls per tenant, plus its token
#: request, so no connection ever has to be closed to make room for another tenant's.
MAX_CONNECTIONS = 32
#: Upper bound on connections per service, from the crew's shape: per tenant at most 12
#: parallel search calls (researchers of both lanes), or 4 sync + 6 async CRM calls, +1 token.
CONNECTION_BOUND = {"search": 2 * (12 + 1), "crm": 2 * (4 + 6 + 1)}
#: On HTTP/2 (the pool's default; the services are TLS): one connection per tenant and driver,
#: every call multiplexed on it. CRM is called from threads (sync tools) and from the event
#: loop of the async tools, search from threads only.
DRIVERS = {"search": 1, "crm": 2}


def by_tenant(inputs: dict[str, Any]) -> toolpool.AuthContext:
    return tenant_ctx(inputs["tenant_id"])


def inputs_for(tenant: str, round_: int) -> dict[str, str]:
    return {"tenant_id": tenant, "topic": f"renewals-{round_}"}


def check_run(
    ds: Downstream, pool: toolpool.Pool, log: CallLog, runs: list[tuple[str, Any]]
) -> None:
    """What every set of concurrent runs must show, whatever way they were kicked off.

    `runs`: (tenant, CrewOutput) of every kickoff."""
    # Each kickoff's results (what its models read) came from its own tenant only.
    for tenant, output in runs:
        seen = set().union(*(tenants_in(task.raw) for task in output.tasks_output))
        assert seen == {tenant}, (tenant, [t.raw for t in output.tasks_output])
    # Inside every tool call the auth context was the kickoff's, and the server agreed.
    per_kickoff = sum(CALLS_PER_KICKOFF.values())
    assert len(log.calls) == len(runs) * per_kickoff
    assert all(c["ctx_tenant"] == c["server_tenant"] for c in log.calls), log.calls
    assert Counter(c["server_tenant"] for c in log.calls) == Counter(
        {t: per_kickoff * sum(1 for r, _ in runs if r == t) for t in TENANTS}
    )
    for service, calls_per_kickoff in CALLS_PER_KICKOFF.items():
        stats = ds.stats(service)
        calls = calls_per_kickoff * len(runs)
        assert stats.responses_by_status == {200: calls + len(TENANTS)}  # + one token each
        # Far fewer connections than calls (without the pool, every call opens one).
        assert stats.connections_accepted <= CONNECTION_BOUND[service] < calls, (service, stats)
        assert pool.stats()[service].protocol == "h2"
        assert stats.connections_accepted == len(TENANTS) * DRIVERS[service], (service, stats)
        # No connection ever carried two tenants.
        assert stats.mixed_connections() == {}
        assert set().union(*stats.connection_tenants.values()) == set(TENANTS)
        # One token per (service, tenant), although several kickoffs of each ran at once.
        assert stats.token_requests_by_tenant == dict.fromkeys(TENANTS, 1), (service, stats)
        dest = pool.stats()[service]
        assert (dest.in_use, dest.waiting) == (0, 0)


def test_three_agent_crew_two_tenants_in_threads(ds: Downstream) -> None:
    log = CallLog()
    with make_pool(ds, max_connections=MAX_CONNECTIONS) as pool:
        crew = wrap(three_agent_crew(ds, log), pool, auth=by_tenant)
        # One crew object runs one kickoff at a time; concurrent runs use copies, which the
        # wrapped crew's copy() wraps too (as kickoff_for_each does).
        lanes = [(tenant, crew.copy()) for tenant in LANES]
        assert all(is_wrapped(t) for _, c in lanes for a in c.agents for t in a.tools)

        def lane(tenant: str, copy: Any) -> list[tuple[str, Any]]:
            return [(tenant, copy.kickoff(inputs=inputs_for(tenant, r))) for r in range(ROUNDS)]

        with ThreadPoolExecutor(len(lanes)) as executor:
            futures = [executor.submit(lane, tenant, copy) for tenant, copy in lanes]
            runs = [run for f in futures for run in f.result(timeout=120)]
        check_run(ds, pool, log, runs)


@pytest.mark.parametrize("method", ["akickoff", "kickoff_async"])
async def test_three_agent_crew_two_tenants_async(ds: Downstream, method: str) -> None:
    log = CallLog()
    async with make_pool(ds, max_connections=MAX_CONNECTIONS) as pool:
        crew = wrap(three_agent_crew(ds, log), pool, auth=by_tenant)

        async def lane(tenant: str, copy: Any) -> list[tuple[str, Any]]:
            kickoff = getattr(copy, method)
            return [(tenant, await kickoff(inputs=inputs_for(tenant, r))) for r in range(ROUNDS)]

        lanes = await asyncio.wait_for(
            asyncio.gather(*(lane(tenant, crew.copy()) for tenant in LANES)), timeout=120
        )
        check_run(ds, pool, log, [run for runs in lanes for run in runs])


def test_kickoff_for_each_binds_each_input(ds: Downstream) -> None:
    log = CallLog()
    with make_pool(ds, max_connections=MAX_CONNECTIONS) as pool:
        crew = wrap(three_agent_crew(ds, log), pool, auth=by_tenant)
        inputs = [inputs_for(tenant, 0) for tenant in LANES]
        outputs = crew.kickoff_for_each(inputs=inputs)
        check_run(
            ds, pool, log, [(i["tenant_id"], o) for i, o in zip(inputs, outputs, strict=True)]
        )


def test_auth_context_around_kickoff(ds: Downstream, pool: toolpool.Pool) -> None:
    """auth=None: the run acts for the context the caller set around kickoff."""
    log = CallLog()
    crew = wrap(three_agent_crew(ds, log), pool)
    with toolpool.auth_context(tenant_ctx("globex")):
        output = crew.kickoff(inputs={"tenant_id": "ignored", "topic": "x"})
    assert set().union(*(tenants_in(t.raw) for t in output.tasks_output)) == {"globex"}
    assert {c["ctx_tenant"] for c in log.calls} == {"globex"}
    assert {c["server_tenant"] for c in log.calls} == {"globex"}


def test_fixed_auth_context(ds: Downstream, pool: toolpool.Pool) -> None:
    """auth=AuthContext: every run and every tool call acts for it, whatever the inputs."""
    log = CallLog()
    crew = wrap(three_agent_crew(ds, log), pool, auth=tenant_ctx("acme"))
    with toolpool.auth_context(tenant_ctx("globex")):  # the fixed context wins
        crew.kickoff(inputs={"tenant_id": "globex", "topic": "x"})
    assert {c["server_tenant"] for c in log.calls} == {"acme"}


def test_missing_tenant_is_a_clear_error_before_any_call(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    log = CallLog()
    crew = wrap(three_agent_crew(ds, log), pool, auth=by_tenant)
    with pytest.raises(toolpool.ConfigError, match=r"kickoff\(inputs=") as info:
        crew.kickoff(inputs={"topic": "x"})
    assert "KeyError" in str(info.value) and "tenant_id" in str(info.value)
    assert log.calls == []
    assert ds.stats("crm").requests_total == ds.stats("search").requests_total == 0
