"""The seed's connection storm without agent frameworks: the same tool-call traffic through
four client strategies, against the same downstream, with the seed's numbers for each.

    python benchmarks/storm.py --repeat 3 --json benchmarks/out/storm.json

The downstream (toolpool.testing in its own process, uvloop): five TLS services behind 25 ms
latency relays, OAuth2 token endpoints answering in 100-300 ms, 20-50 ms service times and an
nginx-style limit of concurrent requests per service (503 above it). The agents: 100, each
task 3-5 parallel tool calls, three bursts then a steady phase (toolpool.testing.storm).

Strategies (tool code as it is written today, except where the strategy says otherwise):
  naive          a new httpx.AsyncClient and a new token per tool call, 3 attempts on 503/429
  shared-httpx   one shared httpx.AsyncClient (default limits), tokens cached per tenant
  aiohttp        one shared aiohttp.ClientSession (limit 100), tokens cached per tenant
  toolpool       one toolpool.Pool: max_connections per service, OAuth2ClientCredentials
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import toolpool
from toolpool.testing import spawn_downstream
from toolpool.testing.storm import (
    CallRecord,
    StormSpec,
    TaskPlan,
    register_tenants,
    run_storm,
    summarize,
    timed_call,
)

STRATEGIES = ("naive", "shared-httpx", "aiohttp", "toolpool")
RETRY_STATUSES = (429, 503)


class SetupClock:
    """Seconds spent setting up: TCP connect + TLS handshake, and token fetches."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def tracer(self) -> Callable[[str, dict[str, Any]], Awaitable[None]]:
        """A fresh httpcore trace callback (httpx's `trace` request extension)."""
        started: dict[str, float] = {}

        async def trace(event: str, info: dict[str, Any]) -> None:
            step, _, phase = event.rpartition(".")
            if step not in ("connection.connect_tcp", "connection.start_tls"):
                return
            if phase == "started":
                started[step] = time.perf_counter()
            elif phase in ("complete", "failed") and step in started:
                self.seconds += time.perf_counter() - started.pop(step)

        return trace


async def _retrying(send: Callable[[], Awaitable[int]], rng: random.Random) -> None:
    """How tool code retries today: up to 3 attempts on 503/429, exponential backoff."""
    for attempt in range(3):
        status = await send()
        if status not in RETRY_STATUSES:
            if status >= 400:
                raise RuntimeError(f"HTTP {status}")
            return
        if attempt < 2:
            await asyncio.sleep(0.2 * 2**attempt * (0.5 + rng.random()))
    raise RuntimeError(f"HTTP {status} after 3 attempts")


