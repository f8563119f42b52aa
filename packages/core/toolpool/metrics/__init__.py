"""toolpool.metrics: Prometheus metrics of live pools (prometheus-client collectors).

```python
import toolpool, toolpool.metrics

pool = toolpool.Pool([toolpool.Destination("crm", "https://crm.internal")])
toolpool.metrics.register(pool)            # the global registry, or registry=CollectorRegistry()
toolpool.metrics.serve(9464)               # http://127.0.0.1:9464/metrics
# or, in an ASGI app:  app.mount("/metrics", toolpool.metrics.asgi_app())
```

Metrics are read from the pool's own counters when Prometheus scrapes, so the request path
does no metrics work (the opt-in per-tenant series are the exception, see `TenantLabels`).
Names follow OpenTelemetry's connection-pool conventions where one exists
(`db.client.connection.count`, `.max`, `.pending_requests`, `.wait_time`, `.create_time`,
`.use_time`, `.timeouts`), in base units, with bounded labels: `destination`, `state`,
`reason`, `source`; no tenant label unless asked for, and never a raw tenant id or a secret.
`METRICS` lists every name with its type and meaning; the README's "Observability" section
has the table and the Grafana dashboard.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

from prometheus_client import generate_latest
from prometheus_client.registry import REGISTRY, CollectorRegistry

from toolpool.metrics._collector import METRICS, PoolCollector
from toolpool.metrics._http import DEFAULT_PORT, MetricsServer, asgi_app, serve
from toolpool.metrics._tenants import TenantLabels

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = [
    "DEFAULT_PORT",
    "METRICS",
    "MetricsServer",
    "PoolCollector",
    "TenantLabels",
    "asgi_app",
    "exposition",
    "register",
    "serve",
    "unregister",
]

_lock = threading.Lock()
# One PoolCollector per registry, shared by every pool registered into it.
_collectors: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = (
    weakref.WeakKeyDictionary()
)


def register(
    pool: Pool,
    registry: CollectorRegistry | None = None,
    *,
    tenants: TenantLabels | None = None,
) -> PoolCollector:
    """Export `pool`'s metrics through `registry` (default: prometheus-client's global one).

    Registering the same pool twice is harmless. Several pools may share a registry; their
    destinations of the same name are summed. `tenants=TenantLabels(salt=...)` adds the
    opt-in per-tenant series. Returns the registry's `PoolCollector`.
    """
    registry = REGISTRY if registry is None else registry
    with _lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = PoolCollector()
            registry.register(collector)
            _collectors[registry] = collector
    collector.add(pool, tenants=tenants)
    return collector


def unregister(pool: Pool, registry: CollectorRegistry | None = None) -> None:
    """Stop exporting `pool` through `registry` (its series disappear at the next scrape)."""
    registry = REGISTRY if registry is None else registry
    with _lock:
        collector = _collectors.get(registry)
    if collector is not None:
        collector.remove(pool)


def exposition(registry: CollectorRegistry | None = None) -> str:
    """The Prometheus text exposition of `registry` now (what a scrape would return)."""
    return generate_latest(REGISTRY if registry is None else registry).decode()
