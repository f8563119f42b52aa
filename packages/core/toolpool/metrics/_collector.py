"""`PoolCollector`: the prometheus-client collector that turns live pools into metric families
at scrape time. Nothing is counted here: the request path only bumps plain integers on the
destination state; this module reads them when Prometheus asks."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from toolpool._state import H2_CLOSE_REASONS
from toolpool.errors import ConfigError
from toolpool.metrics._readings import (
    BREAKER_STATES,
    LABEL_VALUE,
    SATURATION_STATES,
    DestinationReading,
    HistogramReading,
    PolicyReading,
    read_into,
)
from toolpool.metrics._tenants import TenantCounters, TenantLabels, TenantLayer, install, uninstall

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["METRICS", "PoolCollector"]

# name (as exposed, without the _bucket/_sum/_count suffixes) -> (type, help text).
METRICS: dict[str, tuple[str, str]] = {
    "toolpool_connections": (
        "gauge",
        "Connections by state (idle, used, opening, closing); all of them count against "
        "the destination's limit.",
    ),
    "toolpool_connections_max": ("gauge", "Configured maximum number of connections."),
    "toolpool_streams_held": (
        "gauge",
        "Connections in use by a long-lived response (an event stream, or a request held "
        "far longer than usual): counted in use, but not expected back soon.",
    ),
    "toolpool_streams_total": (
        "counter",
        "Responses that turned out to be event streams (text/event-stream).",
    ),
    "toolpool_destination_protocol": (
        "gauge",
        "1 for the protocol the destination speaks (http/1.1, h2, or unknown before the "
        "first HTTP/2-offering connect). On h2 the connection gauges count requests "
        "(stream permits); the toolpool_http2_* gauges count connections and streams.",
    ),
    "toolpool_http2_connections": (
        "gauge",
        "Open HTTP/2 connections (one per active auth context, more only at the server's "
        "stream limit).",
    ),
    "toolpool_http2_streams_in_use": ("gauge", "HTTP/2 streams in flight."),
    "toolpool_http2_connections_created_total": (
        "counter",
        "HTTP/2 connections opened (TCP + TLS + SETTINGS); on h2 "
        "toolpool_connections_created_total counts stream permits instead.",
    ),
    "toolpool_http2_connections_closed_total": (
        "counter",
        "HTTP/2 connections closed, by reason (idle_ttl, lifetime, health, shutdown, error: "
        "closed by the server, GOAWAY, or failed).",
    ),
    "toolpool_http2_streams_total": (
        "counter",
        "HTTP/2 streams opened (one per request sent; a resend is another).",
    ),
    "toolpool_http2_streams_reset_total": (
        "counter",
        "HTTP/2 streams the pool reset with RST_STREAM (cancelled or abandoned requests); "
        "their connections stay.",
    ),
    "toolpool_http2_streams_per_connection_max": (
        "gauge",
        "Streams in flight on the destination's busiest HTTP/2 connection.",
    ),
    "toolpool_connections_limit": (
        "gauge",
        "Effective connection limit: the maximum, unless the adaptive limit lowered it.",
    ),
    "toolpool_pending_requests": ("gauge", "Requests waiting in the queue for a connection."),
    "toolpool_pending_requests_max": (
        "gauge",
        "Queue bound; beyond it requests are rejected at once (reason queue_full).",
    ),
    "toolpool_connection_wait_seconds": (
        "histogram",
        "Time a request waited for a connection (0 when one was free); one per acquisition.",
    ),
    "toolpool_connections_created_total": (
        "counter",
        "Connections opened (TCP, and TLS for https), warm-up included.",
    ),
    "toolpool_connection_create_seconds": (
        "histogram",
        "Time to open a connection (TCP connect plus TLS handshake).",
    ),
    "toolpool_connections_closed_total": (
        "counter",
        "Connections closed, by reason: idle_ttl, lifetime, health, affinity, error, "
        "shutdown, limit.",
    ),
    "toolpool_connection_use_seconds": (
        "histogram",
        "Time a request held a connection, from lease (or open) to release.",
    ),
    "toolpool_connection_acquisitions_total": (
        "counter",
        "Connections handed to requests, by source: idle (reused) or new (opened for it).",
    ),
    "toolpool_rejections_total": (
        "counter",
        "Calls refused without being sent, by reason: queue_full, timeout (no connection "
        "within acquire_timeout), breaker_open, rate_limited. With a resilience policy, as "
        "the policy counts them (admission refusals included); else the pool's own counts.",
    ),
    "toolpool_egress_denied_total": (
        "counter",
        "Connects the egress policy refused before any packet was sent, by rule: metadata, "
        "link_local, unspecified, multicast, broadcast, deny, deny_unknown.",
    ),
    "toolpool_retries_total": (
        "counter",
        "Requests re-sent by the resilience policy, by why the previous attempt failed.",
    ),
    "toolpool_retries_denied_total": (
        "counter",
        "Retries the retry budget refused (the failure went back to the caller).",
    ),
    "toolpool_retry_budget_available": ("gauge", "Retries the retry budget would grant now."),
    "toolpool_breaker_state": (
        "gauge",
        "Circuit breaker state: 1 for the current state (closed, half_open, open), else 0.",
    ),
    "toolpool_breaker_transitions_total": (
        "counter",
        "Times the circuit breaker entered each state.",
    ),
    "toolpool_rate_limit_waits_total": (
        "counter",
        "Requests that waited for a rate-limit token or a Retry-After pause.",
    ),
    "toolpool_rate_limit_wait_seconds_total": (
        "counter",
        "Seconds requests spent waiting for rate-limit tokens or Retry-After pauses.",
    ),
    "toolpool_connections_limit_reason": (
        "gauge",
        "Why the effective limit last changed (1 for the current reason: initial, recovery, "
        "latency, http_429, http_503, timeout).",
    ),
    "toolpool_connections_limit_changes_total": (
        "counter",
        "Changes of the adaptive connection limit, by direction (decrease, increase).",
    ),
    "toolpool_admissions_total": ("counter", "Calls admitted by pool.admit()."),
    "toolpool_admission_waits_total": (
        "counter",
        "Calls that had to wait in pool.admit() before being admitted or refused.",
    ),
    "toolpool_admitted_calls": ("gauge", "Calls inside pool.admit() now."),
    "toolpool_saturation_state": (
        "gauge",
        "Saturation level as adapters see it: 1 for the current one (ok, busy, saturated).",
    ),
    "toolpool_auth_refreshes_total": (
        "counter",
        "Credential fetches, by reason: initial, expiry (ahead of or past expiry), 401.",
    ),
    "toolpool_auth_fetch_seconds": ("histogram", "Time to fetch a credential (token request)."),
    "toolpool_auth_failures_total": ("counter", "Credential fetches that failed."),
    "toolpool_auth_retries_total": (
        "counter",
        "Requests re-sent once with a fresh credential after a 401.",
    ),
    "toolpool_auth_errors_total": (
        "counter",
        "Requests failed with AuthError, by reason: rejected (401 again with a fresh "
        "credential), negative_cache (credentials failed moments ago).",
    ),
    "toolpool_auth_contexts": ("gauge", "Auth contexts with a cached credential."),
    "toolpool_tenant_requests_total": (
        "counter",
        "Requests per hashed tenant (opt-in), by outcome: 2xx..5xx, rejected, error, cancelled.",
    ),
    "toolpool_tenant_request_seconds": (
        "histogram",
        "Per hashed tenant (opt-in): time from sending a request into the pool to its response "
        "head (wait, connect, credential, retries and server time).",
    ),
}


class _Entry:
    """What the collector keeps per pool: its tenant labelling and the counters installed."""

    __slots__ = ("counters", "tenants")

    def __init__(self, tenants: TenantLabels | None) -> None:
        self.tenants = tenants
        self.counters: dict[str, TenantLayer] = {}


class PoolCollector:
    """A prometheus-client collector over one or more pools (held weakly).

    Usually made and registered by `toolpool.metrics.register(pool)`; to wire it yourself:

    ```python
    registry = prometheus_client.CollectorRegistry()
    registry.register(toolpool.metrics.PoolCollector(pool))
    ```

    Every scrape reads each destination's counters under its lock (a copy of a few dozen
    integers); nothing is counted on the request path for it. Pools that share a
    destination name are summed into one set of series. A garbage-collected pool drops out;
    a closed pool keeps reporting its final counters until it is removed.
    """

    def __init__(self, *pools: Pool, tenants: TenantLabels | None = None) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakKeyDictionary[Pool, _Entry] = weakref.WeakKeyDictionary()
        for pool in pools:
            self.add(pool, tenants=tenants)

    def add(self, pool: Pool, *, tenants: TenantLabels | None = None) -> None:
        """Report `pool` too. With `tenants`, also per-tenant series for it (see
        `TenantLabels`): that wraps each destination's send, a small cost per request."""
        with self._lock:
            entry = self._pools.get(pool)
            if entry is None:
                entry = self._pools[pool] = _Entry(tenants)
            elif tenants is not None:
                if entry.tenants is not None and entry.tenants != tenants:
                    raise ConfigError(
                        "this pool is already registered with other TenantLabels; "
                        "remove it first (toolpool.metrics.unregister) to change them"
                    )
                entry.tenants = tenants
        if tenants is not None:
            self._install_tenants(pool, entry)

    def remove(self, pool: Pool) -> None:
        """Stop reporting `pool` (and unwrap its per-tenant counting, if any)."""
        with self._lock:
            entry = self._pools.pop(pool, None)
        if entry is not None:
            for name, layer in entry.counters.items():
                uninstall(pool.destination(name), layer)

    @property
    def pools(self) -> list[Pool]:
        """The pools reported (those still alive)."""
        with self._lock:
            return list(self._pools)

    def _install_tenants(self, pool: Pool, entry: _Entry) -> list[TenantCounters]:
        """Wrap the destinations not wrapped yet (destinations pooled on demand appear
        after registration; they are wrapped at the next scrape)."""
        tenants = entry.tenants
        if tenants is None:
            return []
        with self._lock:
            for name in pool.destinations:
                if name not in entry.counters:
                    entry.counters[name] = install(pool.destination(name), tenants)
            return [layer.counters for layer in entry.counters.values()]

    # ------------------------------------------------------------------ collector protocol

    def describe(self) -> Iterable[Metric]:
        """The metric names (without samples), for the registry's duplicate check."""
        for name, (kind, doc) in METRICS.items():
            if kind == "counter":
                yield CounterMetricFamily(name, doc)
            elif kind == "histogram":
                yield HistogramMetricFamily(name, doc)
            else:
                yield GaugeMetricFamily(name, doc)

    def collect(self) -> Iterable[Metric]:
        """Read every pool now and yield the metric families."""
        readings: dict[str, DestinationReading] = {}
        tenant_counters: list[TenantCounters] = []
        with self._lock:
            entries = list(self._pools.items())
        for pool, entry in entries:
            tenant_counters += self._install_tenants(pool, entry)
            read_into(readings, pool)
        yield from _families(list(readings.values()))
        yield from _tenant_families(tenant_counters)


