"""An existing CrewAI crew, made pooled and tenant-affine with one call, offline.

The crew's tools are written the usual way: each call builds its own `httpx.Client()` or calls
`requests.get(...)`, which opens a fresh connection (and, with OAuth, fetches a fresh token)
per call. `toolpool.crewai.wrap(crew, pool, auth=...)` changes no tool: inside every tool call
those clients go through the shared pool, acting for the tenant of the kickoff.

Everything runs on 127.0.0.1: the downstream services are `toolpool.testing`'s test bed (TLS,
OAuth2 client credentials per tenant) and the model is `ScriptedLLM`, an offline stand-in that
calls the tools by a fixed plan.

    python examples/crewai_crew.py
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

# Before CrewAI is imported: no telemetry, no tracing.
os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

import httpx
import requests
from crewai import Agent, Crew, Task
from crewai.tools import tool

import toolpool
from toolpool.crewai import wrap
from toolpool.crewai.testing import ScriptedLLM
from toolpool.testing import Downstream, ServiceSpec

TENANTS = {"acme": "acme-secret", "globex": "globex-secret"}


def build_crew(crm_url: str, search_url: str) -> Crew:
    """The crew as its authors wrote it: nothing here knows about toolpool."""

    @tool("crm_lookup")
    def crm_lookup(account: str) -> str:
        """Look up an account in the CRM."""
        with httpx.Client(timeout=10) as client:  # a new client per call: the storm
            body = client.get(f"{crm_url}/anything", params={"account": account}).json()
        return json.dumps({"account": account, "tenant": body["tenant"]})

    @tool("web_search")
    def web_search(query: str) -> str:
        """Search the web."""
        body = requests.get(f"{search_url}/anything", params={"q": query}, timeout=10).json()
        return json.dumps({"query": query, "tenant": body["tenant"]})

    def plan(tool_name: str, arg: str, n: int) -> list[list[dict[str, Any]]]:
        # One model turn with n parallel tool calls (CrewAI runs them in threads).
        return [[{"tool": tool_name, "args": {arg: f"{arg}-{i}"}} for i in range(n)]]

    researcher = Agent(
        role="researcher",
        goal="Research {topic}",
        backstory="Finds facts.",
        tools=[web_search],
        llm=ScriptedLLM(plan=plan("web_search", "query", 6), answer_prefix="facts"),
    )
    account_manager = Agent(
        role="account manager",
        goal="Know the accounts",
        backstory="Reads the CRM.",
        tools=[crm_lookup],
        llm=ScriptedLLM(plan=plan("crm_lookup", "account", 6), answer_prefix="accounts"),
    )
    return Crew(
        agents=[researcher, account_manager],
        tasks=[
            Task(description="Research {topic}.", expected_output="facts", agent=researcher),
            Task(
                description="Review the accounts of {tenant_id}.",
                expected_output="accounts",
                agent=account_manager,
            ),
        ],
    )


def main() -> None:
    services = {"crm": ServiceSpec(service_time=0.01), "search": ServiceSpec(service_time=0.01)}
    with Downstream(services, tls=True) as ds:
        for service in services:
            for tenant, secret in TENANTS.items():
                ds.register_client(
                    service, client_id=f"{tenant}-app", client_secret=secret, tenant=tenant
                )

        def oauth(service: str) -> toolpool.auth.OAuth2ClientCredentials:
            # Each tenant's own OAuth client, read from the run's AuthContext.
            return toolpool.auth.OAuth2ClientCredentials(
                ds.token_url(service),
                credentials=lambda ctx: (ctx.credentials["id"], ctx.credentials["secret"]),
            )

        pool = toolpool.Pool(
            [
                toolpool.Destination(
                    name, ds.url(name), verify=ds.ca_pem_path, max_connections=16, auth=oauth(name)
                )
                for name in services
            ]
        )
        with pool:
            crew = build_crew(ds.url("crm"), ds.url("search"))

            # The one call: every tool call of every agent now goes through the pool, for
            # the tenant named in the kickoff inputs.
            crew = wrap(
                crew,
                pool,
                auth=lambda inputs: toolpool.AuthContext(
                    tenant=inputs["tenant_id"],
                    credentials={
                        "id": f"{inputs['tenant_id']}-app",
                        "secret": TENANTS[inputs["tenant_id"]],
                    },
                ),
            )

            # Two tenants, three kickoffs each, all at once (copies of a wrapped crew are
            # wrapped too; one crew object runs one kickoff at a time).
            runs = [(tenant, crew.copy()) for tenant in TENANTS for _ in range(3)]
            with ThreadPoolExecutor(len(runs)) as executor:
                outputs = list(
                    executor.map(
                        lambda run: run[1].kickoff(
                            inputs={"tenant_id": run[0], "topic": "renewals"}
                        ),
                        runs,
                    )
                )

            for (tenant, _), output in zip(runs, outputs, strict=True):
                seen = {
                    json.loads(part)["tenant"] for part in output.raw.split(": ", 1)[1].split(" | ")
                }
                assert seen == {tenant}, (tenant, output.raw)

            print(f"{len(runs)} kickoffs, 12 tool calls each, for {len(TENANTS)} tenants at once")
            header = f"{'service':8} {'tool calls':>10} {'connections':>12} {'tokens':>7}"
            print(f"{header}  tenants per connection")
            for service in services:
                s = ds.stats(service)
                calls = s.requests_total - s.token_requests
                mixed = len(s.mixed_connections())
                print(
                    f"{service:8} {calls:>10} {s.connections_accepted:>12} {s.token_requests:>7}  "
                    f"{'one each' if mixed == 0 else f'{mixed} mixed!'}"
                )
            print(
                "Without toolpool each tool call would open its own connection and fetch a token."
            )


if __name__ == "__main__":
    main()
