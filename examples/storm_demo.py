"""The connection storm, before and after toolpool, on one machine with no network.

    python examples/storm_demo.py            # `make demo`; about 3 minutes on 2 cores
    python examples/storm_demo.py --quick    # about a minute
    python examples/storm_demo.py --http2    # the toolpool run on HTTP/2 only (--http1: 1.1 only)

A downstream of five TLS services (crm, email, vectors, search, sandbox; toolpool.testing, in
its own process) sits 25 ms away behind latency relays, with OAuth2 token endpoints (100-300
ms), 20-50 ms service times and an nginx-style limit of 18 requests in progress per service.
100 agents run the seed's scenario: tasks of 3-5 parallel tool calls, three bursts, then a
steady phase. The agents are real LangChain agents (`--framework none` calls the tools
directly) driven by an offline scripted model; the tools are written the way tools are
written today: a new `httpx.AsyncClient()` per call and three attempts on 503.

Run 1, "naive": the tools also fetch an OAuth token per call.
Run 2, "toolpool": the same agents and tools, plus one call, `toolpool.langchain.wrap(agent,
pool, auth=...)`; the tools' clients now send through the shared, tenant-affine pool, and the
per-call token fetch moves into the pool (`Destination(auth=OAuth2ClientCredentials(...))`),
which fetches one token per (service, tenant). The pool speaks HTTP/2, its default (one
multiplexed connection per service and tenant, the cap counted in concurrent requests).
Run 3, "toolpool-http1.1": the same pool with `http2=False` (HTTP/1.1: a connection per
request in flight, handed over between tenants at the cap).

Prints the seed's table side by side and writes demo-output/results.json (also `--json PATH`),
demo-output/latency_cdf.png and demo-output/connections.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import json
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Offline and quiet: nothing may phone home.
for _name, _value in {
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
}.items():
    os.environ.setdefault(_name, _value)

import httpx  # noqa: E402

import toolpool  # noqa: E402
import toolpool.auth  # noqa: E402
from toolpool.testing import spawn_downstream  # noqa: E402
from toolpool.testing.storm import (  # noqa: E402
    CallRecord,
    StormSpec,
    TaskPlan,
    register_tenants,
    run_storm,
    summarize,
    timed_call,
)

OUT = Path("demo-output")


# ---------------------------------------------------------------------------- the tools


@dataclasses.dataclass
class Downstream:
    """Where the tools' services are, and how tools authenticate to them."""

    urls: dict[str, str]
    clients: dict[str, tuple[str, str]]  # tenant -> (client_id, secret): test values
    # "per-call": each tool call fetches its own token (today's tools). "pool": toolpool
    # attaches the tenant's cached token, so the tool sends none itself.
    credentials: str = "per-call"


DOWNSTREAM: Downstream | None = None


async def call_service(service: str, tenant: str, query: str) -> dict[str, Any]:
    """The body of every tool: one API call, the way tools are written today."""
    ds = DOWNSTREAM
    assert ds is not None
    async with httpx.AsyncClient(timeout=30) as client:  # a new client (connection) per call
        headers = {}
        if ds.credentials == "per-call":
            client_id, secret = ds.clients[tenant]
            token = await client.post(
                ds.urls[service] + "/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, secret),
            )
            token.raise_for_status()
            headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        for attempt in range(3):  # and the retries that make a storm worse
            r = await client.get(
                ds.urls[service] + "/anything", params={"q": query}, headers=headers
            )
            if r.status_code not in (429, 503) or attempt == 2:
                break
            await asyncio.sleep(0.2 * 2**attempt)
        r.raise_for_status()
        return dict(r.json())


def call_service_sync(service: str, tenant: str, query: str) -> dict[str, Any]:
    """The same tool body for frameworks whose tools are synchronous (CrewAI)."""
    ds = DOWNSTREAM
    assert ds is not None
    with httpx.Client(timeout=30) as client:  # a new client (connection) per call
        headers = {}
        if ds.credentials == "per-call":
            client_id, secret = ds.clients[tenant]
            token = client.post(
                ds.urls[service] + "/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, secret),
            )
            token.raise_for_status()
            headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        for attempt in range(3):
            r = client.get(ds.urls[service] + "/anything", params={"q": query}, headers=headers)
            if r.status_code not in (429, 503) or attempt == 2:
                break
            time.sleep(0.2 * 2**attempt)
        r.raise_for_status()
        return dict(r.json())


