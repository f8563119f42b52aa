"""Cold-call latency with and without preconnect (a measurement, not a test).

A cold call (new pool, no connection, no token) to an OAuth 2 protected destination whose
token endpoint is another destination: with `TokenPolicy(preconnect=True)` the API connection
(TCP + TLS) is opened while the token is fetched; without, after it. Both services sit behind
`LatencyRelay`s (one-way delay below), the token endpoint answers after 50 ms.

Each round runs every mode on HTTP/2 (the default on https://: ALPN offers h2, the first
stream goes out right after the connection preface, without waiting for the server's
SETTINGS) and on HTTP/1.1 (`http2=False`), interleaved, so both protocols see the same
machine load; the last column is HTTP/2's median over HTTP/1.1's in the same run.

    .venv/bin/python benchmarks/cold_call.py [one_way_seconds] [rounds]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

import toolpool
from toolpool.testing import Downstream, LatencyRelay, ServiceSpec


async def cold_call(
    ds: Downstream, idp_url: str | None, preconnect: bool, tenant: str, http2: bool
) -> float:
    token_url = (idp_url or ds.url("crm")) + "/oauth/token"
    provider = toolpool.auth.OAuth2ClientCredentials(
        token_url,
        credentials=(f"{tenant}-app", "bench-secret"),
        policy=toolpool.auth.TokenPolicy(preconnect=preconnect),
    )
    dests = [toolpool.Destination("crm", ds.url("crm"), auth=provider, verify=ds.ca_pem_path)]
    if idp_url is not None:
        dests.append(toolpool.Destination("idp", idp_url, verify=ds.ca_pem_path))
    async with toolpool.Pool(dests, warmup=0.0, http2=http2) as pool, pool.client() as client:
        started = time.perf_counter()
        response = await client.get(ds.url("crm") + "/anything")
        elapsed = time.perf_counter() - started
        assert response.json()["tenant"] == tenant
        assert response.http_version == ("HTTP/2" if http2 else "HTTP/1.1")
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
            results: dict[tuple[str, bool], list[float]] = {
                (name, http2): [] for name in modes for http2 in (True, False)
            }
            for i in range(rounds):
                for (name, http2), values in results.items():
                    url, pre = modes[name]
                    tenant = f"t{i}-{len(values)}-{pre}-{url is None}-{http2}"
                    ds.register_client(
                        "crm",
                        client_id=f"{tenant}-app",
                        client_secret="bench-secret",
                        tenant=tenant,
                    )
                    values.append(await cold_call(ds, url, pre, tenant, http2))
    print(
        f"cold call, one-way latency {one_way * 1000:.0f} ms (RTT {2 * one_way * 1000:.0f} ms), "
        f"token endpoint 50 ms, TLS, {rounds} rounds (median [min-max] ms; h2/h1.1 medians):"
    )
    for name in modes:
        medians = {}
        for http2 in (True, False):
            values = results[(name, http2)]
            medians[http2] = statistics.median(values)
            print(
                f"  {name:53s} {'HTTP/2  ' if http2 else 'HTTP/1.1'} "
                f"{medians[http2] * 1000:6.1f} [{min(values) * 1000:6.1f}-"
                f"{max(values) * 1000:6.1f}]"
            )
        print(f"  {'':53s} h2/h1.1  {medians[True] / medians[False]:.2f}x")


if __name__ == "__main__":
    one_way = float(sys.argv[1]) if len(sys.argv) > 1 else 0.02
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 15
    asyncio.run(main(one_way, rounds))