class _Families:
    """The metric families of one scrape, each made on first use."""

    def __init__(self) -> None:
        self._made: dict[str, Metric] = {}

    def _get(self, name: str, labels: tuple[str, ...]) -> Metric:
        fam = self._made.get(name)
        if fam is None:
            kind, doc = METRICS[name]
            if kind == "counter":
                fam = CounterMetricFamily(name, doc, labels=labels)
            elif kind == "histogram":
                fam = HistogramMetricFamily(name, doc, labels=labels)
            else:
                fam = GaugeMetricFamily(name, doc, labels=labels)
            self._made[name] = fam
        return fam

    def gauge(self, name: str, *labels: str) -> GaugeMetricFamily:
        fam = self._get(name, labels)
        assert isinstance(fam, GaugeMetricFamily)
        return fam

    def counter(self, name: str, *labels: str) -> CounterMetricFamily:
        fam = self._get(name, labels)
        assert isinstance(fam, CounterMetricFamily)
        return fam

    def histogram(self, name: str, *labels: str) -> HistogramMetricFamily:
        fam = self._get(name, labels)
        assert isinstance(fam, HistogramMetricFamily)
        return fam

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._made.values())


def _observe(fam: HistogramMetricFamily, labels: list[str], hist: HistogramReading) -> None:
    fam.add_metric(labels, hist.cumulative(), hist.sum)


