"""The storm demo's toolpool run, per framework, interleaved and repeated, with the pool's own
counters and per-phase timings of the tool calls (issue 25: where does the AutoGen path lose?).

    python benchmarks/framework_storm.py --frameworks langchain,autogen --repeat 3 --quick
    python benchmarks/framework_storm.py --frameworks langchain,autogen --tool noop --repeat 3

Each run is `examples/storm_demo.py`'s "toolpool-http1.1" run (same downstream, same pool
settings, same runners and tools: the demo module is imported, not copied), without its
"naive" run: the per-phase instruments below are those of the HTTP/1.1 path, so the pool is
pinned to `http2=False` (the demo's default run is on HTTP/2 since issue 18).
Frameworks are interleaved (a, b, a, b, ...) so that a noisy neighbour on a shared machine
hits all of them alike. Per run it records:

- the demo's row (p50, p99, warm-burst p99, steady p99, connections opened at the server);
- `pool.stats()`: connections created, closed by reason, requests queued, pool-wait p99,
  token fetches by reason;
- per-phase timings, by instrumenting the toolpool functions each phase runs in (benchmark
  only, nothing in the package changes): tool-slot wait and admission wait (before the tool
  body, so outside the demo's latency), pool wait (`acquire`), connect (`open_slot`), token
  (`HeaderAuth._obtain_async`), request (`AsyncConnection.exchange`);
- the process's CPU seconds during the storm and the event loop's lag (a 10 ms ticker's
  overshoot): how much the agent framework itself keeps the loop busy.

`autogen-main` in `--frameworks` is the AutoGen run with the adapter as it was before issue 25,
emulated here (benchmark only): every `wrap` gets its own fresh `Admission`, which learns
alone, and its own `AdaptiveToolConcurrency(16)`.

`--tool noop` swaps the tools' body for `await asyncio.sleep(0)`: the same storm through the
same agents with a do-nothing tool, measuring what the framework alone costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _name, _value in {
    "LANGCHAIN_TRACING_V2": "false",
    "LANGSMITH_TRACING": "false",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_TRACING_ENABLED": "false",
}.items():
    os.environ.setdefault(_name, _value)

import toolpool  # noqa: E402
import toolpool.auth  # noqa: E402
from toolpool._async import request as async_request  # noqa: E402
from toolpool._async.connection import AsyncConnection  # noqa: E402
from toolpool.adapters import AdaptiveToolConcurrency, Admission  # noqa: E402
from toolpool.auth._header import HeaderAuth  # noqa: E402
from toolpool.testing import spawn_downstream  # noqa: E402
from toolpool.testing.storm import StormSpec, percentile, register_tenants, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _load_demo() -> Any:
    spec = importlib.util.spec_from_file_location("storm_demo", ROOT / "examples/storm_demo.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["storm_demo"] = module
    spec.loader.exec_module(module)
    return module


demo = _load_demo()


# ---------------------------------------------------------------------------- phase timings

PHASES: dict[str, list[float]] = defaultdict(list)


def _timed_async_cm(name: str, factory: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an async context manager factory: time from entering to being inside."""

    @contextlib.asynccontextmanager
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        async with factory(*args, **kwargs) as value:
            PHASES[name].append(time.perf_counter() - t0)
            yield value

    return wrapper


# (event loop, thread) pairs the pool's async requests ran in: more than one would mean a
# second driver whose connections the storm's loop cannot reuse.
DRIVERS: set[tuple[int, int]] = set()


