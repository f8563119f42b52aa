"""Exact per-service event counters, and the frozen ServiceStats snapshot they produce."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServiceStats:
    """A consistent snapshot of one service's counters (``Downstream.stats(name)``).

    Every number is counted from events, never sampled. ``requests_total`` counts every API and
    token request (not the ``/_testbed`` admin ones); ``requests_in_progress`` and its peak count
    API requests only, the ones ``concurrency_limit`` governs (the token endpoint stands for a
    separate identity provider that happens to share the port). A malformed request is
    answered 400 and closed without being counted.
    """

    connections_accepted: int = 0
    #: Open right now (a gauge, not reset by ``reset_stats``).
    connections_open: int = 0
    #: Highest number of simultaneously open connections.
    peak_connections: int = 0
    #: Connections the server closed because they sat idle for ``keepalive_timeout`` (counted
    #: when it closes them; a TLS connection leaves ``connections_open`` up to 1 s later, after
    #: the close_notify exchange).
    connections_closed_by_server_idle: int = 0
    requests_total: int = 0
    #: API requests admitted and not yet answered (a gauge).
    requests_in_progress: int = 0
    peak_requests_in_progress: int = 0
    #: API requests answered 503 because ``concurrency_limit`` requests were in progress.
    rejected_over_limit: int = 0
    token_requests: int = 0
    #: Token requests of an identified tenant (valid client or subject token), per tenant.
    token_requests_by_tenant: Mapping[str, int] = field(default_factory=dict)
    responses_by_status: Mapping[int, int] = field(default_factory=dict)
    http_503: int = 0
    http_429: int = 0
    http_401: int = 0
    #: connection id -> every tenant (``None``: no tenant) whose requests that connection carried.
    connection_tenants: Mapping[int, frozenset[str | None]] = field(default_factory=dict)
    #: fault kind -> times it fired.
    faults_fired: Mapping[str, int] = field(default_factory=dict)
    #: connection id -> the protocol it speaks: ``"http/1.1"`` or ``"h2"``.
    connection_protocols: Mapping[int, str] = field(default_factory=dict)
    #: HTTP/2 streams opened by clients (requests on HTTP/2 connections, token ones included).
    streams_total: int = 0
    #: HTTP/2 streams open right now, across all connections (a gauge).
    streams_open: int = 0
    #: Highest number of simultaneously open HTTP/2 streams across all connections: what a
    #: server counting each stream against a per-destination limit sees.
    peak_streams_open: int = 0
    #: connection id -> HTTP/2 streams that connection carried.
    connection_streams: Mapping[int, int] = field(default_factory=dict)
    #: connection id -> highest number of simultaneously open streams on it.
    peak_connection_streams: Mapping[int, int] = field(default_factory=dict)
    #: HTTP/2 streams the client cancelled with RST_STREAM.
    streams_reset_by_client: int = 0
    #: HTTP/2 PING frames received (and answered, unless the connection was silent).
    pings_received: int = 0

    def http2_connections(self) -> int:
        """How many of the connections counted here spoke HTTP/2."""
        return sum(1 for p in self.connection_protocols.values() if p == "h2")

    def mixed_connections(self) -> dict[int, frozenset[str | None]]:
        """Connections that carried more than one tenant (empty when affinity held)."""
        return {cid: t for cid, t in self.connection_tenants.items() if len(t) > 1}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the ``/_testbed/stats`` body); :meth:`from_json` reverses it."""
        data = asdict(self)
        data["token_requests_by_tenant"] = dict(self.token_requests_by_tenant)
        data["responses_by_status"] = {str(k): v for k, v in self.responses_by_status.items()}
        data["connection_tenants"] = {
            str(cid): sorted(tenants, key=lambda t: (t is not None, t or ""))
            for cid, tenants in self.connection_tenants.items()
        }
        data["faults_fired"] = dict(self.faults_fired)
        for name in _BY_CONNECTION:
            data[name] = {str(k): v for k, v in getattr(self, name).items()}
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceStats:
        """Rebuild a snapshot from :meth:`to_json` output (e.g. from another process)."""
        values = dict(data)
        values["responses_by_status"] = {
            int(k): int(v) for k, v in data["responses_by_status"].items()
        }
        values["connection_tenants"] = {
            int(k): frozenset(v) for k, v in data["connection_tenants"].items()
        }
        values["token_requests_by_tenant"] = dict(data["token_requests_by_tenant"])
        values["faults_fired"] = dict(data["faults_fired"])
        for name in _BY_CONNECTION:
            values[name] = {int(k): v for k, v in data.get(name, {}).items()}
        return cls(**values)


