"""Typed snapshots of pool state: `pool.stats()` and the data behind the metrics.

A snapshot is taken under the destination's lock, so its numbers are consistent with each
other (e.g. `idle + in_use + opening + closing` never exceeds `max_connections`), and it
costs a copy of a few counters plus a sort of the recent-wait window (at most 2,048
values): cheap enough to call every second. `toolpool.metrics` exports the same counters
(see the README's metric table for the name of each field's series).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["DestinationStats", "PoolStats", "destination_stats"]


@dataclass(frozen=True)
class DestinationStats:
    """One destination's pool at one instant (`pool.stats()["crm"]`).

    Gauges describe now; `*_total` and `wait_count` / `wait_sum_seconds` count since the
    pool was built and never go down; percentiles cover a recent window. Every connection
    is in exactly one of the states `opening`, `idle`, `in_use`, `closing`, and all four
    count against `max_connections` (and against `effective_limit`).

    ```python
    s = pool.stats()["crm"]
    if s.utilization > 0.8 or s.waiting:
        print(f"crm busy: {s.in_use}/{s.max_connections} in use, {s.waiting} queued, "
              f"p99 wait {s.wait_p99_seconds * 1000:.0f} ms")
    ```
    """

    #: The destination's name (for destinations pooled on demand: its origin, e.g.
    #: ``https://api.example:443``).
    name: str
    #: The URL the destination was configured with.
    url: str
    #: The configured connection cap (shared by all auth contexts of the destination).
    max_connections: int
    #: How many requests may wait for a connection; beyond it requests fail at once with
    #: `PoolSaturated` (``queue_factor × max_connections``).
    queue_limit: int
    #: Open connections not in use, ready to be reused by their auth context.
    idle: int
    #: Connections leased to a request (from acquisition until the response body is read
    #: or closed).
    in_use: int
    #: Connections being opened (TCP connect, TLS handshake) for a request or for warm-up.
    opening: int
    #: Connections being closed (they count against the cap until the close completes).
    closing: int
    #: Requests queued for a connection right now (`waiting_counted` of them belong to calls
    #: counted upstream and take no place under `queue_limit`).
    waiting: int
    #: Connections opened successfully, warm-up included.
    created_total: int
    #: Connections closed, by reason: ``idle_ttl`` (unused for idle_ttl), ``lifetime``
    #: (max_lifetime reached), ``health`` (found dead by a health check or on borrow),
    #: ``affinity`` (closed to make room for a waiting request of another auth context),
    #: ``error`` (not reusable after its request: error, ``Connection: close``, body not
    #: read), ``shutdown`` (pool closed), ``limit`` (over a lowered effective limit).
    closed_total: Mapping[str, int]
    #: Connections handed out: once per request (a stale connection replaced under the
    #: same request does not count again) and once per preconnect of an auth provider.
    acquired_total: int
    #: The part of `acquired_total` served by an already open connection.
    reused_total: int
    #: Requests rejected at once because the queue was full (`PoolSaturated`).
    saturated_total: int
    #: Requests that waited `acquire_timeout` without getting a connection (`PoolTimeout`).
    timeouts_total: int
    #: Acquisitions whose wait was recorded (equals `acquired_total`), with their sum.
    wait_count: int
    #: Total seconds requests waited for a connection (0 for those served at once).
    wait_sum_seconds: float
    #: Median wait for a connection over the last 2,048 acquisitions (seconds).
    wait_p50_seconds: float
    #: 99th percentile of the same window (seconds).
    wait_p99_seconds: float
    #: The connection limit in force: `max_connections` unless the adaptive limit of
    #: `toolpool.resilience` lowered it (None in snapshots built without it).
    effective_limit: int | None = None
    #: Requests that had to queue for a connection (the rest were served at once).
    queued_total: int = 0
    #: Connections in use by a long-lived response: an event stream (``text/event-stream``,
    #: such as an MCP session's GET stream) or a request held far longer than this
    #: destination's requests usually are. Part of `in_use`, but not expected back soon.
    streams: int = 0
    #: Responses that turned out to be event streams, since the pool was built.
    streams_total: int = 0
    #: Credential fetches of the destination's auth provider by reason (``initial``,
    #: ``expiry``, ``401``); empty without a provider that reports stats.
    auth_refreshes_total: Mapping[str, int] = field(default_factory=dict)
    #: Queued requests of calls already counted (admitted or let in by the resilience layer,
    #: token fetches, retries): they wait in order but never make the pool refuse, so the
    #: queue may hold `queue_limit` calls plus these.
    waiting_counted: int = 0
    #: What the destination speaks: ``"http/1.1"``, ``"h2"``, or ``"unknown"`` (HTTP/2 is
    #: offered by ALPN and no connection has been opened yet). On ``"h2"`` the slot counts
    #: above (`idle`, `in_use`, `opening`, `max_connections`) count *requests* (stream
    #: permits), not connections; the connections are the `http2_*` fields.
    protocol: str = "http/1.1"
    #: Open HTTP/2 connections (one per active auth context, more only at the server's
    #: SETTINGS_MAX_CONCURRENT_STREAMS).
    http2_connections: int = 0
    #: HTTP/2 streams in flight across those connections.
    http2_streams_in_use: int = 0
    #: Streams in flight on each open HTTP/2 connection.
    http2_streams_per_connection: tuple[int, ...] = ()
    #: HTTP/2 connections opened since the pool was built (each is one the server accepted;
    #: `created_total` counts stream permits on ``"h2"``).
    http2_connections_opened: int = 0
    #: HTTP/2 connections closed since the pool was built, by reason (``idle_ttl``: unused
    #: for the idle TTL or their tenant's last permit expired; ``lifetime``; ``health``: no
    #: PING answer; ``shutdown``; ``error``: the server closed it, sent GOAWAY, or it
    #: failed). Opened minus closed is what is open at the server once the pool is quiet.
    http2_connections_closed: Mapping[str, int] = field(default_factory=dict)
    #: HTTP/2 streams opened (one per request sent, a resend is another) and streams the
    #: pool reset with RST_STREAM (a cancelled or abandoned request), since the pool was built.
    http2_streams_total: int = 0
    http2_streams_reset_total: int = 0

    @property
    def connections(self) -> int:
        """Connections that count against the cap (opening, idle, in use, closing)."""
        return self.opening + self.idle + self.in_use + self.closing

    @property
    def utilization(self) -> float:
        """Share of max_connections in use or being opened (0..1); sustained above 0.8
        means too little capacity or too little backpressure."""
        return (self.in_use + self.opening) / self.max_connections


@dataclass(frozen=True)
class PoolStats(Mapping[str, DestinationStats]):
    """Stats per destination name (`pool.stats()["crm"]`); also totals across destinations.

    Each destination's snapshot is consistent in itself; destinations are read one after
    the other, so totals add snapshots a few microseconds apart.
    """

    destinations: Mapping[str, DestinationStats]

    def __getitem__(self, name: str) -> DestinationStats:
        return self.destinations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.destinations)

    def __len__(self) -> int:
        return len(self.destinations)

    @property
    def in_use(self) -> int:
        """Connections in use, all destinations."""
        return sum(d.in_use for d in self.destinations.values())

    @property
    def idle(self) -> int:
        """Idle connections, all destinations."""
        return sum(d.idle for d in self.destinations.values())

    @property
    def waiting(self) -> int:
        """Queued requests, all destinations."""
        return sum(d.waiting for d in self.destinations.values())

    @property
    def created_total(self) -> int:
        """Connections opened so far, all destinations."""
        return sum(d.created_total for d in self.destinations.values())


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _auth_refreshes(auth: Any) -> dict[str, int]:
    """The auth provider's fetches by reason, if it reports them (read defensively: the
    provider is another module's object)."""
    stats = getattr(auth, "stats", None)
    if auth is None or not callable(stats):
        return {}
    try:
        refreshes = getattr(stats(), "refreshes_total", None)
    except Exception:
        return {}
    if not isinstance(refreshes, Mapping):
        return {}
    return {str(k): int(v) for k, v in refreshes.items()}