# ---------------------------------------------------------------------------- the agents


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What the application passes with each agent run: whom it is for."""

    tenant: str


Runner = Callable[[TaskPlan], Awaitable[list[CallRecord]]]


def langchain_runner(spec: StormSpec, pool: toolpool.Pool | None) -> Runner:
    """One LangChain agent with a tool per service; each task is one agent run whose model
    asks for the task's tool calls at once (the agent runs them in parallel)."""
    global ToolRuntime  # the tool's annotations are resolved in this module's namespace
    from langchain.agents import create_agent
    from langchain.tools import ToolRuntime, tool
    from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage

    from toolpool.langchain.testing import ScriptedChatModel

    records: dict[str, CallRecord] = {}

    def make_tool(service: str) -> Any:
        @tool(service, description=f"Call the {service} service.")
        async def run_tool(query: str, runtime: ToolRuntime[RunContext]) -> str:
            plan = TaskPlan(0, runtime.context.tenant, (), query.split(":")[0], 0.0)
            record = await timed_call(
                service, plan, lambda: call_service(service, runtime.context.tenant, query)
            )
            records[query] = record
            if not record.ok:
                raise RuntimeError(record.error)
            return "ok"

        return run_tool

    class PlanModel(ScriptedChatModel):
        """Offline model: asks for the tool calls listed in the user message, then answers."""

        def _reply(self, messages: list[BaseMessage]) -> AIMessage:
            if isinstance(messages[-1], ToolMessage):
                return AIMessage(content="done")
            human = next(m for m in reversed(messages) if isinstance(m, HumanMessage))
            calls = json.loads(str(human.content))
            return AIMessage(
                content="",
                tool_calls=[
                    {
                        "name": c["service"],
                        "args": {"query": c["query"]},
                        "id": f"call_{uuid.uuid4().hex[:12]}",
                        "type": "tool_call",
                    }
                    for c in calls
                ],
            )

    agent: Any = create_agent(
        PlanModel(), [make_tool(s) for s in spec.services], context_schema=RunContext
    )
    if pool is not None:
        from toolpool.langchain import wrap

        # The one call: every tool call now goes through the pool, for the run's tenant.
        agent = wrap(agent, pool, auth=lambda run: toolpool.AuthContext(tenant=run.context.tenant))

    async def run(plan: TaskPlan) -> list[CallRecord]:
        queries = [f"{plan.phase}:{uuid.uuid4().hex}" for _ in plan.services]
        calls = [{"service": s, "query": q} for s, q in zip(plan.services, queries, strict=True)]
        await agent.ainvoke(
            {"messages": [("user", json.dumps(calls))]}, context=RunContext(plan.tenant)
        )
        return [records.pop(q) for q in queries if q in records]

    return run


def plain_runner(spec: StormSpec, pool: toolpool.Pool | None) -> Runner:
    """No framework: each task calls the tool functions in parallel (inside a toolpool tool
    call scope in the toolpool run: the mechanism the adapters use)."""
    from toolpool.adapters import atool_call_scope

    async def one(service: str, plan: TaskPlan) -> None:
        if pool is None:
            await call_service(service, plan.tenant, plan.phase)
            return
        ctx = toolpool.AuthContext(tenant=plan.tenant)
        async with atool_call_scope(pool, ctx, tool_name=service):
            await call_service(service, plan.tenant, plan.phase)

    async def run(plan: TaskPlan) -> list[CallRecord]:
        return list(
            await asyncio.gather(
                *[timed_call(s, plan, lambda s=s: one(s, plan)) for s in plan.services]
            )
        )

    return run


# AutoGen passes no per-run context to tools: the demo's tools read the tenant from here (set
# around each run), the way an application would pass it.
_TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("demo_tenant")


