"""An existing AutoGen agent, made pooled and tenant-affine with one call, offline.

The agent's tools are written the usual way: an async tool with its own `httpx.AsyncClient()`,
a sync tool with its own `httpx.Client()` (AutoGen runs it in a worker thread) and AutoGen's
`HttpTool`, which builds a new client per call. Each call opens a fresh connection and, with
OAuth, would need a fresh token. `toolpool.autogen.wrap(agent, pool)` changes no tool: inside
every tool call those clients go through the shared pool, acting for the tenant the run was
started for (`with toolpool.auth_context(...)`), whose OAuth token the pool fetches once.

Everything runs on 127.0.0.1: the downstream services are `toolpool.testing`'s test bed (TLS,
OAuth2 client credentials per tenant) and the model is AutoGen's `ReplayChatCompletionClient`,
scripted to ask for ten tool calls at once and then to answer.

    python examples/autogen_agent.py
"""

from __future__ import annotations

import asyncio
import json
import os

# Before AutoGen is imported: no telemetry, no tracing.
for _name, _value in {
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "CREWAI_DISABLE_TELEMETRY": "true",
    "AUTOGEN_DISABLE_RUNTIME_TRACING": "true",
}.items():
    os.environ.setdefault(_name, _value)

import httpx  # noqa: E402
from autogen_agentchat.agents import AssistantAgent  # noqa: E402
from autogen_agentchat.messages import ToolCallExecutionEvent  # noqa: E402
from autogen_core import FunctionCall  # noqa: E402
from autogen_core.models import CreateResult, ModelFamily, ModelInfo, RequestUsage  # noqa: E402
from autogen_ext.models.replay import ReplayChatCompletionClient  # noqa: E402
from autogen_ext.tools.http import HttpTool  # noqa: E402

import toolpool  # noqa: E402
import toolpool.auth  # noqa: E402
from toolpool.autogen import wrap  # noqa: E402
from toolpool.testing import Downstream, ServiceSpec  # noqa: E402

# Each tenant's OAuth client at the downstream services (the secrets never reach a log).
TENANTS = {"acme": "acme-secret", "globex": "globex-secret"}
RUNS_PER_TENANT = 3


def scripted_model() -> ReplayChatCompletionClient:
    """The offline model: ten parallel tool calls, then a final answer (one per run)."""
    calls = [("crm_lookup", {"account": f"a-{i}"}) for i in range(4)]
    calls += [("web_search", {"query": f"q-{i}"}) for i in range(3)]
    calls += [("crm_http", {"account": f"h-{i}"}) for i in range(3)]
    turn = CreateResult(
        finish_reason="function_calls",
        content=[
            FunctionCall(id=str(i), name=name, arguments=json.dumps(args))
            for i, (name, args) in enumerate(calls)
        ],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )
    info = ModelInfo(
        vision=False,
        function_calling=True,
        json_output=False,
        family=ModelFamily.UNKNOWN,
        structured_output=False,
    )
    return ReplayChatCompletionClient([turn, "Reviewed."], model_info=info)


def build_agent(crm_url: str, search_url: str) -> AssistantAgent:
    """The agent as its authors wrote it: nothing here knows about toolpool."""

    async def crm_lookup(account: str) -> str:
        """Look up an account in the CRM."""
        async with httpx.AsyncClient(timeout=10) as client:  # a new client per call: the storm
            r = await client.get(f"{crm_url}/anything", params={"account": account})
        r.raise_for_status()
        return json.dumps({"account": account, "tenant": r.json()["tenant"]})

    def web_search(query: str) -> str:
        """Search the web (a blocking client; AutoGen runs it in a worker thread)."""
        with httpx.Client(timeout=10) as client:
            r = client.get(f"{search_url}/anything", params={"q": query})
        r.raise_for_status()
        return json.dumps({"query": query, "tenant": r.json()["tenant"]})

    crm = httpx.URL(crm_url)
    crm_http = HttpTool(
        name="crm_http",
        description="Look up an account through the CRM's HTTP API.",
        scheme="https",
        host=crm.host,
        port=crm.port or 443,
        path="/anything",
        method="GET",
        json_schema={"type": "object", "properties": {"account": {"type": "string"}}},
    )
    return AssistantAgent(
        "account_reviewer",
        model_client=scripted_model(),
        tools=[crm_lookup, web_search, crm_http],
        system_message="Review the user's accounts.",
    )


def tenant_context(tenant: str) -> toolpool.AuthContext:
    """Whom a run acts for, with that tenant's OAuth client (read by the auth provider)."""
    return toolpool.AuthContext(
        tenant=tenant, credentials={"id": f"{tenant}-app", "secret": TENANTS[tenant]}
    )


async def main() -> None:
    services = {"crm": ServiceSpec(service_time=0.01), "search": ServiceSpec(service_time=0.01)}
    with Downstream(services, tls=True) as ds:
        for service in services:
            for tenant, secret in TENANTS.items():
                ds.register_client(
                    service, client_id=f"{tenant}-app", client_secret=secret, tenant=tenant
                )

        def tenant_client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
            assert ctx is not None, "every tool call runs for a tenant"
            return ctx.credentials["id"], ctx.credentials["secret"]

        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    name,
                    ds.url(name),
                    verify=ds.ca_pem_path,
                    max_connections=16,
                    auth=toolpool.auth.OAuth2ClientCredentials(
                        ds.token_url(name), credentials=tenant_client
                    ),
                )
                for name in services
            ]
        )
        async with pool:

            async def run(tenant: str) -> set[str]:
                # The one call: every tool call of this agent now goes through the pool.
                agent = wrap(build_agent(ds.url("crm"), ds.url("search")), pool)
                # AutoGen has no per-run context object: the run's tenant is set around it.
                with toolpool.auth_context(tenant_context(tenant)):
                    result = await agent.run(task="Review my accounts")
                events = [m for m in result.messages if isinstance(m, ToolCallExecutionEvent)]
                results = [r for m in events for r in m.content]
                assert len(results) == 10
                assert not any(r.is_error for r in results), [r.content for r in results]
                return {json.loads(r.content)["tenant"] for r in results}

            for _round in range(RUNS_PER_TENANT):
                seen = await asyncio.gather(*(run(tenant) for tenant in TENANTS))
                assert seen == [{tenant} for tenant in TENANTS], seen

            runs = RUNS_PER_TENANT * len(TENANTS)
            print(f"{runs} runs, 10 parallel tool calls each, for {len(TENANTS)} tenants")
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
                "own token (and the sync tool would not even know its tenant)."
            )


if __name__ == "__main__":
    asyncio.run(main())
