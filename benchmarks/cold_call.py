"""Cold-call latency with and without preconnect (a measurement, not a test).

A cold call (new pool, no connection, no token) to an OAuth 2 protected destination whose
token endpoint is another destination: with `TokenPolicy(preconnect=True)` the API connection
(TCP + TLS) is opened while the token is fetched; without, after it. Both services sit behind
`LatencyRelay`s (one-way delay below), the token endpoint answers after 50 ms.

    .venv/bin/python benchmarks/cold_call.py [one_way_seconds] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import toolpool
from toolpool.testing import Downstream, LatencyRelay, ServiceSpec


async def cold_call(ds: Downstream, idp_url: str | None, preconnect: bool, tenant: str) -> float:
    token_url = (idp_url or ds.url("crm")) + "/oauth/token"
    provider = toolpool.auth.OAuth2ClientCredentials(
        token_url,
        credentials=(f"{tenant}-app", "bench-secret"),
        policy=toolpool.auth.TokenPolicy(preconnect=preconnect),
    )
    dests = [toolpool.Destination("crm", ds.url("crm"), auth=provider, verify=ds.ca_pem_path)]
    if idp_url is not None:
        dests.append(toolpool.Destination("idp", idp_url, verify=ds.ca_pem_path))
    async with toolpool.Pool(dests, warmup=0.0) as pool, pool.client() as client:
        started = time.perf_counter()
        response = await client.get(ds.url("crm") + "/anything")
        elapsed = time.perf_counter() - started
        assert response.json()["tenant"] == tenant
    return elapsed


async def main(one_way: float, rounds: int) -> None:
    spec = ServiceSpec(token_latency=0.05)
    async with Downstream({"crm": spec}, tls=True, latency=one_way) as ds:
        host, port = ds.address("crm", direct=True)
        async with LatencyRelay(host, port, one_way=one_way) as idp:
            idp_url = idp.url("https")
            modes = {
                "token endpoint on another destination, preconnect": (idp_url, True),
                "token endpoint on another destination, no preconnect": (idp_url, False),
                "token endpoint on the API destination": (None, True),
            }
            results: dict[str, list[float]] = {name: [] for name in modes}
            for i in range(rounds):
                for name, (url, pre) in modes.items():
                    tenant = f"t{i}-{len(results[name])}-{pre}-{url is None}"
                    ds.register_client(
                        "crm",
                        client_id=f"{tenant}-app",
                        client_secret="bench-secret",
                        tenant=tenant,
                    )
                    results[name].append(await cold_call(ds, url, pre, tenant))
    print(
        f"cold call, one-way latency {one_way * 1000:.0f} ms (RTT {2 * one_way * 1000:.0f} ms), "
        f"token endpoint 50 ms, TLS, {rounds} rounds (median / min):"
    )
    for name, values in results.items():
        print(
            f"  {name:55s} {statistics.median(values) * 1000:6.1f} ms / "
            f"{min(values) * 1000:6.1f} ms"
        )


if __name__ == "__main__":
    one_way = float(sys.argv[1]) if len(sys.argv) > 1 else 0.02
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    asyncio.run(main(one_way, rounds))