def autogen_runner(spec: StormSpec, pool: toolpool.Pool | None) -> Runner:
    """A new AutoGen AssistantAgent per task (its replay model asks for the task's tool calls
    at once); in the toolpool run it is wrapped with `toolpool.autogen.wrap`."""
    from autogen_agentchat.agents import AssistantAgent
    from autogen_core import FunctionCall
    from autogen_core.models import CreateResult, ModelFamily, ModelInfo, RequestUsage
    from autogen_core.tools import FunctionTool
    from autogen_ext.models.replay import ReplayChatCompletionClient

    records: dict[str, CallRecord] = {}
    info = ModelInfo(
        vision=False,
        function_calling=True,
        json_output=False,
        family=ModelFamily.UNKNOWN,
        structured_output=False,
    )

    def make_tool(service: str) -> FunctionTool:
        async def run_tool(query: str) -> str:
            tenant = _TENANT.get()
            plan = TaskPlan(0, tenant, (), query.split(":")[0], 0.0)
            record = await timed_call(service, plan, lambda: call_service(service, tenant, query))
            records[query] = record
            if not record.ok:
                raise RuntimeError(record.error)
            return "ok"

        return FunctionTool(run_tool, description=f"Call the {service} service.", name=service)

    tools = [make_tool(s) for s in spec.services]

    async def run(plan: TaskPlan) -> list[CallRecord]:
        queries = [f"{plan.phase}:{uuid.uuid4().hex}" for _ in plan.services]
        turn = CreateResult(
            finish_reason="function_calls",
            content=[
                FunctionCall(id=str(i), name=s, arguments=json.dumps({"query": q}))
                for i, (s, q) in enumerate(zip(plan.services, queries, strict=True))
            ],
            usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
            cached=False,
        )
        model = ReplayChatCompletionClient([turn, "done"], model_info=info)
        agent = AssistantAgent("worker", model_client=model, tools=tools)
        token = _TENANT.set(plan.tenant)
        try:
            if pool is None:
                await agent.run(task="do the task")
            else:
                from toolpool.autogen import wrap

                wrap(agent, pool)  # the one call
                with toolpool.auth_context(toolpool.AuthContext(tenant=plan.tenant)):
                    await agent.run(task="do the task")
        finally:
            _TENANT.reset(token)
        return [records.pop(q) for q in queries if q in records]

    return run


def crewai_runner(spec: StormSpec, pool: toolpool.Pool | None) -> Runner:
    """A new one-agent Crew per task (its scripted model asks for the task's tool calls in
    one turn; CrewAI runs them in parallel threads), kicked off in a thread of its own; in
    the toolpool run it is wrapped with `toolpool.crewai.wrap`."""
    import concurrent.futures

    from crewai import Agent, Crew, Task
    from crewai.tools import tool

    from toolpool.crewai.testing import ScriptedLLM

    records: dict[str, CallRecord] = {}
    threads = concurrent.futures.ThreadPoolExecutor(spec.agents, "demo-kickoff")

    def make_tool(service: str) -> Any:
        def run_tool(query: str) -> str:
            tenant = _TENANT.get()
            t0 = time.perf_counter()
            try:
                call_service_sync(service, tenant, query)
                record = CallRecord(
                    service, tenant, query.split(":")[0], t0, time.perf_counter() - t0, True
                )
            except Exception as exc:
                record = CallRecord(
                    service,
                    tenant,
                    query.split(":")[0],
                    t0,
                    time.perf_counter() - t0,
                    False,
                    f"{type(exc).__name__}: {str(exc)[:120]}",
                )
            records[query] = record
            if not record.ok:
                raise RuntimeError(record.error)
            return "ok"

        run_tool.__doc__ = f"Call the {service} service."
        return tool(service)(run_tool)

    tools = [make_tool(s) for s in spec.services]

    async def run(plan: TaskPlan) -> list[CallRecord]:
        queries = [f"{plan.phase}:{uuid.uuid4().hex}" for _ in plan.services]
        model = ScriptedLLM(
            plan=[
                [
                    {"tool": s, "args": {"query": q}}
                    for s, q in zip(plan.services, queries, strict=True)
                ]
            ]
        )
        agent = Agent(
            role="worker",
            goal="Do the task",
            backstory="Uses the services.",
            llm=model,
            tools=tools,
        )
        crew = Crew(
            agents=[agent],
            tasks=[
                Task(description="Do the task for {tenant}.", expected_output="ok", agent=agent)
            ],
        )
        if pool is not None:
            from toolpool.crewai import wrap

            # The one call: the tenant of each kickoff comes from its inputs.
            wrap(crew, pool, auth=lambda inputs: toolpool.AuthContext(tenant=inputs["tenant"]))

        def kickoff() -> None:
            token = _TENANT.set(plan.tenant)
            try:
                crew.kickoff(inputs={"tenant": plan.tenant})
            finally:
                _TENANT.reset(token)

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(threads, contextvars.copy_context().run, kickoff)
        return [records.pop(q) for q in queries if q in records]

    return run


