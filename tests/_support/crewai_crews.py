"""Shared pieces of the CrewAI adapter tests: tenants and their OAuth clients, pools for the
test bed, and tools written the naive way (a fresh `httpx.Client()`, `requests.get`, an
`httpx.AsyncClient()` per call), which is what `toolpool.crewai.wrap` must pool unedited."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import httpx
import requests
from crewai import Agent, Crew, Task
from crewai.tools import BaseTool, tool

import toolpool
import toolpool.auth
from toolpool.crewai.testing import ScriptedLLM
from toolpool.testing import Downstream

TENANTS = ("acme", "globex")


def client_secret(tenant: str) -> str:
    return f"secret-{tenant}-{os.getpid()}"


def tenant_ctx(tenant: str) -> toolpool.AuthContext:
    """A tenant's auth context, carrying its OAuth client."""
    return toolpool.AuthContext(
        tenant=tenant,
        credentials={"client_id": f"{tenant}-app", "client_secret": client_secret(tenant)},
    )


def register_tenants(ds: Downstream, services: tuple[str, ...]) -> None:
    for service in services:
        for tenant in TENANTS:
            ds.register_client(
                service,
                client_id=f"{tenant}-app",
                client_secret=client_secret(tenant),
                tenant=tenant,
            )


def _client_of(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None, "a tool call ran without an auth context"
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


def make_pool(
    ds: Downstream, services: tuple[str, ...] = ("crm", "search"), **kwargs: Any
) -> toolpool.Pool:
    """A pool for the test bed's services, authenticating per tenant with OAuth2 client
    credentials against each service's token endpoint; no warm-up, so every connection the
    server counts was opened for a tool call."""
    kwargs.setdefault("max_connections", 8)
    return toolpool.Pool(
        [
            toolpool.Destination(
                service,
                ds.url(service),
                verify=ds.ca_pem_path if ds.tls else True,
                auth=toolpool.auth.OAuth2ClientCredentials(
                    ds.token_url(service), credentials=_client_of
                ),
                **kwargs,
            )
            for service in services
        ],
        warmup=0,
    )


# ---------------------------------------------------------------------- tools


class CallLog:
    """What the tools saw, from every thread: the tenant a call ran for (its auth context)
    and the tenant and connection the server reported."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[dict[str, Any]] = []

    def add(self, tool_name: str, body: dict[str, Any]) -> str:
        ctx = toolpool.current_auth()
        entry = {
            "tool": tool_name,
            "ctx_tenant": ctx.tenant if ctx is not None else None,
            "server_tenant": body.get("tenant"),
            "service": body.get("service"),
            "connection_id": body.get("connection_id"),
            "thread": threading.current_thread().name,
        }
        with self._lock:
            self.calls.append(entry)
        return json.dumps(
            {"tool": tool_name, "tenant": body.get("tenant"), "service": body.get("service")}
        )


class CrmLookup(BaseTool):
    """A `BaseTool` subclass that builds a plain `httpx.Client()` per call."""

    name: str = "crm_lookup"
    description: str = "Look up an account in the CRM."
    base_url: str
    log: Any

    def _run(self, account: str) -> str:
        with httpx.Client(timeout=10.0) as client:
            response = client.get(f"{self.base_url}/anything", params={"account": account})
            response.raise_for_status()
            return str(self.log.add(self.name, response.json()))


def search_tool(base_url: str, log: CallLog) -> Any:
    """A `@tool` function that calls `requests.get` (a new Session per call)."""

    @tool("web_search")
    def web_search(query: str) -> str:
        """Search the web for a query."""
        response = requests.get(f"{base_url}/anything", params={"q": query}, timeout=10)
        response.raise_for_status()
        return str(log.add("web_search", response.json()))

    return web_search


def notes_tool(base_url: str, log: CallLog) -> Any:
    """An async `@tool` function with its own `httpx.AsyncClient()` per call."""

    @tool("fetch_notes")
    async def fetch_notes(topic: str) -> str:
        """Fetch the notes on a topic."""
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.get(f"{base_url}/anything", params={"topic": topic})
            response.raise_for_status()
            return str(log.add("fetch_notes", response.json()))

    return fetch_notes


def calls(tool_name: str, arg: str, n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"tool": tool_name, "args": {arg: f"{prefix}-{i}"}} for i in range(n)]


#: Tool calls of one kickoff of `three_agent_crew`, per service.
CALLS_PER_KICKOFF = {"search": 6 + 2, "crm": 3 + 3 + 2}


def three_agent_crew(ds: Downstream, log: CallLog) -> Crew:
    """A crew of three agents: a researcher (native function calling, 6 parallel `requests`
    searches), an account manager (text/ReAct path, 3 CRM lookups with `httpx.Client`), and
    a writer (native: 3 parallel async-httpx note fetches, then 2 CRM lookups and 2 searches
    in parallel). 16 tool calls per kickoff."""
    crm = CrmLookup(base_url=ds.url("crm"), log=log)
    search = search_tool(ds.url("search"), log)
    notes = notes_tool(ds.url("crm"), log)
    researcher = Agent(
        role="researcher",
        goal="Research {topic}",
        backstory="Finds facts.",
        llm=ScriptedLLM(plan=[calls("web_search", "query", 6, "q")], answer_prefix="research"),
        tools=[search],
    )
    account_manager = Agent(
        role="account manager",
        goal="Know the accounts",
        backstory="Reads the CRM.",
        llm=ScriptedLLM(
            function_calling=False,
            plan=[calls("crm_lookup", "account", 1, f"a{i}") for i in range(3)],
            answer_prefix="accounts",
        ),
        tools=[crm],
    )
    writer = Agent(
        role="writer",
        goal="Write the brief",
        backstory="Writes.",
        llm=ScriptedLLM(
            plan=[
                calls("fetch_notes", "topic", 3, "t"),
                calls("crm_lookup", "account", 2, "w") + calls("web_search", "query", 2, "w"),
            ],
            answer_prefix="brief",
        ),
        tools=[notes, crm, search],
    )
    tasks = [
        Task(
            description="Research {topic} for {tenant_id}.",
            expected_output="facts",
            agent=researcher,
        ),
        Task(
            description="List the accounts of {tenant_id}.",
            expected_output="accounts",
            agent=account_manager,
        ),
        Task(description="Write a brief on {topic}.", expected_output="a brief", agent=writer),
    ]
    return Crew(agents=[researcher, account_manager, writer], tasks=tasks)


def tenants_in(text: str) -> set[str]:
    """The tenants the server reported in tool results quoted in `text`."""
    found: set[str] = set()
    decoder = json.JSONDecoder()
    index = text.find("{")
    while index != -1:
        try:
            value, end = decoder.raw_decode(text, index)
        except ValueError:
            index = text.find("{", index + 1)
            continue
        if isinstance(value, dict) and "tenant" in value:
            found.add(str(value["tenant"]))
        index = text.find("{", end)
    return found
