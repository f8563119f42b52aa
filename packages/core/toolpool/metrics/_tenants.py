"""Opt-in per-tenant series: the tenant id becomes a keyed hash before it becomes a label, and
a thin wrapper around each destination's send counts requests per hashed tenant.

This is the one piece of metrics work on the request path, which is why it is off by
default. Where the numbers come from: the pool's own counters are per destination and its
state machine knows identities only as salted fingerprints of the whole auth context, so
per-tenant numbers need the request's `AuthContext`, which only the send path sees. The
wrapper costs a dict lookup (fingerprint -> tenant record), two clock reads and a short
uncontended lock per request; the label itself (a keyed BLAKE2b hash) is computed once per
auth context.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, field

import httpx

from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, SyncSend
from toolpool._destination import DestinationPool
from toolpool._state import Durations
from toolpool.errors import ConfigError, DestinationUnavailable, PoolSaturated, PoolTimeout
from toolpool.metrics._readings import HistogramReading

__all__ = ["TenantCounters", "TenantLabels", "install", "uninstall"]

monotonic = time.monotonic

# Errors that mean the request was refused without being sent (the pool or its policy).
_REFUSED = (PoolSaturated, PoolTimeout, DestinationUnavailable)
# Fingerprints remembered per destination before the cache starts over (each maps to its
# tenant's record; forgetting them only costs recomputing a hash).
_MAX_FINGERPRINTS = 10_000
# The label of requests with no auth context or a context without a tenant.
NO_TENANT = "none"
# The label of tenants beyond `max_tenants`.
OTHER_TENANTS = "other"
# Coarse buckets for the per-tenant time to response: every bucket is a series per tenant
# and destination, so fewer than for the pool-wide histograms.
TENANT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class TenantLabels:
    """Per-tenant series with a hashed `tenant` label, for small fleets (opt-in).

    ```python
    labels = toolpool.metrics.TenantLabels(salt=os.environ["TOOLPOOL_TENANT_SALT"])
    toolpool.metrics.register(pool, tenants=labels)
    labels.label("acme")   # '3f9c0a1b7d2e': the value to look for in dashboards
    ```

    The label is a keyed BLAKE2b hash of the tenant id (12 hex digits), so the exposition
    never contains a raw tenant id and nobody without the salt can confirm a guess. Use the
    same salt in every replica (labels stay comparable) and keep it out of the exposition
    and the logs like any secret. Requests with no tenant are labelled "none"; tenants
    beyond the first `max_tenants` seen per destination share the label "other", which
    bounds the number of series whatever the traffic.
    """

    salt: str | bytes = field(repr=False)
    # Each tenant adds about 14 series per destination (outcomes and a 9-bucket histogram):
    # 20 tenants keep 10 destinations near 3,000 series, a small fleet's budget.
    max_tenants: int = 20

    def __post_init__(self) -> None:
        if len(self._key) < 8:
            raise ConfigError(
                "TenantLabels needs a salt of at least 8 bytes (a secret shared by the "
                "replicas), so that hashed tenant labels cannot be reversed by guessing"
            )
        if self.max_tenants < 1:
            raise ConfigError(f"max_tenants must be >= 1, got {self.max_tenants}")

    @property
    def _key(self) -> bytes:
        key = self.salt.encode() if isinstance(self.salt, str) else bytes(self.salt)
        return key if len(key) <= 64 else hashlib.sha256(key).digest()

    def label(self, tenant: str | None) -> str:
        """The label value of `tenant` (compute it for a known tenant to find its series)."""
        if tenant is None:
            return NO_TENANT
        return hashlib.blake2b(tenant.encode(), key=self._key, digest_size=6).hexdigest()


class _Tenant:
    """One hashed tenant's counters at one destination."""

    __slots__ = ("label", "outcomes", "seconds")

    def __init__(self, label: str) -> None:
        self.label = label
        self.outcomes: dict[str, int] = {}
        self.seconds = Durations(TENANT_BUCKETS)