RUNNERS = {
    "langchain": langchain_runner,
    "crewai": crewai_runner,
    "autogen": autogen_runner,
    "none": plain_runner,
}


# ---------------------------------------------------------------------------- one run


class Timeline:
    """Samples the downstream's open connections (its own count) every 100 ms."""

    def __init__(self, ds: Any, services: tuple[str, ...]) -> None:
        self.ds, self.services = ds, services
        self.points: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-timeline", daemon=True)

    def __enter__(self) -> Timeline:
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            total = sum(self.ds.stats(s).connections_open for s in self.services)
            self.points.append((time.perf_counter() - self._t0, total))


async def probe_costs(ds: Any, spec: StormSpec, clients: dict[str, tuple[str, str]]) -> dict:
    """What one connection setup (TCP + TLS through the relay) and one token fetch cost on
    this network, measured: the unit prices of the setup-overhead row."""
    service = spec.services[0]
    connects, tokens = [], []
    client_id, secret = clients[spec.tenant_names()[0]]
    for _ in range(5):
        async with httpx.AsyncClient() as client:
            t0 = time.perf_counter()
            await client.get(ds.url(service) + "/_testbed/stats")
            connects.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = await client.post(
                ds.url(service) + "/oauth/token",
                auth=(client_id, secret),
                data={"grant_type": "client_credentials"},
            )
            r.raise_for_status()
            tokens.append(time.perf_counter() - t0)
    # The first request on a fresh connection includes one round trip of its own.
    rtt = 2 * spec.latency
    return {"connect_s": max(0.0, sorted(connects)[2] - rtt), "token_s": sorted(tokens)[2]}


def storm_pool(
    spec: StormSpec,
    urls: dict[str, str],
    clients: dict[str, Any],
    ca_pem_path: str,
    *,
    http2: bool = False,
) -> toolpool.Pool:
    """The "toolpool" run's pool: one destination per service, OAuth2 per tenant (with
    `http2`: HTTP/2 by ALPN, one connection per service and tenant, the cap in streams)."""
    return toolpool.Pool(
        [
            toolpool.Destination(
                service,
                urls[service],
                # The seed's sizing: 70 % of the downstream's documented limit (18 -> 12).
                documented_limit=spec.concurrency_limit,
                queue_factor=8,
                # HTTP/2 warm-up: one connection and one token per tenant before the storm
                # (on HTTP/1.1 warm-up opens unbound connections; the contexts are not used).
                warmup_contexts=[toolpool.AuthContext(tenant=t) for t in clients] if http2 else (),
                verify=ca_pem_path,
                auth=toolpool.auth.OAuth2ClientCredentials(
                    urls[service] + "/oauth/token",
                    credentials=lambda ctx: clients[ctx.tenant],
                ),
            )
            for service in spec.services
        ],
        http2=http2,
    )


async def warmup_counted(ds: Any, spec: StormSpec, pool: toolpool.Pool) -> None:
    """Wait (at most 10 s) until the servers, whose counters were reset before `pool`
    started, have counted its warm-up connections.

    A TLS server counts a connection when its side of the handshake ends, one way (25 ms)
    after the client's: resetting the counters right after `pool.astart()` would count warm-up
    connections as the storm's (up to 15 of them, for a framework whose runner is built
    quickly, as AutoGen's is).
    """
    created = pool.stats().created_total
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if sum(ds.stats(s).connections_accepted for s in spec.services) >= created:
            return
        await asyncio.sleep(0.02)


