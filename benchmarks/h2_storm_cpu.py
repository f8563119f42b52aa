"""What bounds the storm's p99 on HTTP/2: CPU per call on each side, queueing at the cap, and
the event loop's lag, measured on `make demo`'s toolpool run (HTTP/2 and HTTP/1.1, interleaved).

    python benchmarks/h2_storm_cpu.py --rounds 2 --json benchmarks/out/h2_storm_cpu.json
    python benchmarks/h2_storm_cpu.py --rounds 1 --profile benchmarks/out/h2_storm   # cProfile

Per run, over the storm only (after warm-up, as the demo counts):
- client CPU per call: `time.process_time()` of this process (agents, framework, toolpool,
  TLS; everything the demo's client side runs) divided by the tool calls;
- server CPU per call: user + system time of the test bed's process (/proc/PID/stat: the five
  TLS services, their HTTP/2 or HTTP/1.1 side, the OAuth endpoints and the 25 ms latency
  relays) divided by the tool calls;
- machine CPU: both processes' CPU seconds per wall second (2.0 = both cores full), and the
  load average (other work on the machine);
- queueing at the cap: the pool's own wait statistics (requests that waited for a stream /
  connection permit, their mean and p99 wait), per run, summed over the five services;
- event-loop lag: a task that sleeps 5 ms and records how late it wakes (p50 / p99 / max):
  how long callbacks that are ready wait for the (single-threaded) client loop.
`--profile DIR`: one more run per protocol under cProfile with a CPU clock; the client's CPU
split by where it is spent (h2 + hpack + hyperframe, toolpool, TLS, httpx, asyncio, the
framework, other), written to DIR-<protocol>.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import httpx
import storm_demo
from storm_demo import (
    RUNNERS,
    Downstream,
    probe_costs,
    storm_pool,
    warmup_counted,
)

from toolpool.testing import spawn_downstream
from toolpool.testing.storm import StormSpec, register_tenants, run_storm, summarize

TICKS = os.sysconf("SC_CLK_TCK")


#: (seconds in call_service, seconds waited for a permit at the cap) per tool call.
EXCHANGES: list[tuple[float, float]] = []


async def call_service_timed(service: str, tenant: str, query: str) -> dict[str, Any]:
    """The demo's tool body for the pool run (no per-call token), recording how long the
    call waited for a stream/connection permit (the pool's `wait_seconds` extension)."""
    ds = storm_demo.DOWNSTREAM
    assert ds is not None
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=30) as client:
        waited = 0.0
        for attempt in range(3):
            r = await client.get(ds.urls[service] + "/anything", params={"q": query})
            waited += float(r.extensions.get("toolpool", {}).get("wait_seconds") or 0.0)
            if r.status_code not in (429, 503) or attempt == 2:
                break
            await asyncio.sleep(0.2 * 2**attempt)
        r.raise_for_status()
        body = dict(r.json())
    EXCHANGES.append((time.perf_counter() - t0, waited))
    return body


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def lag_monitor(lags: list[float], stop: asyncio.Event, period: float = 0.005) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t0 = loop.time()
        await asyncio.sleep(period)
        lags.append(loop.time() - t0 - period)


CATEGORIES = [
    ("h2 + hpack + hyperframe", ("/h2/", "/hpack/", "/hyperframe/")),
    ("toolpool", ("/toolpool/",)),
    ("TLS (ssl)", ("ssl.py", "_ssl.")),
    ("httpx / httpcore", ("/httpx/", "/httpcore/")),
    ("asyncio", ("/asyncio/", "selectors.py", "select.epoll")),
    ("framework (langchain, pydantic, ...)", ("/langchain", "/langgraph", "/pydantic")),
]


def _category(filename: str, name: str) -> str | None:
    where = f"{filename}:{name}"
    for category, needles in CATEGORIES:
        if any(n in where for n in needles):
            return category
    return None


def split_profile(profile: cProfile.Profile | pstats.Stats) -> dict[str, float]:
    """Self CPU time (s) per category. A function of no category (builtins such as
    isinstance, the standard library) is charged to its direct callers' categories, in
    proportion to the time each caller spent in it; what still has none is "other"."""
    stats = profile if isinstance(profile, pstats.Stats) else pstats.Stats(profile)
    table = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {name: 0.0 for name, _ in CATEGORIES}
    out["other"] = 0.0
    for (filename, _line, name), row in table.items():
        tottime, callers = row[2], row[4]
        category = _category(filename, name)
        if category is not None:
            out[category] += tottime
            continue
        spent = sum(c[2] for c in callers.values()) or 0.0
        if not callers or spent <= 0:
            out["other"] += tottime
            continue
        for (cfile, _cline, cname), crow in callers.items():
            share = tottime * crow[2] / spent
            out[_category(cfile, cname) or "other"] += share
    return out


