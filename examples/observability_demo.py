"""Watch a pool live: agents' tool calls against three loopback services, metrics served on
http://127.0.0.1:9464/metrics. In another terminal:

    python -m toolpool top            # or point Prometheus + examples/grafana at it

"crm" needs OAuth tokens that expire every 5 s (auth refreshes), "search" is quick,
"billing" answers 503 to most calls (its circuit breaker opens, then probes). Everything runs
on 127.0.0.1; nothing leaves the machine.

    python examples/observability_demo.py --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random

import httpx

import toolpool
import toolpool.auth
import toolpool.metrics
from toolpool.testing import Downstream, ServiceSpec

TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]


def client_of(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None
    return ctx.credentials["client_id"], ctx.credentials["client_secret"]


async def agent(
    pool: toolpool.Pool, ds: Downstream, client: httpx.AsyncClient, n: int, stop: asyncio.Event
) -> None:
    """One agent: bursts of parallel tool calls for its tenant, then a pause."""
    tenant = TENANTS[n % len(TENANTS)]
    ctx = toolpool.AuthContext(
        tenant=tenant, credentials={"client_id": f"{tenant}-app", "client_secret": f"{tenant}-s"}
    )
    rng = random.Random(n)
    with toolpool.auth_context(ctx):
        while not stop.is_set():
            calls = [
                client.get(ds.url(rng.choice(["crm", "crm", "search", "search", "billing"])))
                for _ in range(rng.randint(1, 4))
            ]
            await asyncio.gather(*calls, return_exceptions=True)  # busy / 503: the agent goes on
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(0.05, 0.5))


async def main(seconds: float, port: int, agents: int) -> None:
    services = {
        "crm": ServiceSpec(service_time=(0.02, 0.08), token_latency=(0.05, 0.1), token_ttl=5.0),
        "search": ServiceSpec(require_auth=False, service_time=(0.002, 0.01)),
        "billing": ServiceSpec(require_auth=False, service_time=(0.01, 0.03)),
    }
    async with Downstream(services, tls=True) as ds:
        for tenant in TENANTS:
            ds.register_client(
                "crm", client_id=f"{tenant}-app", client_secret=f"{tenant}-s", tenant=tenant
            )
        ds.set_fault("billing", "status", status=503, probability=0.7)
        auth = toolpool.auth.OAuth2ClientCredentials(ds.token_url("crm"), credentials=client_of)
        pool = toolpool.Pool(
            [
                toolpool.Destination("crm", ds.url("crm"), auth=auth, max_connections=24),
                toolpool.Destination("search", ds.url("search"), max_connections=16),
                toolpool.Destination("billing", ds.url("billing"), max_connections=4),
            ],
            verify=ds.ca_pem_path,
            idle_ttl=3.0,
            health_check_interval=1.0,
        )
        toolpool.metrics.register(pool)
        server = toolpool.metrics.serve(port)
        print(f"metrics at {server.url}; watch with: python -m toolpool top --url {server.url}")
        stop = asyncio.Event()
        async with pool, pool.client(timeout=httpx.Timeout(10.0, pool=None)) as client:
            tasks = [asyncio.create_task(agent(pool, ds, client, n, stop)) for n in range(agents)]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)
            stop.set()
            await asyncio.gather(*tasks)
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="how long to run (30)")
    parser.add_argument("--port", type=int, default=toolpool.metrics.DEFAULT_PORT)
    parser.add_argument("--agents", type=int, default=30, help="concurrent agents (30)")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.seconds, args.port, args.agents))