def _timed_coro(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        if name == "pool_wait":
            DRIVERS.add((id(asyncio.get_running_loop()), threading.get_ident()))
        t0 = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            PHASES[name].append(time.perf_counter() - t0)

    return wrapper


LIMITERS: list[AdaptiveToolConcurrency] = []


def instrument() -> None:
    original_init = AdaptiveToolConcurrency.__init__

    def init(self: AdaptiveToolConcurrency, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        LIMITERS.append(self)

    AdaptiveToolConcurrency.__init__ = init  # type: ignore[method-assign]
    AdaptiveToolConcurrency.slot = _timed_async_cm("tool_slot_wait", AdaptiveToolConcurrency.slot)  # type: ignore[method-assign]
    Admission.hold = _timed_async_cm("admission_wait", Admission.hold)  # type: ignore[method-assign]
    async_request.acquire = _timed_coro("pool_wait", async_request.acquire)  # type: ignore[assignment]
    async_request.open_slot = _timed_coro("connect", async_request.open_slot)  # type: ignore[assignment]
    HeaderAuth._obtain_async = _timed_coro("token", HeaderAuth._obtain_async)  # type: ignore[method-assign]
    AsyncConnection.exchange = _timed_coro("request", AsyncConnection.exchange)  # type: ignore[method-assign]


async def _noop_tool(service: str, tenant: str, query: str) -> dict[str, Any]:
    await asyncio.sleep(0)
    return {}


class PoolTimeline:
    """Connections created and affinity closes over time (every 0.25 s), to see in which part
    of the storm connections are opened."""

    def __init__(self, pool: toolpool.Pool) -> None:
        self.pool = pool
        self.points: list[tuple[float, int, dict[str, int]]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        t0 = time.perf_counter()
        while True:
            stats = self.pool.stats()
            closed: dict[str, int] = defaultdict(int)
            for d in stats.values():
                for reason, n in d.closed_total.items():
                    closed[reason] += n
            self.points.append((time.perf_counter() - t0, stats.created_total, dict(closed)))
            await asyncio.sleep(0.25)

    def __enter__(self) -> PoolTimeline:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def _windows(self, records: list[Any]) -> list[tuple[str, float, float]]:
        starts = sorted(
            {r.phase: r.started for r in sorted(records, key=lambda r: -r.started)}.items(),
            key=lambda kv: kv[1],
        )
        return [
            (phase, start, starts[i + 1][1] if i + 1 < len(starts) else float("inf"))
            for i, (phase, start) in enumerate(starts)
        ]

    def created_by_phase(self, records: list[Any]) -> dict[str, int]:
        """Connections created while each phase's calls ran (from its first call's start to
        the next phase's first call)."""
        out: dict[str, int] = {}
        for phase, start, end in self._windows(records):
            inside = [p[1] for p in self.points if start <= p[0] < end]
            before = [p[1] for p in self.points if p[0] < start]
            if inside:
                out[phase] = inside[-1] - (before[-1] if before else inside[0])
        return out

    def closed_by_phase(self, records: list[Any]) -> dict[str, dict[str, int]]:
        """Connections the pool closed while each phase's calls ran, by reason."""
        out: dict[str, dict[str, int]] = {}
        for phase, start, end in self._windows(records):
            inside = [p[2] for p in self.points if start <= p[0] < end]
            before = [p[2] for p in self.points if p[0] < start]
            if inside:
                last, first = inside[-1], (before[-1] if before else inside[0])
                out[phase] = {
                    k: last.get(k, 0) - first.get(k, 0)
                    for k in last
                    if last.get(k, 0) - first.get(k, 0)
                }
        return out


class LoopLag:
    """A 10 ms ticker: how late the event loop wakes it up (the loop's CPU backlog)."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.01)
            self.lags.append(time.perf_counter() - t0 - 0.01)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


# ---------------------------------------------------------------------------- before issue 25


def _add_autogen_main() -> None:
    import toolpool.adapters._admission as admission_module
    import toolpool.autogen._wrap as wrap_module

    shared_learned, shared_gates = admission_module._learned_of, wrap_module._shared_gates

    def per_wrap_gates(
        pool: toolpool.Pool, limit: int, max_wait: float
    ) -> tuple[Admission, AdaptiveToolConcurrency]:
        return Admission(pool, max_wait=max_wait), AdaptiveToolConcurrency(16)

    def variant(base: Callable[..., Any], before: bool) -> Callable[..., Any]:
        def runner(spec: StormSpec, pool: toolpool.Pool) -> Any:
            admission_module._learned_of = (  # type: ignore[assignment]
                (lambda pool: admission_module._Learned()) if before else shared_learned
            )
            wrap_module._shared_gates = per_wrap_gates if before else shared_gates  # type: ignore[assignment]
            return base(spec, pool)

        return runner

    runners = demo.RUNNERS
    for name in ("langchain", "crewai", "none"):
        runners[name] = variant(runners[name], False)
    runners["autogen-main"] = variant(runners["autogen"], True)
    runners["autogen"] = variant(runners["autogen"], False)


# ---------------------------------------------------------------------------- one run


def _burning(runner: Any, burn_ms: float) -> Any:
    """`runner` with `burn_ms` of CPU per tool call of a task spent on the event loop before
    the agent runs (where another framework spends its own per-run CPU)."""

    async def run(plan: Any) -> Any:
        end = time.perf_counter() + burn_ms * len(plan.services) / 1000
        while time.perf_counter() < end:
            pass
        return await runner(plan)

    return run


async def run_once(
    spec: StormSpec, framework: str, tool: str, burn_ms: float = 0.0
) -> dict[str, Any]:
    PHASES.clear()
    LIMITERS.clear()
    DRIVERS.clear()
    demo.call_service = _noop_tool if tool == "noop" else demo.__dict__["_real_call_service"]
    with spawn_downstream(
        spec.service_specs(), tls=True, latency=spec.latency, seed=spec.seed
    ) as ds:
        os.environ["SSL_CERT_FILE"] = ds.ca_pem_path
        clients = register_tenants(ds, spec)
        urls = {s: ds.url(s) for s in spec.services}
        demo.DOWNSTREAM = demo.Downstream(urls, clients, "pool")
        pool = demo.storm_pool(spec, urls, clients, ds.ca_pem_path, http2=False)
        ds.reset_stats()
        await pool.astart()
        runner = demo.RUNNERS[framework](spec, pool)
        if burn_ms:
            runner = _burning(runner, burn_ms)
        await demo.warmup_counted(ds, spec, pool)
        ds.reset_stats()
        PHASES.clear()
        cpu0 = time.process_time()
        with LoopLag() as lag, PoolTimeline(pool) as timeline:
            t0 = time.perf_counter()
            records = await demo.run_storm(spec, runner)
            duration = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        stats = pool.stats()
        await pool.aclose()
        server = {s: ds.stats(s) for s in spec.services}
        report = summarize("toolpool", records, server, setup_seconds=0.0, duration=duration)
    closed: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    for d in stats.values():
        for reason, n in d.closed_total.items():
            closed[reason] += n
        for reason, n in d.auth_refreshes_total.items():
            tokens[reason] += n
    row = report.as_dict()
    return {
        "framework": framework,
        "tool": tool,
        **{
            k: row[k]
            for k in (
                "calls",
                "errors",
                "p50_ms",
                "p99_ms",
                "warm_burst_p99_ms",
                "steady_p99_ms",
                "conns_opened",
                "tokens",
                "http_503",
                "duration_s",
            )
        },
        "pool_created": stats.created_total,
        "pool_closed": dict(closed),
        "pool_queued": sum(d.queued_total for d in stats.values()),
        "pool_acquired": sum(d.acquired_total for d in stats.values()),
        "pool_reused": sum(d.reused_total for d in stats.values()),
        "token_fetches": dict(tokens),
        "created_by_phase": timeline.created_by_phase(records),
        "closed_by_phase": timeline.closed_by_phase(records),
        "async_drivers": len(DRIVERS),
        "limiters": len(LIMITERS),
        "limiter_decreases": sum(lim.decreases_total for lim in LIMITERS),
        "limiter_lowest": min((lim.limit for lim in LIMITERS), default=None),
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_call": round(1000 * cpu / max(1, row["calls"]), 2),
        "loop_lag_p99_ms": round(1000 * percentile(lag.lags, 0.99), 1),
        "phases": {
            name: {
                "n": len(values),
                "p50_ms": round(1000 * statistics.median(values), 1),
                "p99_ms": round(1000 * percentile(values, 0.99), 1),
                "sum_s": round(sum(values), 2),
            }
            for name, values in sorted(PHASES.items())
            if values
        },
    }


# ---------------------------------------------------------------------------- many runs

KEYS = (
    "p50_ms",
    "p99_ms",
    "warm_burst_p99_ms",
    "steady_p99_ms",
    "conns_opened",
    "pool_created",
    "pool_queued",
    "tokens",
    "cpu_ms_per_call",
    "loop_lag_p99_ms",
)


def _median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"


def table(runs: list[dict[str, Any]]) -> str:
    frameworks = list(dict.fromkeys(r["framework"] for r in runs))
    lines = [
        "| framework | " + " | ".join(KEYS) + " |",
        "|---|" + "---|" * len(KEYS),
    ]
    for fw in frameworks:
        mine = [r for r in runs if r["framework"] == fw]
        cells = []
        for key in KEYS:
            values = [float(r[key]) for r in mine]
            fmt = "{:.1f}" if key in ("cpu_ms_per_call", "loop_lag_p99_ms") else "{:.0f}"
            cells.append(
                f"{fmt.format(statistics.median(values))} "
                f"[{fmt.format(min(values))}-{fmt.format(max(values))}]"
            )
        lines.append(f"| {fw} (n={len(mine)}) | " + " | ".join(cells) + " |")
    phases = sorted({p for r in runs for p in r["phases"]})
    lines += ["", "| framework | " + " | ".join(f"{p} p50/p99 ms" for p in phases) + " |"]
    lines.append("|---|" + "---|" * len(phases))
    for fw in frameworks:
        mine = [r for r in runs if r["framework"] == fw]
        cells = []
        for p in phases:
            got = [r["phases"][p] for r in mine if p in r["phases"]]
            if not got:
                cells.append("–")
                continue
            p50 = statistics.median(g["p50_ms"] for g in got)
            p99 = statistics.median(g["p99_ms"] for g in got)
            n = statistics.median(g["n"] for g in got)
            cells.append(f"{p50:.1f} / {p99:.0f} (n={n:.0f})")
        lines.append(f"| {fw} | " + " | ".join(cells) + " |")
    lines += ["", "| framework | pool closed by reason (median) | token fetches by reason |"]
    lines.append("|---|---|---|")
    for fw in frameworks:
        mine = [r for r in runs if r["framework"] == fw]
        reasons = sorted({k for r in mine for k in r["pool_closed"]})
        closed = ", ".join(
            f"{k} {statistics.median(r['pool_closed'].get(k, 0) for r in mine):.0f}"
            for k in reasons
        )
        treasons = sorted({k for r in mine for k in r["token_fetches"]})
        fetched = ", ".join(
            f"{k} {statistics.median(r['token_fetches'].get(k, 0) for r in mine):.0f}"
            for k in treasons
        )
        lines.append(f"| {fw} | {closed or '–'} | {fetched or '–'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--frameworks",
        default="langchain,autogen",
        help="comma-separated; 'autogen:noop' runs one framework with the do-nothing tool "
        "inside the same interleaved set, 'autogen:burn' with --burn-ms of extra CPU per call",
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the demo's --quick storm")
    parser.add_argument("--tool", choices=("real", "noop"), default="real")
    parser.add_argument(
        "--burn-ms",
        type=float,
        default=1.9,
        help="for 'X:burn' in --frameworks: CPU ms per tool call spent on the loop before "
        "each task's agent runs (default: LangChain's minus AutoGen's own CPU per call, "
        "measured with the do-nothing tool)",
    )
    parser.add_argument("--json", help="write every run here")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    spec = StormSpec(
        agents=40 if args.quick else 100,
        bursts=2 if args.quick else 3,
        steady_seconds=4.0 if args.quick else 10.0,
    )
    demo.__dict__["_real_call_service"] = demo.call_service
    instrument()
    _add_autogen_main()
    frameworks = args.frameworks.split(",")
    runs = []
    for i in range(args.repeat):
        for fw in frameworks:
            t0 = time.perf_counter()
            name, _, tool = fw.partition(":")
            burn = args.burn_ms if tool == "burn" else 0.0
            tool = "real" if tool == "burn" else tool
            run = asyncio.run(run_once(spec, name, tool or args.tool, burn))
            run["framework"] = fw
            runs.append(run)
            print(
                f"[{i + 1}/{args.repeat}] {fw:9} p50 {run['p50_ms']:.0f} p99 {run['p99_ms']:.0f} "
                f"warm {run['warm_burst_p99_ms']:.0f} conns {run['conns_opened']} "
                f"closed {run['pool_closed']} by phase {run['created_by_phase']} "
                f"{run['closed_by_phase']} "
                f"drivers {run['async_drivers']} limiters {run['limiters']} "
                f"(decreases {run['limiter_decreases']}, lowest {run['limiter_lowest']}) "
                f"cpu/call {run['cpu_ms_per_call']} ms "
                f"lag99 {run['loop_lag_p99_ms']} ms ({time.perf_counter() - t0:.0f} s; "
                f"load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    print()
    print(table(runs))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