async def one_run(spec: StormSpec, http2: bool, framework: str, profile: bool) -> dict[str, Any]:
    with spawn_downstream(
        spec.service_specs(), tls=True, latency=spec.latency, seed=spec.seed
    ) as ds:
        os.environ["SSL_CERT_FILE"] = ds.ca_pem_path
        clients = register_tenants(ds, spec)
        urls = {s: ds.url(s) for s in spec.services}
        costs = await probe_costs(ds, spec, clients)
        storm_demo.DOWNSTREAM = Downstream(urls, clients, "pool")
        storm_demo.call_service = call_service_timed  # type: ignore[assignment]
        pool = storm_pool(spec, urls, clients, ds.ca_pem_path, http2=http2)
        ds.reset_stats()
        await pool.astart()
        runner = RUNNERS[framework](spec, pool)
        await warmup_counted(ds, spec, pool)
        ds.reset_stats()
        waits0 = {k: (s.wait_count, s.wait_sum_seconds) for k, s in pool.stats().items()}
        lags: list[float] = []
        stop = asyncio.Event()
        monitor = asyncio.create_task(lag_monitor(lags, stop))
        EXCHANGES.clear()
        prof = cProfile.Profile(time.process_time) if profile else None
        load0 = os.getloadavg()[0]
        srv0, cpu0, t0 = proc_cpu(ds.pid), time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        records = await run_storm(spec, runner)
        if prof is not None:
            prof.disable()
        duration = time.perf_counter() - t0
        cpu, srv = time.process_time() - cpu0, proc_cpu(ds.pid) - srv0
        load1 = os.getloadavg()[0]
        stop.set()
        await monitor
        pstats_ = pool.stats()
        waits = [
            (s.wait_count - waits0[k][0], s.wait_sum_seconds - waits0[k][1], s.wait_p99_seconds)
            for k, s in pstats_.items()
        ]
        await pool.aclose()
        server = {s: ds.stats(s) for s in spec.services}
        report = summarize(
            "toolpool",
            records,
            server,
            setup_seconds=sum(x.connections_accepted for x in server.values()) * costs["connect_s"],
            duration=duration,
        ).as_dict()
    calls = len(records)
    waited = sum(w[0] for w in waits)
    latencies = sorted(r.seconds for r in records if r.ok)
    slow = latencies[int(0.99 * len(latencies)) :] if latencies else []
    result = {
        "protocol": "h2" if http2 else "http/1.1",
        "calls": calls,
        "errors": report["errors"],
        "p50_ms": report["p50_ms"],
        "p99_ms": report["p99_ms"],
        "conns_opened": report["conns_opened"],
        "server_pings": sum(x.pings_received for x in server.values()),
        "server_503s": sum(x.http_503 for x in server.values()),
        "server_peak_in_progress_max_service": max(
            (x.peak_requests_in_progress for x in server.values()), default=0
        ),
        "storm_s": round(duration, 2),
        "client_cpu_ms_per_call": round(1000 * cpu / calls, 3),
        "server_cpu_ms_per_call": round(1000 * srv / calls, 3),
        "cores_busy": round((cpu + srv) / duration, 2),
        "loadavg_start_end": [round(load0, 2), round(load1, 2)],
        "waited_calls": waited,
        "waited_share": round(waited / max(1, calls), 3),
        "wait_mean_ms": round(1000 * sum(w[1] for w in waits) / max(1, waited), 1),
        "wait_p99_ms_max_service": round(1000 * max((w[2] for w in waits), default=0), 1),
        "loop_lag_ms_p50_p99_max": [
            round(1000 * percentile(lags, 0.5), 2),
            round(1000 * percentile(lags, 0.99), 2),
            round(1000 * max(lags, default=0), 2),
        ],
        "slowest_1pct_min_ms": round(1000 * slow[0], 1) if slow else 0,
    }
    # What the slowest 1 % of exchanges are made of: waiting for a permit at the cap, and the
    # rest (the request in flight: 50 ms round trip + 20-50 ms service, plus CPU and loop lag).
    exchanges = sorted(EXCHANGES)
    top = exchanges[int(0.99 * len(exchanges)) :]
    if top:
        result["slowest_1pct_exchange_ms"] = round(1000 * statistics.mean(e[0] for e in top), 1)
        result["slowest_1pct_waited_ms"] = round(1000 * statistics.mean(e[1] for e in top), 1)
        result["all_exchanges_in_flight_ms_p50_p99"] = [
            round(1000 * percentile([e[0] - e[1] for e in exchanges], q), 1) for q in (0.5, 0.99)
        ]
        result["all_exchanges_waited_ms_p50_p99"] = [
            round(1000 * percentile([e[1] for e in exchanges], q), 1) for q in (0.5, 0.99)
        ]
    if prof is not None:
        split = split_profile(prof)
        total = sum(split.values())
        result["client_profile_ms_per_call"] = {
            k: round(1000 * v / calls, 3) for k, v in sorted(split.items(), key=lambda kv: -kv[1])
        }
        result["client_profile_total_ms_per_call"] = round(1000 * total / calls, 3)
        result["_profile"] = prof
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--framework", default="langchain", choices=sorted(RUNNERS))
    parser.add_argument("--protocols", default="h2,http/1.1")
    parser.add_argument(
        "--limits",
        default="18",
        help="the services' concurrency limits to run (the pool's cap is 70 %% of each): "
        "18 is the demo's; a higher one shows what the storm does when the cap binds less",
    )
    parser.add_argument("--profile", help="also one cProfile run per protocol, to DIR-<p>.txt")
    parser.add_argument(
        "--borrow-check-after",
        default="",
        help="HTTP/2 runs with these values of toolpool._h2pool.BORROW_CHECK_AFTER (s), "
        "interleaved, e.g. 1,10 (default: the library's)",
    )
    parser.add_argument("--json")
    args = parser.parse_args()
    specs = {
        int(limit): StormSpec(
            agents=40 if args.quick else 100,
            bursts=2 if args.quick else 3,
            steady_seconds=4.0 if args.quick else 10.0,
            concurrency_limit=int(limit),
        )
        for limit in args.limits.split(",")
    }
    spec = next(iter(specs.values()))
    protocols = args.protocols.split(",")
    results: list[dict[str, Any]] = []
    import toolpool._h2pool as h2pool

    checks = [float(x) for x in args.borrow_check_after.split(",") if x]
    runs = [
        (limit, proto, check)
        for limit in specs
        for proto in protocols
        for check in (checks if proto == "h2" and checks else [h2pool.BORROW_CHECK_AFTER])
    ]
    default_check = h2pool.BORROW_CHECK_AFTER
    for rnd in range(args.rounds):
        for limit, proto, check in runs:
            h2pool.BORROW_CHECK_AFTER = check  # type: ignore[misc]
            r = asyncio.run(one_run(specs[limit], proto == "h2", args.framework, False))
            h2pool.BORROW_CHECK_AFTER = default_check  # type: ignore[misc]
            r["round"] = rnd
            r["limit"] = limit
            if proto == "h2":
                r["borrow_check_after"] = check
            print(json.dumps(r), flush=True)
            results.append(r)
    if args.profile:
        for proto in protocols:
            r = asyncio.run(one_run(spec, proto == "h2", args.framework, True))
            prof = r.pop("_profile")
            path = Path(f"{args.profile}-{proto.replace('/', '')}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.dump_stats(path.with_suffix(".prof"))
            with path.open("w") as fh:
                stats = pstats.Stats(prof, stream=fh)
                stats.sort_stats("tottime").print_stats(60)
            r["round"] = "profile"
            print(json.dumps(r), flush=True)
            results.append(r)
    for limit, proto, check in runs:
        rows = [
            r
            for r in results
            if r["protocol"] == proto
            and r["round"] != "profile"
            and r.get("limit") == limit
            and r.get("borrow_check_after", check) == check
        ]
        if not rows:
            continue
        summary = {
            k: (
                statistics.median(r[k] for r in rows),
                min(r[k] for r in rows),
                max(r[k] for r in rows),
            )
            for k in (
                "p50_ms",
                "p99_ms",
                "client_cpu_ms_per_call",
                "server_cpu_ms_per_call",
                "cores_busy",
            )
        }
        label = f"{proto} limit {limit}" + (f" borrow-check {check}" if proto == "h2" else "")
        print(label, "median [min, max]:", json.dumps(summary))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
