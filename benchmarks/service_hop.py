"""The cost of the pool service's extra hop: request latency through `toolpool serve` (agent
-> service -> downstream) against the in-process pool (agent -> downstream), on loopback.

The downstream (toolpool.testing, uvloop) and the service (`python -m toolpool serve`, access
log on, as deployed) each run in their own process. For each concurrency level the client
sends GET /anything in a closed loop: `--requests` measured requests after a warm-up, through
(a) `pool.client()` of an in-process `toolpool.Pool`, and (b) an httpx client on
`toolpool.RemoteTransport` (same URLs, mapped onto the service). Each run records p50 and p99;
the paths alternate within a repetition, and the report gives the median over `--repeat`
repetitions with the min-max spread.

    python benchmarks/service_hop.py --repeat 5 --json benchmarks/out/service_hop.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

import toolpool
from toolpool.testing import ServiceSpec, spawn_downstream

TOKEN = "benchmark-agent-token-0123456789"
PATHS = ("in-process pool", "via toolpool serve")


def _config(url: str) -> str:
    return f"""
[service]
max_request_body = 1048576
[pool]
warmup = 0.0
[destinations.api]
url = "{url}"
max_connections = 64
[agents.bench]
token_env = "BENCH_AGENT_TOKEN"
tenants = ["acme"]
"""


class ServiceChild:
    """`python -m toolpool serve` on a free loopback port, until closed."""

    def __init__(self, config_path: Path, env: dict[str, str] | None = None) -> None:
        env = {**os.environ, "BENCH_AGENT_TOKEN": TOKEN, **(env or {})}
        cmd = [sys.executable, "-m", "toolpool", "serve", "--config", str(config_path)]
        self.proc = subprocess.Popen(
            [*cmd, "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            text=True,
        )
        assert self.proc.stdout is not None
        self.url = json.loads(self.proc.stdout.readline())["url"]
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(self.url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def _measure(
    get: Callable[[], Awaitable[httpx.Response]], concurrency: int, requests: int
) -> list[float]:
    latencies: list[float] = []
    per_worker = max(1, requests // concurrency)

    async def worker(count: int, record: bool) -> None:
        for _ in range(count):
            started = time.perf_counter()
            r = await get()
            r.raise_for_status()
            if record:
                latencies.append(time.perf_counter() - started)

    await asyncio.gather(*[worker(max(5, per_worker // 10), False) for _ in range(concurrency)])
    await asyncio.gather(*[worker(per_worker, True) for _ in range(concurrency)])
    return latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _run(
    path: str, ds_url: str, svc_url: str, concurrency: int, requests: int
) -> dict[str, float]:
    target = ds_url + "/anything"
    ctx = toolpool.AuthContext(tenant="acme")
    if path == PATHS[0]:
        pool = toolpool.Pool([toolpool.Destination("api", ds_url, max_connections=64)], warmup=0)
        async with pool:
            client = pool.client()
            with toolpool.auth_context(ctx):
                lat = await _measure(lambda: client.get(target), concurrency, requests)
    else:
        remote = toolpool.RemotePool(svc_url, token=TOKEN, max_connections=64)
        async with remote, remote.client() as client:
            with toolpool.auth_context(ctx):
                lat = await _measure(lambda: client.get(target), concurrency, requests)
    return {"p50_ms": _pct(lat, 0.5) * 1000, "p99_ms": _pct(lat, 0.99) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        p: {c: [] for c in args.concurrency} for p in PATHS
    }
    with (
        spawn_downstream({"api": ServiceSpec(require_auth=False)}) as ds,
        tempfile.TemporaryDirectory() as tmp,
    ):
        config = Path(tmp) / "toolpool.toml"
        config.write_text(_config(ds.url("api")))
        service = ServiceChild(config)
        try:
            for rep in range(args.repeat):
                for c in args.concurrency:
                    order = PATHS if rep % 2 == 0 else PATHS[::-1]
                    for path in order:
                        runs[path][c].append(
                            asyncio.run(_run(path, ds.url("api"), service.url, c, args.requests))
                        )
        finally:
            service.close()
    summary: dict[str, Any] = {"repeat": args.repeat, "requests": args.requests, "results": []}
    print(f"{'path':22} {'conc':>4} {'p50 ms (min-max)':>22} {'p99 ms (min-max)':>22}")
    for c in args.concurrency:
        for path in PATHS:
            p50s = [r["p50_ms"] for r in runs[path][c]]
            p99s = [r["p99_ms"] for r in runs[path][c]]
            row = {
                "path": path,
                "concurrency": c,
                "p50_ms_median": statistics.median(p50s),
                "p50_ms_min": min(p50s),
                "p50_ms_max": max(p50s),
                "p99_ms_median": statistics.median(p99s),
                "p99_ms_min": min(p99s),
                "p99_ms_max": max(p99s),
            }
            summary["results"].append(row)
            p50 = f"{row['p50_ms_median']:8.3f} ({row['p50_ms_min']:.3f}-{row['p50_ms_max']:.3f})"
            p99 = f"{row['p99_ms_median']:8.3f} ({row['p99_ms_min']:.3f}-{row['p99_ms_max']:.3f})"
            print(f"{path:22} {c:>4} {p50} {p99}")
        local = statistics.median(r["p50_ms"] for r in runs[PATHS[0]][c])
        remote = statistics.median(r["p50_ms"] for r in runs[PATHS[1]][c])
        hops = [
            b["p50_ms"] - a["p50_ms"]
            for a, b in zip(runs[PATHS[0]][c], runs[PATHS[1]][c], strict=True)
        ]
        summary.setdefault("added_p50_ms", {})[str(c)] = {
            "median": remote - local,
            "min": min(hops),
            "max": max(hops),
        }
        spread = f"per-rep {min(hops):.3f}-{max(hops):.3f}"
        print(f"  added hop at concurrency {c}: p50 +{remote - local:.3f} ms ({spread})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
