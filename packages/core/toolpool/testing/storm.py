"""The seed's connection-storm scenario, reusable: agents, bursts, a steady phase, and the
numbers of its economics table.

A `StormSpec` describes the downstream (services behind latency relays, TLS, token endpoints,
service times, an nginx-style limit per service) and the agents (how many, tool calls per
task, bursts, think times, tenants). `run_storm(spec, task)` plays the agents against any
strategy: `task(agent, tenant, services)` runs one agent task whose tool calls go to
`services` (in parallel) and returns one `CallRecord` per call. The schedule (who calls what,
for which tenant, when) is drawn from the spec's seed, so every strategy gets the same work.

Used by `examples/storm_demo.py` (real agent frameworks) and `benchmarks/storm.py`
(framework-free strategies).
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from toolpool.testing._spec import ServiceSpec
from toolpool.testing._stats import ServiceStats

__all__ = [
    "CallRecord",
    "StormReport",
    "StormSpec",
    "TaskPlan",
    "percentile",
    "register_tenants",
    "run_storm",
    "summarize",
]


@dataclass(frozen=True)
class StormSpec:
    """The scenario. Defaults follow the seed: 100 agents, 3-5 parallel tool calls per task,
    five services 25 ms away, OAuth tokens at 100-300 ms, services taking 20-50 ms."""

    agents: int = 100
    calls_per_task: tuple[int, int] = (3, 5)
    services: tuple[str, ...] = ("crm", "email", "vectors", "search", "sandbox")
    tenants: int = 10
    # Bursts: every agent starts one task within `burst_window` seconds, `bursts` times.
    bursts: int = 3
    burst_window: float = 1.0
    burst_gap: float = 2.0
    # Steady phase: agents loop (think, task) for this long.
    steady_seconds: float = 10.0
    think_time: tuple[float, float] = (3.0, 8.0)
    # The downstream.
    latency: float = 0.025
    tls: bool = True
    service_time: tuple[float, float] = (0.02, 0.05)
    token_latency: tuple[float, float] = (0.1, 0.3)
    token_ttl: float = 3600.0
    # nginx-style limit of requests in progress per service (503 above it); toolpool sizes
    # its pools from it as the documented limit: floor(18 × 0.7) = 12 connections each.
    concurrency_limit: int | None = 18
    seed: int = 7

    def service_specs(self) -> dict[str, ServiceSpec]:
        """The test-bed services this scenario runs against."""
        spec = ServiceSpec(
            service_time=self.service_time,
            concurrency_limit=self.concurrency_limit,
            token_latency=self.token_latency,
            token_ttl=self.token_ttl,
        )
        return dict.fromkeys(self.services, spec)

    def tenant_names(self) -> list[str]:
        return [f"tenant-{i:02d}" for i in range(self.tenants)]

    @property
    def tool_calls_in_bursts(self) -> int:
        """Expected tool calls in the burst phase (mean calls per task)."""
        lo, hi = self.calls_per_task
        return round(self.bursts * self.agents * (lo + hi) / 2)


@dataclass(frozen=True)
class TaskPlan:
    """One agent task: who, for which tenant, which services (one tool call each), when."""

    agent: int
    tenant: str
    services: tuple[str, ...]
    phase: str  # "burst-1", "burst-2", ... or "steady"
    offset: float  # seconds after the burst's start (bursts) or think time before (steady)


@dataclass(frozen=True)
class CallRecord:
    """One tool call as the agent saw it."""

    service: str
    tenant: str
    phase: str
    started: float  # seconds since the storm started
    seconds: float
    ok: bool
    error: str | None = None


class StormTask(Protocol):
    def __call__(self, plan: TaskPlan) -> Awaitable[list[CallRecord]]: ...


def register_tenants(downstream: Any, spec: StormSpec) -> dict[str, tuple[str, str]]:
    """Register one OAuth client per tenant on every service; returns tenant -> (id, secret).

    The secrets are test values made up here, not real credentials.
    """
    clients = {}
    for tenant in spec.tenant_names():
        client_id, secret = f"{tenant}-app", f"{tenant}-secret"
        for service in spec.services:
            downstream.register_client(
                service, client_id=client_id, client_secret=secret, tenant=tenant
            )
        clients[tenant] = (client_id, secret)
    return clients


def _plans(spec: StormSpec, rng: random.Random, agent: int, phase: str) -> TaskPlan:
    lo, hi = spec.calls_per_task
    calls = rng.randint(lo, hi)
    services = tuple(rng.sample(spec.services, min(calls, len(spec.services))))
    if calls > len(services):
        services += tuple(rng.choice(spec.services) for _ in range(calls - len(services)))
    tenant = spec.tenant_names()[agent % spec.tenants]
    offset = (
        rng.uniform(0, spec.burst_window)
        if phase.startswith("burst")
        else rng.uniform(*spec.think_time)
    )
    return TaskPlan(agent, tenant, services, phase, offset)


async def run_storm(
    spec: StormSpec,
    task: StormTask,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[CallRecord]:
    """Play the scenario: `bursts` bursts, then the steady phase; returns every call."""
    rng = random.Random(spec.seed)
    records: list[CallRecord] = []
    expected = (
        spec.tool_calls_in_bursts
        + math.ceil(spec.agents * spec.steady_seconds / (sum(spec.think_time) / 2 + 0.3))
        * sum(spec.calls_per_task)
        // 2
    )
    start = time.perf_counter()

    def report() -> None:
        if progress is not None:
            progress(len(records), max(expected, len(records)))

    async def run(plan: TaskPlan) -> None:
        await asyncio.sleep(plan.offset)
        records.extend(await task(plan))
        report()

    for burst in range(spec.bursts):
        plans = [_plans(spec, rng, agent, f"burst-{burst + 1}") for agent in range(spec.agents)]
        await asyncio.gather(*[run(p) for p in plans])
        if burst + 1 < spec.bursts:
            await asyncio.sleep(spec.burst_gap)
    steady_end = time.perf_counter() + spec.steady_seconds
    agent_rngs = [random.Random(rng.random()) for _ in range(spec.agents)]

    async def steady_agent(agent: int) -> None:
        while time.perf_counter() < steady_end:
            await run(_plans(spec, agent_rngs[agent], agent, "steady"))

    await asyncio.gather(*[steady_agent(a) for a in range(spec.agents)])
    for i, record in enumerate(records):
        records[i] = _rebase(record, start)
    return records


def _rebase(record: CallRecord, start: float) -> CallRecord:
    if record.started < start:
        return record
    return CallRecord(
        record.service,
        record.tenant,
        record.phase,
        record.started - start,
        record.seconds,
        record.ok,
        record.error,
    )


async def timed_call(
    service: str, plan: TaskPlan, call: Callable[[], Awaitable[Any]]
) -> CallRecord:
    """Run one tool call and record it (errors are recorded, not raised)."""
    t0 = time.perf_counter()
    try:
        await call()
    except Exception as exc:
        return CallRecord(
            service,
            plan.tenant,
            plan.phase,
            t0,
            time.perf_counter() - t0,
            False,
            f"{type(exc).__name__}: {str(exc)[:120]}",
        )
    return CallRecord(service, plan.tenant, plan.phase, t0, time.perf_counter() - t0, True)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True)
class StormReport:
    """The seed's table for one strategy."""

    strategy: str
    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    burst_p99_ms: float
    warm_burst_p99_ms: float
    steady_p99_ms: float
    conns_opened: int
    peak_conns: int
    peak_conns_per_service: int
    http_503: int
    http_429: int
    tokens: int
    setup_s_per_min: float
    duration_s: float
    error_samples: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "calls": self.calls,
            "errors": self.errors,
            "p50_ms": round(self.p50_ms, 1),
            "p99_ms": round(self.p99_ms, 1),
            "burst_p99_ms": round(self.burst_p99_ms, 1),
            "warm_burst_p99_ms": round(self.warm_burst_p99_ms, 1),
            "steady_p99_ms": round(self.steady_p99_ms, 1),
            "conns_opened": self.conns_opened,
            "peak_conns": self.peak_conns,
            "peak_conns_per_service": self.peak_conns_per_service,
            "http_503": self.http_503,
            "http_429": self.http_429,
            "tokens": self.tokens,
            "setup_s_per_min": round(self.setup_s_per_min, 2),
            "duration_s": round(self.duration_s, 1),
            "error_samples": list(self.error_samples),
            **dict(self.extra),
        }


