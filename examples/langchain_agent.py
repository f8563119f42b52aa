"""An existing LangChain agent, made pooled and tenant-affine with one call, offline.

The agent's tools are written the usual way: each call builds its own `httpx.AsyncClient()`
or `httpx.Client()`, which opens a fresh connection (and, with OAuth, would fetch a fresh
token) per call. `toolpool.langchain.wrap(agent, pool, auth=...)` changes no tool: inside every
tool call those clients go through the shared pool, acting for the tenant of the run, whose
OAuth token the pool fetches once and attaches.

Everything runs on 127.0.0.1: the downstream services are `toolpool.testing`'s test bed (TLS,
OAuth2 client credentials per tenant) and the model is `ScriptedChatModel`, an offline stand-in
that asks for ten tool calls at once and then answers with their results.

    python examples/langchain_agent.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from typing import Any

# Before LangChain is imported: no tracing, no telemetry.
for _name, _value in {
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "CREWAI_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(_name, _value)

import httpx  # noqa: E402
from langchain.agents import create_agent  # noqa: E402
from langchain.tools import tool  # noqa: E402
from langchain_core.messages import ToolMessage  # noqa: E402

import toolpool  # noqa: E402
import toolpool.auth  # noqa: E402
from toolpool.langchain import wrap  # noqa: E402
from toolpool.langchain.testing import ScriptedChatModel  # noqa: E402
from toolpool.testing import Downstream, ServiceSpec  # noqa: E402

# Each tenant's OAuth client at the downstream services (the secrets never reach a log).
TENANTS = {"acme": "acme-secret", "globex": "globex-secret"}
RUNS_PER_TENANT = 3


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the application passes with each run: whom it is for."""

    tenant_id: str


def build_agent(crm_url: str, search_url: str) -> Any:
    """The agent as its authors wrote it: nothing here knows about toolpool."""

    @tool
    async def crm_lookup(account: str) -> str:
        """Look up an account in the CRM."""
        async with httpx.AsyncClient(timeout=10) as client:  # a new client per call: the storm
            r = await client.get(f"{crm_url}/anything", params={"account": account})
        r.raise_for_status()
        return json.dumps({"account": account, "tenant": r.json()["tenant"]})

    @tool
    def web_search(query: str) -> str:
        """Search the web (a blocking client; LangChain runs it in a worker thread)."""
        with httpx.Client(timeout=10) as client:
            r = client.get(f"{search_url}/anything", params={"q": query})
        r.raise_for_status()
        return json.dumps({"query": query, "tenant": r.json()["tenant"]})

    # One model turn asks for ten tool calls; the agent runs them in parallel.
    model = ScriptedChatModel(
        tool_calls=[{"name": "crm_lookup", "args": {"account": f"a-{i}"}} for i in range(5)]
        + [{"name": "web_search", "args": {"query": f"q-{i}"}} for i in range(5)]
    )
    return create_agent(model, [crm_lookup, web_search], context_schema=RunContext)


async def main() -> None:
    services = {"crm": ServiceSpec(service_time=0.01), "search": ServiceSpec(service_time=0.01)}
    with Downstream(services, tls=True) as ds:
        for service in services:
            for tenant, secret in TENANTS.items():
                ds.register_client(
                    service, client_id=f"{tenant}-app", client_secret=secret, tenant=tenant
                )

        def tenant_client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
            # Each tenant's own OAuth client, read from the run's AuthContext.
            assert ctx is not None, "every tool call runs for a tenant"
            return ctx.credentials["id"], ctx.credentials["secret"]

        def oauth(service: str) -> toolpool.auth.OAuth2ClientCredentials:
            return toolpool.auth.OAuth2ClientCredentials(
                ds.token_url(service), credentials=tenant_client
            )

        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    name, ds.url(name), verify=ds.ca_pem_path, max_connections=16, auth=oauth(name)
                )
                for name in services
            ]
        )
        async with pool:
            agent = build_agent(ds.url("crm"), ds.url("search"))

            # The one call: every tool call of the agent now goes through the pool, for the
            # tenant of the run it belongs to.
            agent = wrap(
                agent,
                pool,
                auth=lambda run: toolpool.AuthContext(
                    tenant=run.context.tenant_id,
                    credentials={
                        "id": f"{run.context.tenant_id}-app",
                        "secret": TENANTS[run.context.tenant_id],
                    },
                ),
            )

            # Three rounds; in each, one run per tenant, at the same time.
            runs: list[str] = []
            outputs = []
            for _round in range(RUNS_PER_TENANT):
                outputs += await asyncio.gather(
                    *(
                        agent.ainvoke(
                            {"messages": [("user", "Review my accounts")]},
                            context=RunContext(tenant_id=tenant),
                        )
                        for tenant in TENANTS
                    )
                )
                runs += list(TENANTS)
            for tenant, output in zip(runs, outputs, strict=True):
                results = [m for m in output["messages"] if isinstance(m, ToolMessage)]
                seen = {json.loads(str(m.content))["tenant"] for m in results}
                assert seen == {tenant}, (tenant, seen)

            print(f"{len(runs)} runs, 10 parallel tool calls each, for {len(TENANTS)} tenants")
            print(f"{'service':8} {'tool calls':>10} {'connections':>12} {'tokens':>7}  affinity")
            for service in services:
                s = ds.stats(service)
                calls = s.requests_total - s.token_requests
                mixed = len(s.mixed_connections())
                print(
                    f"{service:8} {calls:>10} {s.connections_accepted:>12} {s.token_requests:>7}"
                    f"  {'one tenant per connection' if mixed == 0 else f'{mixed} MIXED'}"
                )
            stats = pool.stats()
            # On HTTP/2 (the default on https://) the slot counts are stream permits; the
            # connections are the http2_* fields.
            opened = sum(
                d.http2_connections_opened if d.protocol == "h2" else d.created_total
                for d in stats.values()
            )
            protocols = ", ".join(sorted({d.protocol for d in stats.values()}))
            print(f"pool: {opened} connections opened ({protocols}), {stats.in_use} in use now")
            print(
                "Without toolpool each tool call would open its own connection and fetch its "
                "own token."
            )


if __name__ == "__main__":
    asyncio.run(main())