def destination_stats(dest: DestinationPool) -> DestinationStats:
    """A consistent snapshot of one destination (taken under its lock)."""
    with dest.lock:
        st = dest.state
        waits = sorted(st.recent_waits)
        snapshot = DestinationStats(
            name=dest.name,
            url=dest.settings.url,
            max_connections=st.limits.max_connections,
            queue_limit=st.limits.queue_limit,
            idle=st.idle,
            in_use=st.in_use,
            opening=st.opening,
            closing=st.closing,
            waiting=st.waiting,
            created_total=st.created_total,
            closed_total=dict(st.closed_total),
            acquired_total=st.acquired_total,
            reused_total=st.reused_total,
            saturated_total=st.saturated_total,
            timeouts_total=st.timeouts_total,
            wait_count=st.wait_count,
            wait_sum_seconds=st.wait_sum,
            wait_p50_seconds=_percentile(waits, 0.5),
            wait_p99_seconds=_percentile(waits, 0.99),
            effective_limit=st.cap,
            queued_total=st.queued_total,
            streams=st.streams,
            streams_total=st.streams_total,
            waiting_counted=st.waiting_counted,
        )
    refreshes = _auth_refreshes(dest.auth)
    if refreshes:
        snapshot = replace(snapshot, auth_refreshes_total=refreshes)
    h2 = dest.h2
    if h2 is not None:
        h2s = h2.stats()
        snapshot = replace(
            snapshot,
            protocol=h2s["protocol"],
            http2_connections=h2s["connections"],
            http2_streams_in_use=h2s["streams_in_use"],
            http2_streams_per_connection=tuple(h2s["streams_per_connection"]),
            http2_connections_opened=h2s["connections_opened"],
            http2_connections_closed=dict(h2s["connections_closed"]),
            http2_streams_total=h2s["streams_total"],
            http2_streams_reset_total=h2s["streams_reset"],
        )
    return snapshot
