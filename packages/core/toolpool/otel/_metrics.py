"""The pool's metrics through an OpenTelemetry meter, from the same numbers as Prometheus.

Gauges and counters are observable instruments whose callbacks read each destination with
`toolpool.metrics._readings.read`, the very function the Prometheus collector scrapes with.
The three duration histograms (wait, create, use) cannot be observed after the fact (the
OpenTelemetry API has no asynchronous histogram), so the destination's state machine tells
them each duration as it records it into its own histogram (`DestinationState.observer`):
the same values, with the same bucket bounds advised, so both exporters count alike.

Names follow the database-client connection-pool conventions where one exists (the
Prometheus names map to them, see the README's metric table); the rest are `toolpool.*`.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Histogram, Meter, Observation

from toolpool._state import CREATE_BUCKETS, USE_BUCKETS, WAIT_BUCKETS
from toolpool.metrics._readings import DestinationReading, read_into

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool._pool import Pool

__all__ = ["HTTP_DURATION_BUCKETS", "INSTRUMENTS", "MeterBridge"]

POOL = "db.client.connection.pool.name"
# The HTTP semantic conventions' advised bounds for http.client.request.duration.
HTTP_DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
# One collection calls every callback in turn; they share one reading per destination.
_READING_TTL = 0.1

#: name -> (kind, unit, description) of every instrument.
INSTRUMENTS: dict[str, tuple[str, str, str]] = {
    "db.client.connection.count": (
        "updowncounter",
        "{connection}",
        "Connections by db.client.connection.state (idle, used, opening, closing); all "
        "count against the limit.",
    ),
    "db.client.connection.max": ("updowncounter", "{connection}", "Configured maximum."),
    "db.client.connection.pending_requests": (
        "updowncounter",
        "{request}",
        "Requests queued for a connection.",
    ),
    "db.client.connection.timeouts": (
        "counter",
        "{timeout}",
        "Requests that got no connection within acquire_timeout.",
    ),
    "db.client.connection.wait_time": (
        "histogram",
        "s",
        "Time a request waited for a connection (0 when one was free).",
    ),
    "db.client.connection.create_time": (
        "histogram",
        "s",
        "Time to open a connection (TCP connect plus TLS handshake).",
    ),
    "db.client.connection.use_time": (
        "histogram",
        "s",
        "Time a request held a connection, from lease (or open) to release.",
    ),
    "toolpool.connection.limit": (
        "updowncounter",
        "{connection}",
        "Effective limit: the maximum unless the adaptive limit lowered it.",
    ),
    "toolpool.connection.pending_requests.max": (
        "updowncounter",
        "{request}",
        "Queue bound; beyond it requests are refused at once.",
    ),
    "toolpool.connection.created": ("counter", "{connection}", "Connections opened."),
    "toolpool.connection.closed": (
        "counter",
        "{connection}",
        "Connections closed, by toolpool.close.reason.",
    ),
    "toolpool.connection.acquisitions": (
        "counter",
        "{acquisition}",
        "Connections handed to requests, by toolpool.acquisition.source (idle or new).",
    ),
    "toolpool.rejections": (
        "counter",
        "{request}",
        "Calls refused without being sent, by toolpool.rejection.reason.",
    ),
    "toolpool.auth.refreshes": (
        "counter",
        "{fetch}",
        "Credential fetches, by toolpool.auth.reason (initial, expiry, 401).",
    ),
    "toolpool.egress.denied": (
        "counter",
        "{connect}",
        "Connects refused by the egress policy, by toolpool.egress.rule.",
    ),
    "toolpool.http2.connections": (
        "updowncounter",
        "{connection}",
        "Open HTTP/2 connections (on HTTP/2 the db.client.connection.* series count stream "
        "permits, the unit of the cap).",
    ),
    "toolpool.http2.streams.in_use": ("updowncounter", "{stream}", "HTTP/2 streams in flight."),
    "toolpool.http2.connections.created": (
        "counter",
        "{connection}",
        "HTTP/2 connections opened (TCP, TLS, the server's SETTINGS).",
    ),
    "toolpool.http2.connections.closed": (
        "counter",
        "{connection}",
        "HTTP/2 connections closed, by toolpool.close.reason (idle_ttl, lifetime, health, "
        "shutdown, error).",
    ),
    "toolpool.http2.streams": ("counter", "{stream}", "HTTP/2 streams opened."),
    "toolpool.http2.streams.reset": (
        "counter",
        "{stream}",
        "HTTP/2 streams the pool reset with RST_STREAM (cancelled requests).",
    ),
    "http.client.request.duration": (
        "histogram",
        "s",
        "Time from a request entering the pool to its response head (all layers).",
    ),
}

_BOUNDS = {
    "db.client.connection.wait_time": WAIT_BUCKETS,
    "db.client.connection.create_time": CREATE_BUCKETS,
    "db.client.connection.use_time": USE_BUCKETS,
    "http.client.request.duration": HTTP_DURATION_BUCKETS,
}


class _Observer:
    """`DestinationState.observer` of one destination: durations into the histograms."""

    __slots__ = ("attributes", "bridge")

    def __init__(self, bridge: MeterBridge, name: str) -> None:
        self.bridge = bridge
        self.attributes = {POOL: name}

    def wait(self, seconds: float) -> None:
        self.bridge.wait_time.record(seconds, self.attributes)

    def create(self, seconds: float) -> None:
        self.bridge.create_time.record(seconds, self.attributes)

    def use(self, seconds: float) -> None:
        self.bridge.use_time.record(seconds, self.attributes)


def _speaks_h2(r: DestinationReading) -> bool:
    return r.protocol != "http/1.1" or r.http2_opened > 0


def _h2(r: DestinationReading, value: int) -> list[tuple[float, dict[str, Any]]]:
    return [(value, {})] if _speaks_h2(r) else []


class MeterBridge:
    """The instruments of one meter, reporting every pool instrumented with it (held weakly;
    same-named destinations of several pools are summed, as in the Prometheus collector)."""

    def __init__(self, meter: Meter) -> None:
        self._lock = threading.Lock()
        self._pools: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._cached: tuple[float, list[DestinationReading]] | None = None
        self.wait_time = self._histogram(meter, "db.client.connection.wait_time")
        self.create_time = self._histogram(meter, "db.client.connection.create_time")
        self.use_time = self._histogram(meter, "db.client.connection.use_time")
        self.duration = self._histogram(meter, "http.client.request.duration")
        observe: dict[str, Callable[[DestinationReading], Iterable[tuple[float, dict[str, Any]]]]]
        observe = {
            "db.client.connection.count": lambda r: [
                (r.idle, {"db.client.connection.state": "idle"}),
                (r.used, {"db.client.connection.state": "used"}),
                (r.opening, {"db.client.connection.state": "opening"}),
                (r.closing, {"db.client.connection.state": "closing"}),
            ],
            "db.client.connection.max": lambda r: [(r.max_connections, {})],
            "db.client.connection.pending_requests": lambda r: [(r.waiting, {})],
            "db.client.connection.timeouts": lambda r: [(r.rejections().get("timeout", 0), {})],
            "toolpool.connection.limit": lambda r: [(r.limit, {})],
            "toolpool.connection.pending_requests.max": lambda r: [(r.queue_limit, {})],
            "toolpool.connection.created": lambda r: [(r.created, {})],
            "toolpool.connection.closed": lambda r: [
                (n, {"toolpool.close.reason": reason}) for reason, n in sorted(r.closed.items())
            ],
            "toolpool.connection.acquisitions": lambda r: [
                (r.reused, {"toolpool.acquisition.source": "idle"}),
                (r.acquired - r.reused, {"toolpool.acquisition.source": "new"}),
            ],
            "toolpool.rejections": lambda r: [
                (n, {"toolpool.rejection.reason": reason})
                for reason, n in sorted(r.rejections().items())
            ],
            "toolpool.auth.refreshes": lambda r: [
                (n, {"toolpool.auth.reason": reason})
                for reason, n in sorted((r.auth.refreshes if r.auth else {}).items())
            ],
            "toolpool.egress.denied": lambda r: [
                (n, {"toolpool.egress.rule": rule}) for rule, n in sorted(r.egress_denied.items())
            ],
            # HTTP/2 (destinations that offer it; nothing for HTTP/1.1 ones).
            "toolpool.http2.connections": lambda r: _h2(r, r.http2_connections),
            "toolpool.http2.streams.in_use": lambda r: _h2(r, r.http2_streams_in_use),
            "toolpool.http2.connections.created": lambda r: _h2(r, r.http2_opened),
            "toolpool.http2.connections.closed": lambda r: (
                [(n, {"toolpool.close.reason": why}) for why, n in sorted(r.http2_closed.items())]
                if _speaks_h2(r)
                else []
            ),
            "toolpool.http2.streams": lambda r: _h2(r, r.http2_streams_total),
            "toolpool.http2.streams.reset": lambda r: _h2(r, r.http2_streams_reset),
        }
        for name, values in observe.items():
            kind, unit, description = INSTRUMENTS[name]
            create = (
                meter.create_observable_counter
                if kind == "counter"
                else meter.create_observable_up_down_counter
            )
            create(name, callbacks=[self._callback(values)], unit=unit, description=description)

    @staticmethod
    def _histogram(meter: Meter, name: str) -> Histogram:
        _, unit, description = INSTRUMENTS[name]
        return meter.create_histogram(
            name,
            unit=unit,
            description=description,
            explicit_bucket_boundaries_advisory=list(_BOUNDS[name]),
        )

    def _callback(
        self, values: Callable[[DestinationReading], Iterable[tuple[float, dict[str, Any]]]]
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            out = []
            for reading in self._readings():
                for value, attributes in values(reading):
                    out.append(Observation(value, {POOL: reading.name, **attributes}))
            return out

        return callback

    def _readings(self) -> list[DestinationReading]:
        now = time.monotonic()
        with self._lock:
            cached = self._cached
            if cached is not None and now - cached[0] < _READING_TTL:
                return cached[1]
            pools = list(self._pools)
        merged: dict[str, DestinationReading] = {}
        for pool in pools:
            read_into(merged, pool)
        readings = list(merged.values())
        with self._lock:
            self._cached = (now, readings)
        return readings

    # ------------------------------------------------------------------ pools

    def add(self, pool: Pool) -> None:
        with self._lock:
            self._pools.add(pool)
            self._cached = None

    def remove(self, pool: Pool) -> None:
        with self._lock:
            self._pools.discard(pool)
            self._cached = None

    def observe(self, dest: DestinationPool) -> None:
        """Feed the histograms from `dest`'s state machine from now on."""
        with dest.lock:
            dest.state.observer = _Observer(self, dest.name)

    @staticmethod
    def unobserve(dest: DestinationPool) -> None:
        with dest.lock:
            if isinstance(dest.state.observer, _Observer):
                dest.state.observer = None
