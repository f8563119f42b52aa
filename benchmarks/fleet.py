"""Fleet-wide caps on Redis against the static share: three `toolpool serve` replicas in front of
one downstream whose cap is 12, load spread 80/10/10 over the replicas.

Everything runs on loopback in its own process: a `redis-server` on a free port, the test-bed
downstream (`toolpool.testing`, 250 ms per request, answers 503 beyond 12 in progress), and three
`python -m toolpool serve` replicas. The client (this process) runs closed-loop workers,
`--workers` in all (default 50), 80 % on replica 0 and 10 % on each of the others, for
`--seconds` after a warm-up. Two configurations, alternating within each repetition:

    static   [limits] replicas = 3: each replica's pool is capped at floor(12 / 3) = 4
    redis    [limits] provider = "redis": leases of the cap of 12, rebalanced by demand

Both allow a queue of 10x the cap (`[pool] queue_factor` for the static pools, `[limits]
queue_factor` for the fleet's permits): the busy replica's workers wait, none is refused. Reported
per configuration and replica: p50 and p99 latency, requests served, and the downstream's peak
requests in progress (must stay <= 12); the median over `--repeat` repetitions with the
min-max spread, and the busy replica's p99 ratio static / redis per repetition.

Why 50 workers by default: with a fixed service time a request's latency is a whole number of
service times (waiting rounds), so p99 is quantized. With 40 workers the busy replica's 32
callers on a lease of 10 wait 3 rounds or, for 20 % of requests, 4 (p99 = 4 rounds) against
exactly 8 rounds on the static 4: the p99 ratio's ceiling is 2.0 even though the lease gives
2.5× the throughput. With 50 workers (40 callers) it is 4 rounds against 10: 2.5×.

`--sigkill N` measures instead, N times, how long a SIGKILLed replica's capacity stays unused:
three redis-mode replicas with the default lease settings (lease_ttl 3 s), 8 closed-loop
workers each (demand 8 + 8 + 8 for a cap of 12: 4 each), replica 2 killed with SIGKILL once the
server has the whole cap in progress; the time from the kill until the server has the whole
cap in progress again (the survivors were granted the dead replica's share and use it).

    python benchmarks/fleet.py --repeat 5 --seconds 12 --json benchmarks/out/fleet.json
    python benchmarks/fleet.py --sigkill 10 --json benchmarks/out/fleet_sigkill.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from service_hop import TOKEN, ServiceChild  # benchmarks/ is on sys.path as a script

from toolpool.testing import ServiceSpec, spawn_downstream

CAP = 12
CONFIGS = ("static", "redis")
SPLIT = (0.8, 0.1, 0.1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(url: str, kind: str) -> str:
    limits = (
        '[limits]\nprovider = "redis"\nurl_env = "TOOLPOOL_REDIS_URL"\nreplicas = 3\n'
        "queue_factor = 10.0\n"
        if kind == "redis"
        else "[limits]\nreplicas = 3\n"
    )
    return f"""
[service]
access_log = false
[pool]
warmup = 0.0
policy = "off"
queue_factor = 10.0
{limits}
[destinations.api]
url = "{url}"
max_connections = {CAP}
[agents.bench]
token_env = "BENCH_AGENT_TOKEN"
tenants = ["acme"]
"""


class Redis:
    def __init__(self, workdir: str) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise SystemExit("needs redis-server: apt-get install -y redis-server")
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Replica(ServiceChild):
    """`python -m toolpool serve` on a free loopback port with the fleet's Redis, until closed."""

    def __init__(self, config_path: Path, redis_url: str) -> None:
        super().__init__(config_path, env={"TOOLPOOL_REDIS_URL": redis_url})


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _storm(urls: list[str], workers: int, seconds: float, warmup: float) -> list[list[float]]:
    counts = [round(workers * share) for share in SPLIT]
    latencies: list[list[float]] = [[] for _ in urls]
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Toolpool-Tenant": "acme"}
    clients = [
        httpx.AsyncClient(base_url=u, headers=headers, timeout=60,
                          limits=httpx.Limits(max_connections=workers))
        for u in urls
    ]  # fmt: skip
    start = time.monotonic()
    measure_from = start + warmup
    end = measure_from + seconds
    errors: list[str] = []

    async def worker(i: int) -> None:
        while True:
            began = time.monotonic()
            if began >= end:
                return
            r = await clients[i].get("/d/api/anything")
            if r.status_code != 200:
                errors.append(r.text[:200])
            elif began >= measure_from:
                latencies[i].append(time.monotonic() - began)

    try:
        await asyncio.gather(*(worker(i) for i, n in enumerate(counts) for _ in range(n)))
    finally:
        for c in clients:
            await c.aclose()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return latencies