class TenantCounters:
    """Per-tenant request counters of one destination (filled by the send wrapper)."""

    def __init__(self, destination: str, labels: TenantLabels) -> None:
        self.destination = destination
        self.labels = labels
        self._lock = threading.Lock()
        self._by_fingerprint: dict[str, _Tenant] = {}
        self._by_label: dict[str, _Tenant] = {}
        self._hashed = 0  # hashed labels handed out (at most max_tenants)

    def tenant(self, ctx: AuthContext | None) -> _Tenant:
        fingerprint = ctx._fingerprint if ctx is not None else ""
        record = self._by_fingerprint.get(fingerprint)
        if record is None:
            record = self._learn(fingerprint, ctx)
        return record

    def _learn(self, fingerprint: str, ctx: AuthContext | None) -> _Tenant:
        label = self.labels.label(ctx.tenant if ctx is not None else None)
        with self._lock:
            record = self._by_label.get(label)
            if record is None:
                if label != NO_TENANT:
                    if self._hashed >= self.labels.max_tenants:
                        label = OTHER_TENANTS
                        record = self._by_label.get(label)
                    else:
                        self._hashed += 1
                if record is None:
                    record = self._by_label[label] = _Tenant(label)
            if len(self._by_fingerprint) >= _MAX_FINGERPRINTS:
                self._by_fingerprint.clear()
            self._by_fingerprint[fingerprint] = record
        return record

    def finish(self, record: _Tenant, outcome: str, seconds: float | None) -> None:
        """Count one request of `record`'s tenant (`seconds`: to its response head)."""
        with self._lock:
            record.outcomes[outcome] = record.outcomes.get(outcome, 0) + 1
            if seconds is not None:
                record.seconds.observe(seconds)

    def answered(self, record: _Tenant, status: int, seconds: float) -> None:
        """Count one answered request (the hot path of the wrapper)."""
        outcome = _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "error"
        outcomes = record.outcomes
        with self._lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            record.seconds.observe(seconds)

    def read(self) -> list[tuple[str, dict[str, int], HistogramReading]]:
        """(label, outcome counts, time-to-response histogram) per hashed tenant."""
        with self._lock:
            return [
                (t.label, dict(t.outcomes), HistogramReading.of(t.seconds))
                for t in self._by_label.values()
            ]


_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def _failure(exc: BaseException) -> str:
    if isinstance(exc, _REFUSED):
        return "rejected"
    return "error" if isinstance(exc, Exception) else "cancelled"


class TenantLayer:
    """The "tenant_metrics" layer of a destination's send chain (outside auth, policy and
    overflow, see `toolpool._chain`): counts each whole call, retries included, per hashed
    tenant, with its time to response."""

    role = "tenant_metrics"

    def __init__(self, counters: TenantCounters) -> None:
        self.counters = counters

    def wrap_async(self, inner: AsyncSend) -> AsyncSend:
        """The counting async send around `inner`."""
        counters = self.counters
        known = counters._by_fingerprint
        learn = counters._learn
        answered = counters.answered

        async def async_send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            fingerprint = ctx._fingerprint if ctx is not None else ""
            record = known.get(fingerprint) or learn(fingerprint, ctx)
            started = monotonic()
            try:
                response = await inner(request, ctx)
            except BaseException as exc:
                counters.finish(record, _failure(exc), None)
                raise
            answered(record, response.status_code, monotonic() - started)
            return response

        return async_send

    def wrap_sync(self, inner: SyncSend) -> SyncSend:
        """The counting sync send around `inner`."""
        counters = self.counters
        known = counters._by_fingerprint
        learn = counters._learn
        answered = counters.answered

        def sync_send(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            fingerprint = ctx._fingerprint if ctx is not None else ""
            record = known.get(fingerprint) or learn(fingerprint, ctx)
            started = monotonic()
            try:
                response = inner(request, ctx)
            except BaseException as exc:
                counters.finish(record, _failure(exc), None)
                raise
            answered(record, response.status_code, monotonic() - started)
            return response

        return sync_send


def install(dest: DestinationPool, labels: TenantLabels) -> TenantLayer:
    """Add a tenant-counting layer to `dest`'s send chain; its counters are `.counters`."""
    layer = TenantLayer(TenantCounters(dest.name, labels))
    dest.add_layer(layer)
    return layer


def uninstall(dest: DestinationPool, layer: TenantLayer) -> None:
    """Take the layer `install` added out of `dest`'s send chain."""
    dest.remove_layer(layer)