_BY_CONNECTION = ("connection_protocols", "connection_streams", "peak_connection_streams")


class Counters:
    """The mutable counters behind :class:`ServiceStats`.

    Written by the server loop only, read from any thread: every change and every snapshot holds
    one lock, so a snapshot is consistent. Waiters (tests) are woken on every change, which lets
    them wait for a condition instead of sleeping.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._next_connection_id = 0
        self.connections_open = 0
        self.requests_in_progress = 0
        self.streams_open = 0
        self._open_on: dict[int, int] = {}  # connection id -> streams open on it (a gauge)
        self._zero()

    def _zero(self) -> None:
        self.connections_accepted = 0
        self.peak_connections = self.connections_open
        self.connections_closed_by_server_idle = 0
        self.requests_total = 0
        self.peak_requests_in_progress = self.requests_in_progress
        self.rejected_over_limit = 0
        self.token_requests = 0
        self.token_requests_by_tenant: dict[str, int] = {}
        self.responses_by_status: dict[int, int] = {}
        self.connection_tenants: dict[int, set[str | None]] = {}
        self.faults_fired: dict[str, int] = {}
        self.connection_protocols: dict[int, str] = {}
        self.streams_total = 0
        self.peak_streams_open = self.streams_open
        self.connection_streams: dict[int, int] = {}
        self.peak_connection_streams: dict[int, int] = {}
        self.streams_reset_by_client = 0
        self.pings_received = 0

    # -- events (server loop) ------------------------------------------------------------

    def connection_opened(self) -> int:
        """Count an accepted connection; return its id (1, 2, ... per service)."""
        with self._lock:
            self._next_connection_id += 1
            self.connection_protocols[self._next_connection_id] = "http/1.1"
            self.connections_accepted += 1
            self.connections_open += 1
            if self.connections_open > self.peak_connections:
                self.peak_connections = self.connections_open
            if self._waiters:
                self._cond.notify_all()
            return self._next_connection_id

    def connection_speaks_h2(self, connection_id: int) -> None:
        """Connection ``connection_id`` negotiated HTTP/2 by ALPN."""
        with self._lock:
            self.connection_protocols[connection_id] = "h2"
            if self._waiters:
                self._cond.notify_all()

    def stream_opened(self, connection_id: int) -> None:
        """A client opened an HTTP/2 stream (sent a request's HEADERS)."""
        with self._lock:
            self.streams_total += 1
            self.streams_open += 1
            if self.streams_open > self.peak_streams_open:
                self.peak_streams_open = self.streams_open
            carried = self.connection_streams
            carried[connection_id] = carried.get(connection_id, 0) + 1
            now = self._open_on.get(connection_id, 0) + 1
            self._open_on[connection_id] = now
            if now > self.peak_connection_streams.get(connection_id, 0):
                self.peak_connection_streams[connection_id] = now
            if self._waiters:
                self._cond.notify_all()

    def streams_closed(self, connection_id: int, n: int = 1, *, by_client_reset: int = 0) -> None:
        """``n`` HTTP/2 streams of ``connection_id`` closed (``by_client_reset`` of them by
        the client's RST_STREAM)."""
        with self._lock:
            self.streams_open -= n
            left = self._open_on.get(connection_id, 0) - n
            if left > 0:
                self._open_on[connection_id] = left
            else:
                self._open_on.pop(connection_id, None)
            self.streams_reset_by_client += by_client_reset
            if self._waiters:
                self._cond.notify_all()

    def ping_received(self) -> None:
        with self._lock:
            self.pings_received += 1
            if self._waiters:
                self._cond.notify_all()

    def connection_closed(self) -> None:
        with self._lock:
            self.connections_open -= 1
            if self._waiters:
                self._cond.notify_all()

    def closed_for_idle(self) -> None:
        """The server decided to close a connection idle for ``keepalive_timeout``."""
        with self._lock:
            self.connections_closed_by_server_idle += 1
            if self._waiters:
                self._cond.notify_all()

    def request_received(self, connection_id: int, tenant_known: bool, tenant: str | None) -> None:
        """Count an API request that is not admitted (a fault took it); record its tenant."""
        with self._lock:
            self.requests_total += 1
            if tenant_known:
                self._tenant_locked(connection_id, tenant)
            if self._waiters:
                self._cond.notify_all()

    def api_request(
        self, connection_id: int, authorized: bool, tenant: str | None, limit: int | None
    ) -> bool | None:
        """Count an API request and decide its admission, atomically.

        Returns None when ``limit`` requests are already in progress (answer 503), False when
        unauthorized (answer 401), True when admitted (now in progress).
        """
        with self._lock:
            self.requests_total += 1
            if authorized:
                self._tenant_locked(connection_id, tenant)
            if limit is not None and self.requests_in_progress >= limit:
                self.rejected_over_limit += 1
                admitted: bool | None = None
            elif authorized:
                self.requests_in_progress += 1
                if self.requests_in_progress > self.peak_requests_in_progress:
                    self.peak_requests_in_progress = self.requests_in_progress
                admitted = True
            else:
                admitted = False
            if self._waiters:
                self._cond.notify_all()
            return admitted

    def _tenant_locked(self, connection_id: int, tenant: str | None) -> None:
        seen = self.connection_tenants.get(connection_id)
        if seen is None:
            self.connection_tenants[connection_id] = {tenant}
        else:
            seen.add(tenant)

    def api_finished(self) -> None:
        """An admitted API request ended without a response (its connection went away)."""
        with self._lock:
            self.requests_in_progress -= 1
            if self._waiters:
                self._cond.notify_all()

    def responded(self, status: int, *, api_finished: bool = False) -> None:
        """Count a response (and, with ``api_finished``, the end of an admitted API request)."""
        with self._lock:
            if api_finished:
                self.requests_in_progress -= 1
            self.responses_by_status[status] = self.responses_by_status.get(status, 0) + 1
            if self._waiters:
                self._cond.notify_all()

    def token_request(self, connection_id: int, tenant_known: bool, tenant: str | None) -> None:
        """Count a token request; with a known tenant, per tenant and on its connection."""
        with self._lock:
            self.requests_total += 1
            self.token_requests += 1
            if tenant_known:
                self._tenant_locked(connection_id, tenant)
                if tenant is not None:
                    by = self.token_requests_by_tenant
                    by[tenant] = by.get(tenant, 0) + 1
            if self._waiters:
                self._cond.notify_all()

    def fault_fired(self, kind: str) -> None:
        with self._lock:
            self.faults_fired[kind] = self.faults_fired.get(kind, 0) + 1
            if self._waiters:
                self._cond.notify_all()

    # -- reading (any thread) ----------------------------------------------------------------

    def reset(self) -> None:
        """Zero the counters; gauges (open connections, requests in progress) stay true."""
        with self._lock:
            self._zero()
            if self._waiters:
                self._cond.notify_all()

    def snapshot(self) -> ServiceStats:
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> ServiceStats:
        by_status = dict(self.responses_by_status)
        return ServiceStats(
            connections_accepted=self.connections_accepted,
            connections_open=self.connections_open,
            peak_connections=self.peak_connections,
            connections_closed_by_server_idle=self.connections_closed_by_server_idle,
            requests_total=self.requests_total,
            requests_in_progress=self.requests_in_progress,
            peak_requests_in_progress=self.peak_requests_in_progress,
            rejected_over_limit=self.rejected_over_limit,
            token_requests=self.token_requests,
            token_requests_by_tenant=dict(self.token_requests_by_tenant),
            responses_by_status=by_status,
            http_503=by_status.get(503, 0),
            http_429=by_status.get(429, 0),
            http_401=by_status.get(401, 0),
            connection_tenants={c: frozenset(t) for c, t in self.connection_tenants.items()},
            faults_fired=dict(self.faults_fired),
            connection_protocols=dict(self.connection_protocols),
            streams_total=self.streams_total,
            streams_open=self.streams_open,
            peak_streams_open=self.peak_streams_open,
            connection_streams=dict(self.connection_streams),
            peak_connection_streams=dict(self.peak_connection_streams),
            streams_reset_by_client=self.streams_reset_by_client,
            pings_received=self.pings_received,
        )

    def wait(self, predicate: Callable[[ServiceStats], bool], timeout: float) -> ServiceStats:
        """Block until ``predicate(snapshot)`` holds; raise ``TimeoutError`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._waiters += 1
            try:
                while True:
                    snap = self._snapshot_locked()
                    if predicate(snap):
                        return snap
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(
                            f"service stats did not reach the expected state in {timeout} s; "
                            f"last snapshot: {snap}"
                        )
                    self._cond.wait(remaining)
            finally:
                self._waiters -= 1