def _run(
    kind: str, ds: Any, redis: Redis, workdir: Path, args: argparse.Namespace
) -> dict[str, Any]:
    path = workdir / f"{kind}.toml"
    path.write_text(_config(ds.url("api"), kind), encoding="utf-8")
    replicas = [Replica(path, redis.url) for _ in range(3)]
    try:
        ds.reset_stats("api")
        lat = asyncio.run(_storm([r.url for r in replicas], args.workers, args.seconds, 3.0))
        peak = ds.stats("api").peak_requests_in_progress
    finally:
        for r in replicas:
            r.close()
    return {
        "peak_in_progress": peak,
        "replicas": [
            {"p50_ms": _pct(v, 0.5) * 1000, "p99_ms": _pct(v, 0.99) * 1000, "requests": len(v)}
            for v in lat
        ],
    }


async def _kill_and_time(ds: Any, replicas: list[Replica], warmup: float) -> float:
    headers = {"Authorization": f"Bearer {TOKEN}", "X-Toolpool-Tenant": "acme"}
    clients = [httpx.AsyncClient(base_url=r.url, headers=headers, timeout=60) for r in replicas]
    stop = asyncio.Event()
    errors: list[str] = []

    async def worker(i: int) -> None:
        while not stop.is_set():
            try:
                r = await clients[i].get("/d/api/anything")
            except httpx.HTTPError:
                if i == 2:
                    return  # the killed replica's callers stop
                raise
            if r.status_code != 200:
                errors.append(r.text[:200])

    tasks = [asyncio.create_task(worker(i)) for i in range(3) for _ in range(8)]
    try:
        await asyncio.sleep(warmup)
        await asyncio.to_thread(ds.wait_stats, "api", lambda s: s.requests_in_progress == CAP)
        replicas[2].proc.kill()
        killed = time.monotonic()
        # Its last requests end (the survivors alone hold 8), then the whole cap again.
        await asyncio.to_thread(ds.wait_stats, "api", lambda s: s.requests_in_progress <= 8)
        await asyncio.to_thread(ds.wait_stats, "api", lambda s: s.requests_in_progress == CAP, 20.0)
        back = time.monotonic() - killed
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        for c in clients:
            await c.aclose()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    return back


def _sigkill(ds: Any, redis: Redis, workdir: Path, times: int) -> list[float]:
    path = workdir / "sigkill.toml"
    path.write_text(_config(ds.url("api"), "redis"), encoding="utf-8")
    out = []
    for rep in range(times):
        replicas = [Replica(path, redis.url) for _ in range(3)]
        try:
            back = asyncio.run(_kill_and_time(ds, replicas, 4.0))
        finally:
            for r in replicas:
                if r.proc.poll() is None:
                    r.close()
        out.append(back)
        print(f"rep {rep + 1} SIGKILL: whole cap in use again after {back:.3f} s", flush=True)
    return out


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--sigkill", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.sigkill:
        spec = ServiceSpec(require_auth=False, service_time=0.25, concurrency_limit=CAP)
        with tempfile.TemporaryDirectory() as tmp, spawn_downstream({"api": spec}) as ds:
            redis = Redis(tmp)
            try:
                times = _sigkill(ds, redis, Path(tmp), args.sigkill)
            finally:
                redis.close()
        print(
            f"\nSIGKILL, lease_ttl 3.0 s: whole cap in use again after median "
            f"{statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}, "
            f"n={len(times)})"
        )
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"sigkill_seconds": times}, indent=2))
        return
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CONFIGS}
    spec = ServiceSpec(require_auth=False, service_time=0.25, concurrency_limit=CAP)
    with tempfile.TemporaryDirectory() as tmp, spawn_downstream({"api": spec}) as ds:
        redis = Redis(tmp)
        try:
            for rep in range(args.repeat):
                order = CONFIGS if rep % 2 == 0 else CONFIGS[::-1]
                for kind in order:
                    result = _run(kind, ds, redis, Path(tmp), args)
                    runs[kind].append(result)
                    busy = result["replicas"][0]
                    print(
                        f"rep {rep + 1} {kind:6s} busy p50 {busy['p50_ms']:.1f} ms "
                        f"p99 {busy['p99_ms']:.1f} ms, peak {result['peak_in_progress']}",
                        flush=True,
                    )
        finally:
            redis.close()
    print(f"\n{args.workers} workers split 80/10/10, cap {CAP}, 250 ms per request")
    print("| config | replica | p50 ms | p99 ms | requests | peak in progress |")
    print("|---|---|---|---|---|---|")
    for kind in CONFIGS:
        for i in range(3):
            rows = [r["replicas"][i] for r in runs[kind]]
            print(
                f"| {kind} | {i} ({int(SPLIT[i] * 100)} %) | "
                f"{_summary([r['p50_ms'] for r in rows])} | "
                f"{_summary([r['p99_ms'] for r in rows])} | "
                f"{_summary([float(r['requests']) for r in rows])} | "
                f"{max(r['peak_in_progress'] for r in runs[kind])} |"
            )
    ratios = [
        s["replicas"][0]["p99_ms"] / r["replicas"][0]["p99_ms"]
        for s, r in zip(runs["static"], runs["redis"], strict=True)
    ]
    print(
        f"\nbusy replica p99, static / redis: median {statistics.median(ratios):.2f}x "
        f"(per repetition {', '.join(f'{x:.2f}' for x in ratios)})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"runs": runs, "busy_p99_ratio": ratios}, indent=2))


if __name__ == "__main__":
    main()
