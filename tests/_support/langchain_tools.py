"""Helpers of the LangChain adapter tests: the run context, naive tools (each call builds its
own httpx client), tool-call scripts and pools. Imported by the tests and conftest."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import httpx

for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
}.items():
    os.environ.setdefault(_name, _value)

from langchain.tools import ToolRuntime, tool  # noqa: E402
from langchain_core.tools import BaseTool  # noqa: E402

import toolpool  # noqa: E402
from toolpool.testing import Downstream  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Ctx:
    """The agent's run context: which tenant the run is for."""

    tenant_id: str


def tenant_of(runtime: ToolRuntime[Any]) -> str:
    """The run's tenant, from `context=` or from `config["configurable"]`."""
    if runtime.context is not None:
        return str(runtime.context.tenant_id)
    return str(runtime.config["configurable"]["tenant_id"])


def by_context(run: ToolRuntime[Any]) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=run.context.tenant_id)


def by_configurable(run: ToolRuntime[Any]) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=run.config["configurable"]["tenant_id"])


def _report(r: httpx.Response) -> str:
    r.raise_for_status()
    body = r.json()
    return json.dumps(
        {
            "tenant": body["tenant"],
            "connection": body["connection_id"],
            "pooled": "toolpool" in r.extensions,
        }
    )


def naive_tools(ds: Downstream) -> list[BaseTool]:
    """Tools written the usual way: each call builds its own httpx client, no pool in sight."""
    crm = ds.url("crm")
    search = ds.url("search")

    @tool
    async def crm_lookup(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Look a customer up in the CRM."""
        async with httpx.AsyncClient(timeout=30.0) as client:
            r = await client.get(
                f"{crm}/anything", params={"q": q}, headers={"X-Tenant": tenant_of(runtime)}
            )
        return _report(r)

    @tool
    def crm_lookup_sync(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Look a customer up in the CRM (blocking client)."""
        with httpx.Client(timeout=30.0) as client:
            r = client.get(
                f"{crm}/anything", params={"q": q}, headers={"X-Tenant": tenant_of(runtime)}
            )
        return _report(r)

    @tool
    def search_docs(q: str, runtime: ToolRuntime[Ctx]) -> str:
        """Search the knowledge base (blocking client)."""
        with httpx.Client(timeout=30.0) as client:
            r = client.get(
                f"{search}/anything", params={"q": q}, headers={"X-Tenant": tenant_of(runtime)}
            )
        return _report(r)

    return [crm_lookup, crm_lookup_sync, search_docs]


def calls(*spec: tuple[str, int]) -> list[dict[str, Any]]:
    """Tool calls for the scripted model: `calls(("crm_lookup", 5), ("search_docs", 5))`."""
    return [{"name": name, "args": {"q": f"{name}-{i}"}} for name, n in spec for i in range(n)]


def make_pool(ds: Downstream, **crm: Any) -> toolpool.Pool:
    return toolpool.Pool(
        [
            toolpool.Destination("crm", ds.url("crm"), **({"max_connections": 10} | crm)),
            toolpool.Destination("search", ds.url("search"), max_connections=10),
        ],
        warmup=0,
    )