async def run_once(
    strategy: str,
    spec: StormSpec,
    framework: str,
    progress: Callable[[int, int], None],
    http2: bool = False,
) -> tuple[dict[str, Any], list[CallRecord], list[tuple[float, int]]]:
    global DOWNSTREAM
    with spawn_downstream(
        spec.service_specs(), tls=True, latency=spec.latency, seed=spec.seed
    ) as ds:
        os.environ["SSL_CERT_FILE"] = ds.ca_pem_path  # the tools trust the test CA
        clients = register_tenants(ds, spec)
        urls = {s: ds.url(s) for s in spec.services}
        costs = await probe_costs(ds, spec, clients)
        DOWNSTREAM = Downstream(
            urls, clients, "pool" if strategy.startswith("toolpool") else "per-call"
        )
        pool: toolpool.Pool | None = None
        if strategy.startswith("toolpool"):
            pool = storm_pool(spec, urls, clients, ds.ca_pem_path, http2=http2)
            ds.reset_stats()  # from here on the servers count the pool's connections only
            if framework == "crewai":
                # CrewAI's tools are synchronous: warm connections for the thread driver.
                await asyncio.to_thread(pool.start)
            else:
                await pool.astart()
        runner = RUNNERS[framework](spec, pool)
        if pool is not None:
            await warmup_counted(ds, spec, pool)
        ds.reset_stats()
        with Timeline(ds, spec.services) as timeline:
            t0 = time.perf_counter()
            records = await run_storm(spec, runner, progress=progress)
            duration = time.perf_counter() - t0
        if pool is not None:
            await pool.aclose()
        server = {s: ds.stats(s) for s in spec.services}
        setup = (
            sum(s.connections_accepted for s in server.values()) * costs["connect_s"]
            + sum(s.token_requests for s in server.values()) * costs["token_s"]
        )
        report = summarize(
            strategy,
            records,
            server,
            setup_seconds=setup,
            duration=duration,
            extra={
                "unit_costs": {k: round(v, 4) for k, v in costs.items()},
                "mixed_connections": sum(len(s.mixed_connections()) for s in server.values()),
            },
        )
    return report.as_dict(), records, timeline.points


# ---------------------------------------------------------------------------- output


ROWS = [
    ("setup_s_per_min", "connection setup overhead (s per minute)", "{:.1f}"),
    ("peak_conns", "downstream connections, peak (sum of per-service peaks)", "{:.0f}"),
    ("conns_opened", "downstream connections opened", "{:.0f}"),
    ("http_503", "503 / rate-limit responses from the downstream", "{:.0f}"),
    ("errors", "tool calls that failed", "{:.0f}"),
    ("p50_ms", "tool-call latency p50 (ms)", "{:.0f}"),
    ("p99_ms", "tool-call latency p99 (ms)", "{:.0f}"),
    ("tokens", "OAuth token requests", "{:.0f}"),
    ("mixed_connections", "connections that carried two tenants", "{:.0f}"),
]


COLUMNS = {"toolpool": "toolpool (HTTP/2)", "toolpool-http1.1": "toolpool (HTTP/1.1)"}


def table_lines(results: dict[str, dict[str, Any]], pooled: list[str]) -> list[tuple[str, ...]]:
    """One row per measure: the naive run's value, then each pooled run's."""
    rows = []
    for key, label, fmt in ROWS:
        values = []
        for run in [results["naive"], *(results[s] for s in pooled)]:
            value = run.get(key, 0)
            if key == "http_503":
                value += run.get("http_429", 0)
            values.append(fmt.format(value))
        rows.append((label, *values))
    return rows