def _families(readings: list[DestinationReading]) -> Iterator[Metric]:
    f = _Families()
    # The core families exist (possibly empty) on every scrape, before any destination.
    conns = f.gauge("toolpool_connections", "destination", "state")
    cmax = f.gauge("toolpool_connections_max", "destination")
    held = f.gauge("toolpool_streams_held", "destination")
    streams = f.counter("toolpool_streams_total", "destination")
    climit = f.gauge("toolpool_connections_limit", "destination")
    pending = f.gauge("toolpool_pending_requests", "destination")
    pmax = f.gauge("toolpool_pending_requests_max", "destination")
    wait = f.histogram("toolpool_connection_wait_seconds", "destination")
    created = f.counter("toolpool_connections_created_total", "destination")
    create = f.histogram("toolpool_connection_create_seconds", "destination")
    closed = f.counter("toolpool_connections_closed_total", "destination", "reason")
    use = f.histogram("toolpool_connection_use_seconds", "destination")
    acquired = f.counter("toolpool_connection_acquisitions_total", "destination", "source")
    rejected = f.counter("toolpool_rejections_total", "destination", "reason")
    egress = f.counter("toolpool_egress_denied_total", "destination", "rule")
    protocol = f.gauge("toolpool_destination_protocol", "destination", "protocol")
    h2_conns = f.gauge("toolpool_http2_connections", "destination")
    h2_streams = f.gauge("toolpool_http2_streams_in_use", "destination")
    h2_per_conn = f.gauge("toolpool_http2_streams_per_connection_max", "destination")
    h2_created = f.counter("toolpool_http2_connections_created_total", "destination")
    h2_closed = f.counter("toolpool_http2_connections_closed_total", "destination", "reason")
    h2_streams_total = f.counter("toolpool_http2_streams_total", "destination")
    h2_resets = f.counter("toolpool_http2_streams_reset_total", "destination")
    for r in readings:
        d = r.name
        protocol.add_metric([d, r.protocol], 1)
        h2_conns.add_metric([d], r.http2_connections)
        h2_streams.add_metric([d], r.http2_streams_in_use)
        h2_per_conn.add_metric([d], r.http2_streams_per_connection_max)
        if r.protocol != "http/1.1" or r.http2_opened > 0:
            h2_created.add_metric([d], r.http2_opened)
            for reason in H2_CLOSE_REASONS:
                h2_closed.add_metric([d, reason], r.http2_closed.get(reason, 0))
            h2_streams_total.add_metric([d], r.http2_streams_total)
            h2_resets.add_metric([d], r.http2_streams_reset)
        conns.add_metric([d, "idle"], r.idle)
        conns.add_metric([d, "used"], r.used)
        conns.add_metric([d, "opening"], r.opening)
        conns.add_metric([d, "closing"], r.closing)
        cmax.add_metric([d], r.max_connections)
        held.add_metric([d], r.streams)
        streams.add_metric([d], r.streams_total)
        climit.add_metric([d], r.limit)
        pending.add_metric([d], r.waiting)
        pmax.add_metric([d], r.queue_limit)
        _observe(wait, [d], r.wait)
        created.add_metric([d], r.created)
        _observe(create, [d], r.create)
        for reason, n in sorted(r.closed.items()):
            closed.add_metric([d, reason], n)
        _observe(use, [d], r.use)
        acquired.add_metric([d, "idle"], r.reused)
        acquired.add_metric([d, "new"], r.acquired - r.reused)
        policy = r.policy
        for reason, n in sorted(r.rejections().items()):
            rejected.add_metric([d, reason], n)
        for rule, n in sorted(r.egress_denied.items()):
            egress.add_metric([d, rule], n)
        if policy is not None:
            _policy_families(f, d, policy)
        auth = r.auth
        if auth is not None:
            refreshes = f.counter("toolpool_auth_refreshes_total", "destination", "reason")
            for reason, n in sorted(auth.refreshes.items()):
                if LABEL_VALUE.match(reason):
                    refreshes.add_metric([d, reason], n)
            if auth.fetch is not None:
                _observe(f.histogram("toolpool_auth_fetch_seconds", "destination"), [d], auth.fetch)
            f.counter("toolpool_auth_failures_total", "destination").add_metric([d], auth.failures)
            f.counter("toolpool_auth_retries_total", "destination").add_metric([d], auth.retries)
            errors = f.counter("toolpool_auth_errors_total", "destination", "reason")
            errors.add_metric([d, "rejected"], auth.rejected)
            errors.add_metric([d, "negative_cache"], auth.negative_hits)
            f.gauge("toolpool_auth_contexts", "destination").add_metric([d], auth.contexts)
    yield from f


