"""Wrapped agents against an OAuth2-protected TLS downstream: each tenant's tool calls get
that tenant's token (one per destination and tenant) and its own connections."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.base import TaskResult
from autogen_agentchat.messages import ToolCallExecutionEvent
from autogen_core import CancellationToken
from autogen_ext.tools.http import HttpTool

import toolpool
from tests._support.autogen_replay import replay_model
from toolpool.auth import OAuth2ClientCredentials
from toolpool.autogen import PooledHttpTool, wrap
from toolpool.testing import Downstream, ServiceSpec

TENANTS = {
    "acme": toolpool.AuthContext(
        tenant="acme", credentials={"client_id": "acme-app", "client_secret": "acme-s3cret"}
    ),
    "globex": toolpool.AuthContext(
        tenant="globex", credentials={"client_id": "globex-app", "client_secret": "globex-s3cret"}
    ),
}


@pytest.fixture
async def oauth_crm() -> AsyncIterator[Downstream]:
    spec = ServiceSpec(require_auth=True, token_latency=0.05)
    async with Downstream({"crm": spec}, tls=True) as ds:
        for ctx in TENANTS.values():
            ds.register_client(
                "crm",
                client_id=ctx.credentials["client_id"],
                client_secret=ctx.credentials["client_secret"],
                tenant=ctx.tenant or "",
            )
        yield ds


def tools(ds: Downstream) -> list[Any]:
    """Tools that know nothing about tokens: the pool's auth provider adds them."""
    url = ds.url("crm") + "/anything"
    host, port = ds.address("crm")

    async def fetch_async(n: int) -> str:
        """Record n via a new httpx.AsyncClient."""
        async with httpx.AsyncClient() as client:
            return (await client.get(url, params={"n": n})).text

    def fetch_sync(n: int) -> str:
        """Record n via a new httpx.Client, in a worker thread."""
        with httpx.Client() as client:
            return client.get(url, params={"n": n}).text

    http_tool = HttpTool(
        name="fetch_http",
        description="Record n via AutoGen's HttpTool (a new client per call).",
        scheme="https",
        host=host,
        port=port,
        path="/anything",
        method="GET",
        json_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
        return_type="text",
    )
    return [fetch_async, fetch_sync, http_tool]


def client_of(ctx: toolpool.AuthContext) -> tuple[str, str]:
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


def crm_destination(ds: Downstream) -> toolpool.Destination:
    """The CRM with a token per tenant (client credentials from the auth context)."""
    return toolpool.Destination(
        "crm",
        ds.url("crm"),
        verify=ds.ca_pem_path,
        auth=OAuth2ClientCredentials(token_url=ds.token_url("crm"), credentials=client_of),
    )


TURN = [("fetch_async", {"n": 1}), ("fetch_sync", {"n": 2}), ("fetch_http", {"n": 3})]


async def test_one_token_per_tenant_and_tenant_affine_connections(oauth_crm: Downstream) -> None:
    crm = crm_destination(oauth_crm)
    async with toolpool.Pool([crm], warmup=0) as pool:

        async def run(tenant: str) -> TaskResult:
            agent = AssistantAgent(
                f"{tenant}_agent",
                model_client=replay_model(TURN, TURN, "done"),
                tools=tools(oauth_crm),
                max_tool_iterations=2,
                reflect_on_tool_use=True,
            )
            wrap(agent, pool)
            with toolpool.auth_context(TENANTS[tenant]):
                return await agent.run(task="look up records")

        results = await asyncio.gather(run("acme"), run("globex"))

        for tenant, result in zip(TENANTS, results, strict=True):
            events = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]
            executed = [r for m in events for r in m.content]
            assert len(executed) == 6
            assert not [r.content for r in executed if r.is_error]
            assert {json.loads(r.content)["tenant"] for r in executed} == {tenant}

        stats = oauth_crm.stats("crm")
        assert stats.token_requests_by_tenant == {"acme": 1, "globex": 1}
        assert stats.http_401 == 0
        assert stats.requests_total - stats.token_requests == 12
        assert stats.mixed_connections() == {}
        # HTTP/2, the pool's default on TLS: one connection per tenant and driver (the event
        # loop: the token request and the async and HttpTool calls; the thread driver: the sync
        # tool's), every call multiplexed on it.
        assert stats.connections_accepted == stats.http2_connections() == 2 * 2
        assert (pool.stats().in_use, pool.stats().waiting) == (0, 0)


async def test_pooled_http_tool_outside_an_agent(oauth_crm: Downstream) -> None:
    crm = crm_destination(oauth_crm)
    http_tool = tools(oauth_crm)[2]
    assert isinstance(http_tool, HttpTool)
    async with toolpool.Pool([crm], warmup=0) as pool:
        fixed = PooledHttpTool.from_tool(http_tool, pool, auth=TENANTS["acme"])
        host, port = oauth_crm.address("crm")
        ambient = PooledHttpTool(
            name="fetch_http",
            scheme="https",
            host=host,
            port=port,
            path="/anything",
            method="GET",
            json_schema={"type": "object", "properties": {"n": {"type": "integer"}}},
            pool=pool,
        )
        token = CancellationToken()
        first = json.loads(await fixed.run_json({"n": 1}, token))
        second = json.loads(await fixed.run_json({"n": 2}, token))
        with toolpool.auth_context(TENANTS["globex"]):
            third = json.loads(await ambient.run_json({"n": 3}, token))

        assert (first["tenant"], second["tenant"], third["tenant"]) == ("acme", "acme", "globex")
        # HttpTool opens a client per call; on the pool both calls share one connection.
        assert second["connection_id"] == first["connection_id"]
        assert second["request_on_connection"] > first["request_on_connection"]
        assert third["connection_id"] != first["connection_id"]
        assert oauth_crm.stats("crm").token_requests_by_tenant == {"acme": 1, "globex": 1}

        # It saves as the plain HttpTool it was made from: a pool is not serializable.
        # (Loading it back fails in autogen-ext 0.7.5 for any HttpTool without headers.)
        dumped = fixed.dump_component()
        assert dumped.provider == "autogen_ext.tools.http.HttpTool"
        assert dumped.config == http_tool.dump_component().config


async def test_plain_http_tool_opens_a_connection_per_call(oauth_crm: Downstream) -> None:
    """The baseline: without the pool every call is a new connection (and, here, has no
    token and does not trust the test CA, so it cannot even reach the service)."""
    http_tool = tools(oauth_crm)[2]
    with pytest.raises(httpx.ConnectError):
        await http_tool.run_json({"n": 1}, CancellationToken())
    assert oauth_crm.stats("crm").requests_total == 0
