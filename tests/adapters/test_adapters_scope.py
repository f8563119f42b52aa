"""tool_call_scope: auth context, transparent pooling of naive httpx clients, learning."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import threading

import httpx
import pytest

import toolpool
from toolpool.adapters import (
    Admission,
    atool_call_scope,
    current_tool_call,
    install_httpx_patch,
    run_in_thread_with_context,
    tool_call_scope,
)
from toolpool.testing import Downstream

ACME = toolpool.AuthContext(tenant="acme")
GLOBEX = toolpool.AuthContext(tenant="globex")


def _tenant_header() -> dict[str, str]:
    ctx = toolpool.current_auth()
    assert ctx is not None
    assert ctx.tenant is not None
    return {"X-Tenant": ctx.tenant}


async def test_naive_async_clients_are_pooled_per_tenant(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    """20 tool calls that each build their own AsyncClient share a few connections, and each
    connection carries one tenant."""
    admission = Admission(pool)

    async def tool_body(ctx: toolpool.AuthContext) -> dict[str, object]:
        async with atool_call_scope(pool, ctx, tool_name="lookup", admission=admission) as call:
            assert current_tool_call() is call
            async with httpx.AsyncClient() as client:
                r = await client.get(ds.url("crm") + "/anything", headers=_tenant_header())
            assert call.destinations == {"crm"}
            return {"pooled": r.extensions.get("toolpool"), **r.json()}

    for _round in range(3):
        results = await asyncio.gather(*(tool_body(c) for c in [ACME, GLOBEX] * 5))
        assert all(res["pooled"] is not None for res in results)
        assert {res["tenant"] for res in results} == {"acme", "globex"}
    stats = ds.stats("crm")
    assert stats.requests_total == 30
    # Without pooling every call opens its own connection (30); the pool keeps it to the
    # 8-connection cap at most, reused across rounds.
    assert stats.connections_accepted <= 8
    assert stats.mixed_connections() == {}
    assert pool.stats()["crm"].reused_total >= 30 - 8
    assert admission.destinations("lookup") == frozenset({"crm"})
    assert pool.stats()["crm"].in_use == 0


def test_naive_sync_clients_are_pooled(ds: Downstream) -> None:
    """httpx.Client() built in sync tool bodies on worker threads goes through the pool."""
    with toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))], warmup=0) as pool:

        def tool_body(ctx: toolpool.AuthContext) -> tuple[str, bool]:
            with tool_call_scope(pool, ctx, tool_name="sync_lookup"):
                with httpx.Client() as client:
                    r = client.get(ds.url("crm") + "/anything", headers=_tenant_header())
                    return r.json()["tenant"], r.extensions.get("toolpool") is not None

        threads_results: list[tuple[str, bool]] = []
        lock = threading.Lock()

        def worker(ctx: toolpool.AuthContext) -> None:
            for _ in range(5):
                res = tool_body(ctx)
                with lock:
                    threads_results.append(res)

        threads = [threading.Thread(target=worker, args=(c,)) for c in [ACME, GLOBEX] * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(threads_results) == 20
        assert all(pooled for _tenant, pooled in threads_results)
        stats = ds.stats("crm")
        assert stats.connections_accepted <= 4  # one per concurrent worker at most
        assert stats.mixed_connections() == {}
        assert pool.stats()["crm"].in_use == 0


def test_module_level_httpx_functions_are_pooled_too(ds: Downstream) -> None:
    """`httpx.get(...)` builds a Client per call: inside a scope it goes through the pool."""
    with toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))], warmup=0) as pool:
        with tool_call_scope(pool, ACME, tool_name="oneliner"):
            rs = [
                httpx.get(ds.url("crm") + "/anything", headers=_tenant_header()) for _ in range(3)
            ]
        assert [r.extensions["toolpool"]["reused"] for r in rs] == [False, True, True]
        assert ds.stats("crm").connections_accepted == 1


async def test_closing_a_pooled_client_keeps_the_pool(ds: Downstream, pool: toolpool.Pool) -> None:
    async with atool_call_scope(pool, ACME, tool_name="t"):
        async with httpx.AsyncClient() as client:
            first = await client.get(ds.url("crm") + "/anything", headers=_tenant_header())
        await client.aclose()
        with httpx.Client() as sync_client:
            pass
    assert not pool.closed
    async with atool_call_scope(pool, ACME, tool_name="t"):
        async with httpx.AsyncClient() as client:
            second = await client.get(ds.url("crm") + "/anything", headers=_tenant_header())
    assert second.extensions["toolpool"]["reused"] is True
    assert second.json()["connection_id"] == first.json()["connection_id"]
    assert sync_client.is_closed


async def test_outside_a_scope_clients_are_untouched(ds: Downstream, pool: toolpool.Pool) -> None:
    install_httpx_patch()
    async with httpx.AsyncClient() as client:
        r = await client.get(ds.url("crm") + "/anything")
    assert "toolpool" not in r.extensions
    assert current_tool_call() is None
    assert toolpool.current_auth() is None


async def test_clients_with_their_own_settings_keep_them(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    own = httpx.AsyncHTTPTransport()
    async with atool_call_scope(pool, ACME, tool_name="t"):
        clients = [
            httpx.AsyncClient(transport=own),
            httpx.AsyncClient(verify=False),
            httpx.AsyncClient(verify=ssl.create_default_context()),
            httpx.AsyncClient(mounts={"http://": httpx.AsyncHTTPTransport()}),
        ]
        pooled = httpx.AsyncClient(timeout=3.0, headers={"X-Tenant": "acme"})
        for client in clients:
            r = await client.get(ds.url("crm") + "/anything")
            assert "toolpool" not in r.extensions
            await client.aclose()
        r = await pooled.get(ds.url("crm") + "/anything")
        assert r.extensions["toolpool"]["destination"] == "crm"
        await pooled.aclose()


async def test_opt_out_keeps_auth_but_not_pooling(ds: Downstream, pool: toolpool.Pool) -> None:
    async with atool_call_scope(pool, GLOBEX, tool_name="t", pool_httpx=False) as call:
        assert toolpool.current_auth() == GLOBEX
        async with httpx.AsyncClient() as client:
            r = await client.get(ds.url("crm") + "/anything")
        assert "toolpool" not in r.extensions
        assert call.destinations == set()


async def test_scope_restores_the_outer_context(pool: toolpool.Pool) -> None:
    with toolpool.auth_context(ACME):
        async with atool_call_scope(pool, GLOBEX, tool_name="outer") as outer:
            with tool_call_scope(pool, None, tool_name="inner") as inner:
                assert toolpool.current_auth() is None
                assert current_tool_call() is inner
            assert current_tool_call() is outer
            assert toolpool.current_auth() == GLOBEX
        assert toolpool.current_auth() == ACME
    assert current_tool_call() is None


async def test_worker_threads_see_the_scope(ds: Downstream, pool: toolpool.Pool) -> None:
    """run_in_thread_with_context copies the scope; a bare thread still acts for the tenant
    its client was built for."""

    def in_thread() -> tuple[str | None, str]:
        ctx = toolpool.current_auth()
        with httpx.Client() as client:
            r = client.get(ds.url("search") + "/anything", headers=_tenant_header())
        return (ctx.tenant if ctx else None), r.json()["tenant"]

    async with atool_call_scope(pool, ACME, tool_name="threaded") as call:
        assert await run_in_thread_with_context(in_thread) == ("acme", "acme")
        client = httpx.Client(headers={"X-Tenant": "acme"})
        seen: list[str | None] = []
        bare = threading.Thread(
            target=lambda: seen.append(
                client.get(ds.url("search") + "/anything").extensions["toolpool"]["destination"]
            )
        )
        bare.start()
        await asyncio.to_thread(bare.join, 30)
        client.close()
        assert seen == ["search"]
        assert call.destinations == {"search"}
    # The bare thread had no auth context; the pooled client used the acme identity, so the
    # only connections to 'search' carried acme.
    tenants = set().union(*ds.stats("search").connection_tenants.values())
    assert tenants == {"acme"}


async def test_busy_errors_are_recorded_even_when_the_tool_catches_them(
    ds: Downstream,
) -> None:
    """A tool that swallows httpx errors still reports the busy signal to its call."""
    pool = toolpool.Pool(
        [toolpool.Destination("crm", ds.url("crm"), max_connections=1, queue_factor=1)],
        warmup=0,
    )
    async with pool:
        async with atool_call_scope(pool, ACME, tool_name="hog"):
            hog = httpx.AsyncClient(timeout=httpx.Timeout(30.0))
            hang1 = asyncio.create_task(hog.get(ds.url("crm") + "/hang"))
            hang2 = asyncio.create_task(hog.get(ds.url("crm") + "/hang"))
        dest = pool.destination("crm")
        await _until(lambda: dest.state.in_use == 1 and dest.state.waiting == 1)
        async with atool_call_scope(pool, ACME, tool_name="polite") as call:
            async with httpx.AsyncClient() as client:
                try:
                    await client.get(ds.url("crm") + "/anything")
                except httpx.TransportError as exc:
                    caught: BaseException = exc
        assert isinstance(caught, toolpool.PoolSaturated)
        assert call.busy is caught
        assert call.destinations == {"crm"}
        for task in (hang1, hang2):
            task.cancel()
        await asyncio.gather(hang1, hang2, return_exceptions=True)
        await hog.aclose()
        await _until(lambda: dest.state.in_use == 0 and dest.state.waiting == 0)


def test_patch_is_idempotent() -> None:
    install_httpx_patch()
    first = (httpx.Client.__init__, httpx.AsyncClient.__init__)
    install_httpx_patch()
    from toolpool.adapters import _scope

    _scope._patch_init(httpx.Client, _scope._ScopedTransport)
    assert (httpx.Client.__init__, httpx.AsyncClient.__init__) == first
    original = httpx.Client.__init__._toolpool_original  # type: ignore[attr-defined]
    assert getattr(original, "_toolpool_original", None) is None


def test_importing_the_helpers_imports_no_framework() -> None:
    code = (
        "import sys, toolpool, toolpool.adapters\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('langchain', 'langchain_core', 'langgraph', 'crewai', 'autogen_agentchat', "
        "'autogen_core')]\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout


async def _until(predicate: object, timeout: float = 10.0) -> None:
    """Wait (yielding to the loop) until predicate() holds; fail after `timeout` seconds."""
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.005)


async def test_closing_a_fully_received_response_keeps_its_connection(
    ds: Downstream, pool: toolpool.Pool
) -> None:
    """SDKs (the MCP client among them) close responses without reading them: a body that
    already arrived in full must not cost the connection; one still arriving does."""
    url = ds.url("crm")
    async with pool.client() as client:
        async with client.stream("GET", f"{url}/status/202") as r:
            first = r.extensions["toolpool"]["connection_id"]
        async with client.stream("GET", f"{url}/anything") as r:
            assert r.extensions["toolpool"]["reused"] is True
            assert r.extensions["toolpool"]["connection_id"] == first
            await r.aread()
        async with client.stream("GET", f"{url}/bytes", params={"n": 4_000_000}) as r:
            big = r.extensions["toolpool"]["connection_id"]
            async for _chunk in r.aiter_raw():
                break  # closed with most of the body still on its way
        r = await client.get(f"{url}/anything")
        assert r.extensions["toolpool"]["connection_id"] != big
    with pool.sync_client() as sync_client:
        with sync_client.stream("GET", f"{url}/status/202") as r:
            first = r.extensions["toolpool"]["connection_id"]
        with sync_client.stream("GET", f"{url}/anything") as r:
            assert r.extensions["toolpool"]["connection_id"] == first
            r.read()
    assert pool.stats()["crm"].in_use == 0


def test_requests_sessions_inside_any_scope_are_pooled(ds: Downstream) -> None:
    """Not only CrewAI's tools use `requests`: a scope pools sessions built inside it."""
    import requests

    pool = toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))], warmup=0)
    with pool:
        for tenant in ("acme", "globex"):
            ctx = toolpool.AuthContext(tenant=tenant)
            for _ in range(3):
                with tool_call_scope(pool, ctx, tool_name="lookup"):
                    body = requests.get(
                        ds.url("crm") + "/anything", headers={"X-Tenant": tenant}, timeout=10
                    ).json()
                assert body["tenant"] == tenant
        outside = requests.get(ds.url("crm") + "/anything", timeout=10)  # not in a scope
        assert outside.status_code == 200
        assert pool.stats()["crm"].acquired_total == 6
    stats = ds.stats("crm")
    assert stats.connections_accepted == 3  # one per tenant, plus the unpooled call
    assert stats.mixed_connections() == {}