def _by_reason(f: _Families, name: str, label: str, d: str, counts: dict[str, int] | None) -> None:
    if counts is not None:
        fam = f.counter(name, "destination", label)
        for value, n in sorted(counts.items()):
            if LABEL_VALUE.match(value):
                fam.add_metric([d, value], n)


def _policy_families(f: _Families, d: str, policy: PolicyReading) -> None:
    _by_reason(f, "toolpool_retries_total", "reason", d, policy.retries)
    if policy.retries_denied is not None:
        f.counter("toolpool_retries_denied_total", "destination").add_metric(
            [d], policy.retries_denied
        )
    if policy.retry_budget is not None:
        f.gauge("toolpool_retry_budget_available", "destination").add_metric(
            [d], policy.retry_budget
        )
    if policy.breaker_state is not None:
        breaker = f.gauge("toolpool_breaker_state", "destination", "state")
        for state in BREAKER_STATES:
            breaker.add_metric([d, state], 1.0 if state == policy.breaker_state else 0.0)
    _by_reason(f, "toolpool_breaker_transitions_total", "state", d, policy.breaker_transitions)
    if policy.rate_limit_waits is not None:
        f.counter("toolpool_rate_limit_waits_total", "destination").add_metric(
            [d], policy.rate_limit_waits
        )
    if policy.rate_limit_wait_seconds is not None:
        f.counter("toolpool_rate_limit_wait_seconds_total", "destination").add_metric(
            [d], policy.rate_limit_wait_seconds
        )
    if policy.limit_reason is not None:
        f.gauge("toolpool_connections_limit_reason", "destination", "reason").add_metric(
            [d, policy.limit_reason], 1.0
        )
    _by_reason(f, "toolpool_connections_limit_changes_total", "direction", d, policy.limit_changes)
    if policy.admitted_total is not None:
        f.counter("toolpool_admissions_total", "destination").add_metric([d], policy.admitted_total)
    if policy.admission_waits is not None:
        f.counter("toolpool_admission_waits_total", "destination").add_metric(
            [d], policy.admission_waits
        )
    if policy.admitted is not None:
        f.gauge("toolpool_admitted_calls", "destination").add_metric([d], policy.admitted)
    if policy.saturation is not None:
        level = f.gauge("toolpool_saturation_state", "destination", "state")
        for state in SATURATION_STATES:
            level.add_metric([d, state], 1.0 if state == policy.saturation else 0.0)


def _tenant_families(counters: list[TenantCounters]) -> Iterator[Metric]:
    if not counters:
        return
    f = _Families()
    requests = f.counter("toolpool_tenant_requests_total", "destination", "tenant", "outcome")
    seconds = f.histogram("toolpool_tenant_request_seconds", "destination", "tenant")
    merged: dict[tuple[str, str], tuple[dict[str, int], HistogramReading]] = {}
    for tc in counters:
        for label, outcomes, hist in tc.read():
            key = (tc.destination, label)
            seen = merged.get(key)
            if seen is None:
                merged[key] = (outcomes, hist)
                continue
            for outcome, n in outcomes.items():
                seen[0][outcome] = seen[0].get(outcome, 0) + n
            seen[1].merge(hist)
    for (dest, label), (outcomes, hist) in sorted(merged.items()):
        for outcome, n in sorted(outcomes.items()):
            requests.add_metric([dest, label, outcome], n)
        _observe(seconds, [dest, label], hist)
    yield from f
