"""toolpool.otel: the pool inside your OpenTelemetry traces and metrics.

```python
import toolpool.otel

pool = toolpool.Pool([...])
toolpool.otel.instrument(pool)      # the global tracer and meter providers, or pass your own
```

Each request becomes a client span (HTTP client semantic conventions) under whatever span is
current (a framework's tool-call span), with child spans for the pool wait, the connect, the
TLS handshake, the token request and retries, and on HTTP/2 the wait for another request's
connect and the PING of an idle connection (`SPAN_NAMES`), and events for resends and stream
resets; the pool's numbers become
`db.client.connection.*` instruments plus `http.client.request.duration` (`INSTRUMENTS`),
read from the same counters as `toolpool.metrics`.

Needs only `opentelemetry-api` (`pip install "toolpool[otel]"`); the application brings the
SDK and exporters. Without `instrument`, nothing of this module is imported and the request
path pays one attribute test per request.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "toolpool.otel needs the OpenTelemetry API: pip install 'toolpool[otel]' "
        "(or opentelemetry-api>=1.23)"
    ) from exc

from toolpool._version import __version__
from toolpool.errors import ConfigError
from toolpool.otel._metrics import HTTP_DURATION_BUCKETS, INSTRUMENTS, MeterBridge
from toolpool.otel._tracing import SPAN_NAMES, Tracing, redacted_url

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from toolpool._destination import DestinationPool
    from toolpool._pool import Pool
    from toolpool.metrics import TenantLabels

__all__ = [
    "HTTP_DURATION_BUCKETS",
    "INSTRUMENTS",
    "SPAN_NAMES",
    "Instrumentation",
    "instrument",
    "redacted_url",
    "uninstrument",
]

_SCOPE = "toolpool"
_lock = threading.Lock()
# One MeterBridge per meter (the instruments exist once per meter; pools share them).
_bridges: weakref.WeakKeyDictionary[Any, MeterBridge] = weakref.WeakKeyDictionary()
# What instrument() installed on each pool, until uninstrument(pool).
_installed: weakref.WeakKeyDictionary[Pool, Instrumentation] = weakref.WeakKeyDictionary()


@dataclass
class Instrumentation:
    """What `instrument` installed on one pool; `uninstrument(pool)` removes it."""

    pool: Any = field(repr=False)
    tracing: Tracing | None
    bridge: MeterBridge | None

    def _apply(self, dest: DestinationPool) -> None:
        if self.tracing is not None:
            self.tracing.install(dest)
        if self.bridge is not None:
            self.bridge.observe(dest)


def instrument(
    pool: Pool,
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    traces: bool = True,
    metrics: bool = True,
    tenants: TenantLabels | None = None,
) -> Instrumentation:
    """Trace `pool`'s requests and export its metrics through OpenTelemetry.

    - `tracer_provider` / `meter_provider`: default the global ones (set by your SDK setup).
    - `traces=False`: metrics only (the request duration histogram still needs the thin
      client layer, but no span is made); `metrics=False`: spans only.
    - `tenants`: a `toolpool.metrics.TenantLabels`; each client span then carries
      `toolpool.tenant`, the keyed hash of its tenant id. Without it spans name no tenant.

    Instrument before traffic starts: the histograms count from this moment on (the
    Prometheus collector counts from the pool's start). Destinations pooled on demand later
    are instrumented as they appear. Instrumenting a pool twice raises `ConfigError`.
    """
    if not traces and not metrics:
        raise ConfigError("instrument(traces=False, metrics=False) would do nothing")
    with _lock:
        if pool in _installed:
            raise ConfigError(
                "this pool is instrumented already; call toolpool.otel.uninstrument(pool) "
                "first to change providers"
            )
        bridge: MeterBridge | None = None
        if metrics:
            provider = meter_provider or _otel_metrics.get_meter_provider()
            meter = provider.get_meter(_SCOPE, __version__)
            bridge = _bridges.get(meter)
            if bridge is None:
                bridge = _bridges[meter] = MeterBridge(meter)
            bridge.add(pool)
        tracer = None
        if traces:
            tracer = (tracer_provider or _otel_trace.get_tracer_provider()).get_tracer(
                _SCOPE, __version__
            )
        tracing = Tracing(tracer, bridge.duration if bridge is not None else None, tenants)
        inst = Instrumentation(pool, tracing, bridge)
        _installed[pool] = inst
        if traces:
            pool._tool_spans = tracing
        for name in pool.destinations:
            inst._apply(pool.destination(name))
        pool._destination_hooks.append(inst._apply)
    return inst


def uninstrument(pool: Pool) -> None:
    """Remove what `instrument` installed on `pool` (no more spans; its series stop)."""
    with _lock:
        inst = _installed.pop(pool, None)
        if inst is None:
            return
        pool._tool_spans = None
        if inst.tracing is not None:
            inst.tracing.active = False
        if inst._apply in pool._destination_hooks:
            pool._destination_hooks.remove(inst._apply)
        for name in pool.destinations:
            dest = pool.destination(name)
            if inst.tracing is not None:
                inst.tracing.uninstall(dest)
            if inst.bridge is not None:
                inst.bridge.unobserve(dest)
        if inst.bridge is not None:
            inst.bridge.remove(pool)