async def run_strategy(name: str, spec: StormSpec, args: argparse.Namespace) -> dict[str, Any]:
    with spawn_downstream(spec.service_specs(), tls=spec.tls, latency=spec.latency) as ds:
        clients = register_tenants(ds, spec)
        urls = {s: ds.url(s) for s in spec.services}
        sslctx = ds.client_ssl_context()
        rng = random.Random(spec.seed)
        clock = SetupClock()
        cleanup: list[Callable[[], Awaitable[None]]] = []
        tokens: dict[tuple[str, str], str] = {}
        extra: dict[str, Any] = {}

        async def token_with(client: httpx.AsyncClient, service: str, tenant: str) -> str:
            t0 = time.perf_counter()
            client_id, secret = clients[tenant]
            r = await client.post(
                urls[service] + "/oauth/token",
                data={"grant_type": "client_credentials"},
                auth=(client_id, secret),
                extensions={"trace": clock.tracer()},
            )
            r.raise_for_status()
            clock.seconds += time.perf_counter() - t0
            return str(r.json()["access_token"])

        if name == "naive":

            async def call(service: str, plan: TaskPlan) -> None:
                async def send() -> int:
                    async with httpx.AsyncClient(verify=sslctx, timeout=30) as client:
                        token = await token_with(client, service, plan.tenant)
                        r = await client.get(
                            urls[service] + "/anything",
                            headers={"Authorization": f"Bearer {token}"},
                            extensions={"trace": clock.tracer()},
                        )
                        return r.status_code

                await _retrying(send, rng)

        elif name == "shared-httpx":
            shared = httpx.AsyncClient(verify=sslctx, timeout=30)
            cleanup.append(shared.aclose)

            async def call(service: str, plan: TaskPlan) -> None:
                async def send() -> int:
                    key = (service, plan.tenant)
                    if key not in tokens:
                        tokens[key] = await token_with(shared, service, plan.tenant)
                    r = await shared.get(
                        urls[service] + "/anything",
                        headers={"Authorization": f"Bearer {tokens[key]}"},
                        extensions={"trace": clock.tracer()},
                    )
                    return r.status_code

                await _retrying(send, rng)

        elif name == "aiohttp":
            import aiohttp

            trace = aiohttp.TraceConfig()
            starts: dict[int, float] = {}

            async def on_start(_s: Any, ctx: Any, _p: Any) -> None:
                starts[id(ctx)] = time.perf_counter()

            async def on_end(_s: Any, ctx: Any, _p: Any) -> None:
                clock.seconds += time.perf_counter() - starts.pop(id(ctx), time.perf_counter())

            trace.on_connection_create_start.append(on_start)
            trace.on_connection_create_end.append(on_end)
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=100, ssl=sslctx), trace_configs=[trace]
            )
            cleanup.append(session.close)

            async def aio_token(service: str, tenant: str) -> str:
                t0 = time.perf_counter()
                client_id, secret = clients[tenant]
                async with session.post(
                    urls[service] + "/oauth/token",
                    data={"grant_type": "client_credentials"},
                    auth=aiohttp.BasicAuth(client_id, secret),
                ) as r:
                    body = await r.json()
                clock.seconds += time.perf_counter() - t0
                return str(body["access_token"])

            async def call(service: str, plan: TaskPlan) -> None:
                async def send() -> int:
                    key = (service, plan.tenant)
                    if key not in tokens:
                        tokens[key] = await aio_token(service, plan.tenant)
                    async with session.get(
                        urls[service] + "/anything",
                        headers={"Authorization": f"Bearer {tokens[key]}"},
                    ) as r:
                        await r.read()
                        return r.status

                await _retrying(send, rng)

        elif name == "toolpool":
            destinations = [
                toolpool.Destination(
                    service,
                    urls[service],
                    documented_limit=spec.concurrency_limit,
                    queue_factor=args.toolpool_queue_factor,
                    verify=ds.ca_pem_path,
                    auth=toolpool.auth.OAuth2ClientCredentials(
                        token_url=urls[service] + "/oauth/token",
                        credentials=lambda ctx: clients[ctx.tenant],
                    ),
                )
                for service in spec.services
            ]
            pool = toolpool.Pool(destinations)
            await pool.astart()
            cleanup.append(pool.aclose)
            client = pool.client(timeout=30)

            async def call(service: str, plan: TaskPlan) -> None:
                with toolpool.auth_context(toolpool.AuthContext(tenant=plan.tenant)):
                    r = await client.get(urls[service] + "/anything")
                r.raise_for_status()

            def pool_setup_seconds() -> float:
                total = 0.0
                for d in pool._by_name.values():
                    total += d.state.create_time.sum
                    if d.auth is not None:
                        total += d.auth.stats().fetch_duration_sum_seconds
                return total

        else:
            raise SystemExit(f"unknown strategy {name!r}")

        async def task(plan: TaskPlan) -> list[CallRecord]:
            return list(
                await asyncio.gather(
                    *[timed_call(s, plan, lambda s=s: call(s, plan)) for s in plan.services]
                )
            )

        ds.reset_stats()
        t0 = time.perf_counter()
        records = await run_storm(spec, task)
        duration = time.perf_counter() - t0
        if name == "toolpool":
            clock.seconds = pool_setup_seconds()
            stats = pool.stats()
            extra["pool_created_total"] = stats.created_total
            closed: dict[str, int] = {}
            for d in stats.values():
                for reason, n in d.closed_total.items():
                    closed[reason] = closed.get(reason, 0) + n
            extra["pool_closed_by_reason"] = {k: v for k, v in closed.items() if v}
        for close in cleanup:
            await close()
        server = {s: ds.stats(s) for s in spec.services}
        report = summarize(
            name, records, server, setup_seconds=clock.seconds, duration=duration, extra=extra
        )
    return report.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--agents", type=int, default=100)
    parser.add_argument("--steady", type=float, default=10.0, help="steady phase, seconds")
    parser.add_argument("--tenants", type=int, default=10, help="tenants the agents act for")
    parser.add_argument("--toolpool-queue-factor", type=float, default=8.0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    spec = StormSpec(agents=args.agents, steady_seconds=args.steady, tenants=args.tenants)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        for name in args.strategies.split(","):
            row = asyncio.run(run_strategy(name, spec, args))
            row["repeat"] = rep
            runs.append(row)
            print(json.dumps(row), file=sys.stderr)
    table = render(runs)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"spec": spec.__dict__, "runs": runs}, indent=2))


def render(runs: list[dict[str, Any]]) -> str:
    """Median (and min-max) per strategy of the seed's numbers."""
    cols = [
        ("p50_ms", "p50 ms"),
        ("p99_ms", "p99 ms"),
        ("burst_p99_ms", "burst p99 ms"),
        ("conns_opened", "conns opened"),
        ("peak_conns", "peak conns"),
        ("http_503", "503s"),
        ("errors", "errors"),
        ("tokens", "tokens"),
        ("setup_s_per_min", "setup s/min"),
    ]
    by: dict[str, list[dict[str, Any]]] = {}
    for row in runs:
        by.setdefault(row["strategy"], []).append(row)
    lines = [
        "| strategy | " + " | ".join(c[1] for c in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, rows in by.items():
        cells = []
        for key, _ in cols:
            values = [r[key] for r in rows]
            med = statistics.median(values)
            cells.append(
                f"{med:.0f}"
                if len(values) == 1
                else f"{med:.0f} [{min(values):.0f}-{max(values):.0f}]"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