def charts(
    results: dict[str, Any],
    records: dict[str, list[CallRecord]],
    timelines: dict[str, list[tuple[float, int]]],
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    OUT.mkdir(exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, recs in records.items():
        lat = sorted(1000 * r.seconds for r in recs if r.ok)
        if lat:
            ax.plot(lat, [(i + 1) / len(lat) for i in range(len(lat))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("tool-call latency (ms, log scale)")
    ax.set_ylabel("share of calls")
    ax.set_title("Tool-call latency CDF, before and after toolpool")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = OUT / "latency_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in timelines.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], label=name)
    ax.set_xlabel("seconds since the storm started")
    ax.set_ylabel("open connections at the downstream")
    ax.set_title("Downstream connections over time (the server's own count)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    path = OUT / "connections.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller storm (< 45 s)")
    parser.add_argument("--framework", choices=sorted(RUNNERS), default="langchain")
    parser.add_argument("--agents", type=int, help="concurrent agents (default 100, quick 40)")
    parser.add_argument("--calls", default="3-5", help="tool calls per task, e.g. 3-5")
    parser.add_argument("--destinations", type=int, default=5, help="services (1-5)")
    parser.add_argument("--latency", type=float, default=0.025, help="one-way latency (s)")
    parser.add_argument("--json", help="also write the results here")
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--http2", action="store_true", help="the toolpool run on HTTP/2 only (the default)"
    )
    only.add_argument(
        "--http1", action="store_true", help="the toolpool run on HTTP/1.1 only (http2=False)"
    )
    args = parser.parse_args()
    strategies = ["naive"]
    strategies += [] if args.http1 else ["toolpool"]
    strategies += [] if args.http2 else ["toolpool-http1.1"]
    lo, _, hi = args.calls.partition("-")
    spec = StormSpec(
        agents=args.agents or (40 if args.quick else 100),
        calls_per_task=(int(lo), int(hi or lo)),
        services=StormSpec().services[: max(1, min(5, args.destinations))],
        bursts=2 if args.quick else 3,
        steady_seconds=4.0 if args.quick else 10.0,
        latency=args.latency,
    )
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]Connection storm[/]: {spec.agents} agents ({args.framework}), "
        f"{spec.calls_per_task[0]}-{spec.calls_per_task[1]} parallel tool calls per task, "
        f"{len(spec.services)} TLS services {1000 * spec.latency:.0f} ms away, "
        f"{spec.bursts} bursts + {spec.steady_seconds:.0f} s steady, {spec.tenants} tenants"
    )
    results: dict[str, dict[str, Any]] = {}
    records: dict[str, list[CallRecord]] = {}
    timelines: dict[str, list[tuple[float, int]]] = {}
    with Progress(
        TextColumn("{task.description:10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tool calls"),
        console=console,
    ) as bar:
        for strategy in strategies:
            task = bar.add_task(strategy, total=None)

            def progress(done: int, total: int, task: Any = task) -> None:
                bar.update(task, completed=done, total=total)

            results[strategy], records[strategy], timelines[strategy] = asyncio.run(
                run_once(strategy, spec, args.framework, progress, strategy == "toolpool")
            )
            bar.update(task, total=results[strategy]["calls"], completed=results[strategy]["calls"])
    table = Table(title="The seed's economics, measured (same agents, same tools, same run)")
    table.add_column("")
    table.add_column("naive (today)", justify="right")
    pooled = [s for s in strategies if s != "naive"]
    for strategy in pooled:
        table.add_column(COLUMNS[strategy], justify="right")
    for row in table_lines(results, pooled):
        table.add_row(*row)
    console.print(table)
    n = results["naive"]
    for strategy in pooled:
        t = results[strategy]
        if t["p99_ms"]:
            console.print(
                f"{COLUMNS[strategy]}: p99 {n['p99_ms'] / t['p99_ms']:.1f}x better; "
                f"{n['conns_opened']} -> {t['conns_opened']} connections opened; "
                f"{n['tokens']} -> {t['tokens']} token requests."
            )
    paths = charts(results, records, timelines)
    OUT.mkdir(exist_ok=True)
    payload = {"spec": dataclasses.asdict(spec), "framework": args.framework, **results}
    for target in [OUT / "results.json", *([Path(args.json)] if args.json else [])]:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(payload, indent=2))
    console.print("wrote " + ", ".join(str(p) for p in [OUT / "results.json", *paths]))
    if any(results[s]["errors"] or results[s]["mixed_connections"] for s in pooled):
        sys.exit(1)


if __name__ == "__main__":
    main()
