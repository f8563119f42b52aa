"""What toolpool.otel costs per request: client CPU time per request with tracing off, with
the OpenTelemetry API only (no SDK configured), and with the SDK recording every span and
metric, measured in interleaved rounds in one process.

Throughput on a shared 2-core machine swings with whatever else runs; the client's CPU time
per request moves much less, and interleaving the variants round by round (in a shuffled
order) spreads any drift over all of them. The downstream (toolpool.testing) runs in its own
process, so this process's CPU time is the client's alone.

    python benchmarks/otel_cost.py --rounds 15 --requests 400 --json benchmarks/out/otel_cost.json

Variants (each its own pool against the same service, `pool.request` and `pool.client()`):
  off       not instrumented (what every pool is unless toolpool.otel.instrument is called)
  api       toolpool.otel.instrument() with the API's no-op providers (no SDK configured)
  sdk       SDK TracerProvider + BatchSpanProcessor (its exporter drops the batches) and an
            SDK MeterProvider: every span and measurement recorded
  sdk-traces / sdk-metrics   the SDK for one of the two only (instrument(metrics=False) /
            instrument(traces=False))
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import toolpool
from toolpool.testing import ServiceSpec, spawn_downstream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import _instrument, hook_cost

VARIANTS = {
    "off": "",
    "api": "+otel-api",
    "sdk": "+otel-sdk",
    "sdk-traces": "+otel-sdk-traces",
    "sdk-metrics": "+otel-sdk-metrics",
}


async def _measure(
    send: Callable[[], Awaitable[Any]], requests: int, concurrency: int
) -> tuple[float, float]:
    """(client CPU µs per request, wall µs per request) for `requests` sends."""
    per_task = requests // concurrency

    async def worker() -> None:
        for _ in range(per_task):
            await send()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    done = per_task * concurrency
    return 1e6 * (time.process_time() - cpu0) / done, 1e6 * (time.perf_counter() - t0) / done


async def run(url: str, ca: str | None, args: argparse.Namespace) -> list[dict[str, Any]]:
    target = url + "/anything"
    pools: dict[str, toolpool.Pool] = {}
    stops = []
    for name, suffix in VARIANTS.items():
        pool = toolpool.Pool(
            [toolpool.Destination("api", url, max_connections=100, verify=ca or True)],
            warmup=0,
        )
        stops.append(_instrument(pool, "toolpool-lean" + suffix))
        await pool.astart()
        pools[name] = pool
    clients = {name: pool.client() for name, pool in pools.items()}
    senders: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {}
    for name in VARIANTS:
        pool, client = pools[name], clients[name]
        senders[(name, "lean")] = lambda pool=pool: pool.request("GET", target)
        senders[(name, "httpx")] = lambda client=client: client.get(target)
    rows = []
    try:
        for send in senders.values():  # warm connections and caches
            await _measure(send, 100, 10)
        order = list(senders)
        rng = random.Random(7)
        for rnd in range(args.rounds):
            rng.shuffle(order)
            for variant, path in order:
                cpu, wall = await _measure(
                    senders[(variant, path)], args.requests, args.concurrency
                )
                rows.append(
                    {"round": rnd, "variant": variant, "path": path, "cpu_us": cpu, "wall_us": wall}
                )
    finally:
        for client in clients.values():
            await client.aclose()
        for pool in pools.values():
            await pool.aclose()
        for stop in stops:
            stop()
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for path in ("lean", "httpx"):
        off = [r for r in rows if r["path"] == path and r["variant"] == "off"]
        base = statistics.median(r["cpu_us"] for r in off)
        for variant in VARIANTS:
            mine = [r for r in rows if r["path"] == path and r["variant"] == variant]
            cpus = [r["cpu_us"] for r in mine]
            # Added cost per round against the same round's "off" (pairs drift together).
            added = [
                r["cpu_us"] - next(o["cpu_us"] for o in off if o["round"] == r["round"])
                for r in mine
            ]
            out.append(
                {
                    "path": path,
                    "variant": variant,
                    "cpu_us_median": statistics.median(cpus),
                    "cpu_us_min": min(cpus),
                    "cpu_us_max": max(cpus),
                    "added_us_median": statistics.median(added),
                    "added_us_q1": statistics.quantiles(added, n=4)[0] if len(added) > 1 else 0,
                    "added_us_q3": statistics.quantiles(added, n=4)[2] if len(added) > 1 else 0,
                    "ratio_cpu": statistics.median(cpus) / base,
                }
            )
    return out


def render(summary: list[dict[str, Any]], args: argparse.Namespace, mode: str) -> str:
    lines = [
        f"toolpool.otel cost, {mode}, {os.cpu_count()} cores, {args.rounds} interleaved rounds "
        f"of {args.requests} requests at concurrency {args.concurrency}",
        "",
        "| path | tracing | client CPU µs/req, median [min-max] | added µs/req vs off, median "
        "[q1-q3] | × off |",
        "|---|---|---|---|---|",
    ]
    for c in summary:
        lines.append(
            f"| {c['path']} | {c['variant']} | {c['cpu_us_median']:.0f} "
            f"[{c['cpu_us_min']:.0f}-{c['cpu_us_max']:.0f}] | {c['added_us_median']:+.0f} "
            f"[{c['added_us_q1']:+.0f} to {c['added_us_q3']:+.0f}] | {c['ratio_cpu']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--json", help="write rows and summary here")
    args = parser.parse_args()
    mode = "tls" if args.tls else "plain"
    with spawn_downstream({"api": ServiceSpec(require_auth=False)}, tls=args.tls) as ds:
        rows = asyncio.run(run(ds.url("api"), ds.ca_pem_path if args.tls else None, args))
    summary = summarize(rows)
    print(render(summary, args, mode))
    print()
    print(hook_cost(5))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