def summarize(
    strategy: str,
    records: Sequence[CallRecord],
    server: Mapping[str, ServiceStats],
    *,
    setup_seconds: float,
    duration: float,
    extra: Mapping[str, Any] | None = None,
) -> StormReport:
    """Client-side latencies plus the server's own counters, as the seed's table."""
    ok = [r.seconds for r in records if r.ok]
    burst = [r.seconds for r in records if r.ok and r.phase.startswith("burst")]
    warm_burst = [
        r.seconds for r in records if r.ok and r.phase.startswith("burst") and r.phase != "burst-1"
    ]
    steady = [r.seconds for r in records if r.ok and r.phase == "steady"]
    errors = [r.error or "" for r in records if not r.ok]
    stats = list(server.values())
    return StormReport(
        strategy=strategy,
        calls=len(records),
        errors=len(errors),
        p50_ms=1000 * (statistics.median(ok) if ok else 0.0),
        p99_ms=1000 * percentile(ok, 0.99),
        burst_p99_ms=1000 * percentile(burst, 0.99),
        warm_burst_p99_ms=1000 * percentile(warm_burst, 0.99),
        steady_p99_ms=1000 * percentile(steady, 0.99),
        conns_opened=sum(s.connections_accepted for s in stats),
        peak_conns=sum(s.peak_connections for s in stats),
        peak_conns_per_service=max((s.peak_connections for s in stats), default=0),
        http_503=sum(s.http_503 for s in stats),
        http_429=sum(s.http_429 for s in stats),
        tokens=sum(s.token_requests for s in stats),
        setup_s_per_min=setup_seconds / (duration / 60) if duration else 0.0,
        duration_s=duration,
        error_samples=tuple(sorted(set(errors))[:5]),
        extra=dict(extra or {}),
    )
