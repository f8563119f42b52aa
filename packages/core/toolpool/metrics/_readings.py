"""Scrape-time readings of one destination: every number the metrics export, copied from the
pool's own counters (and its auth provider's and resilience policy's) in one short critical
section, so that a scrape never slows the request path down and never sees half an update."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from toolpool._destination import DestinationPool
from toolpool._state import CLOSE_REASONS, WAIT_BUCKETS, Durations

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = [
    "AuthReading",
    "DestinationReading",
    "HistogramReading",
    "PolicyReading",
    "read",
    "read_into",
]

log = logging.getLogger("toolpool.metrics")

# What a label value taken from another module's stats may look like (bounded, no free text).
LABEL_VALUE = re.compile(r"^[a-z0-9_]{1,32}$")

# The breaker states the exposition knows, in order of severity (a merge keeps the worst).
BREAKER_STATES = ("closed", "half_open", "open")
# Saturation levels of toolpool.resilience, in order of severity.
SATURATION_STATES = ("ok", "busy", "saturated")


@dataclass
class HistogramReading:
    """A copied fixed-bucket histogram: per-bucket counts (not cumulative), +Inf last."""

    bounds: tuple[float, ...]
    buckets: list[int]
    sum: float
    count: int

    @classmethod
    def of(cls, hist: Durations) -> HistogramReading:
        return cls(hist.bounds, list(hist.buckets), hist.sum, hist.count)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus `le` buckets: cumulative counts, ending with +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.buckets, strict=False):
            running += n
            out.append((_le(bound), float(running)))
        out.append(("+Inf", float(running + self.buckets[-1])))
        return out

    def merge(self, other: HistogramReading) -> None:
        if other.bounds != self.bounds:
            return  # cannot add histograms over different buckets; keep the first
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += other.sum
        self.count += other.count


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class AuthReading:
    """The auth provider's counters (`dest.auth.stats()`), read defensively."""

    refreshes: dict[str, int]
    failures: int
    retries: int
    rejected: int
    negative_hits: int
    contexts: int
    fetch: HistogramReading | None

    def merge(self, other: AuthReading) -> None:
        for reason, n in other.refreshes.items():
            self.refreshes[reason] = self.refreshes.get(reason, 0) + n
        self.failures += other.failures
        self.retries += other.retries
        self.rejected += other.rejected
        self.negative_hits += other.negative_hits
        self.contexts += other.contexts
        if self.fetch is None:
            self.fetch = other.fetch
        elif other.fetch is not None:
            self.fetch.merge(other.fetch)


@dataclass
class PolicyReading:
    """The resilience policy's counters (`dest.policy.stats()`), read defensively.

    Any field the policy does not report stays None (and is then not exported)."""

    retries: dict[str, int] | None = None
    retries_denied: int | None = None
    retry_budget: float | None = None
    breaker_state: str | None = None
    breaker_transitions: dict[str, int] | None = None
    # Refusals by reason as the policy counts them (None: use the pool's own counts).
    rejections: dict[str, int] | None = None
    breaker_rejections: int | None = None
    rate_limited: int | None = None
    rate_limit_waits: int | None = None
    rate_limit_wait_seconds: float | None = None
    limit_reason: str | None = None
    limit_changes: dict[str, int] | None = None
    admitted_total: int | None = None
    admission_waits: int | None = None
    admitted: int | None = None
    saturation: str | None = None

    def merge(self, other: PolicyReading) -> None:
        for name in ("retries", "breaker_transitions", "rejections", "limit_changes"):
            setattr(self, name, _add_counts(getattr(self, name), getattr(other, name)))
        for name in (
            "retries_denied",
            "breaker_rejections",
            "rate_limited",
            "rate_limit_waits",
            "admitted_total",
            "admission_waits",
            "admitted",
        ):
            setattr(self, name, _add(getattr(self, name), getattr(other, name)))
        for name in ("retry_budget", "rate_limit_wait_seconds"):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine + (theirs or 0.0))
        if other.breaker_state is not None and (
            self.breaker_state is None
            or _severity(other.breaker_state) > _severity(self.breaker_state)
        ):
            self.breaker_state = other.breaker_state
        if other.saturation is not None and (
            self.saturation is None
            or SATURATION_STATES.index(other.saturation) > SATURATION_STATES.index(self.saturation)
        ):
            self.saturation = other.saturation
        if self.limit_reason is None:
            self.limit_reason = other.limit_reason


def _add_counts(a: dict[str, int] | None, b: dict[str, int] | None) -> dict[str, int] | None:
    if a is None or b is None:
        return b if a is None else a
    merged = dict(a)
    for key, n in b.items():
        merged[key] = merged.get(key, 0) + n
    return merged


def _severity(state: str) -> int:
    return BREAKER_STATES.index(state) if state in BREAKER_STATES else -1


def _add(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else a + b


@dataclass
class DestinationReading:
    """One destination's numbers at one scrape."""

    name: str
    idle: int
    used: int
    opening: int
    closing: int
    waiting: int
    max_connections: int
    limit: int
    queue_limit: int
    created: int
    closed: dict[str, int]
    acquired: int
    reused: int
    saturated: int
    timeouts: int
    wait: HistogramReading
    create: HistogramReading
    use: HistogramReading
    auth: AuthReading | None = None
    policy: PolicyReading | None = None
    # Connects the egress policy refused, by rule.
    egress_denied: dict[str, int] = field(default_factory=dict)
    # Long-lived responses (event streams, requests held long) holding a connection now,
    # and event streams seen since the start.
    streams: int = 0
    streams_total: int = 0
    # HTTP/2: the protocol spoken ("http/1.1", "h2", "unknown"), open HTTP/2 connections,
    # streams in flight on them, and the busiest connection's streams.
    protocol: str = "http/1.1"
    http2_connections: int = 0
    http2_streams_in_use: int = 0
    http2_streams_per_connection_max: int = 0
    # HTTP/2 connections opened and closed by reason, streams opened and reset by the pool.
    http2_opened: int = 0
    http2_closed: dict[str, int] = field(default_factory=dict)
    http2_streams_total: int = 0
    http2_streams_reset: int = 0
    # Same-named destinations of other pools registered in the same registry were added in.
    merged: int = field(default=1)

    def merge(self, other: DestinationReading) -> None:
        """Add another pool's destination of the same name (one registry, several pools)."""
        for name in (
            "idle",
            "used",
            "opening",
            "closing",
            "waiting",
            "max_connections",
            "limit",
            "queue_limit",
            "created",
            "acquired",
            "reused",
            "saturated",
            "timeouts",
            "streams",
            "streams_total",
            "http2_connections",
            "http2_streams_in_use",
            "http2_opened",
            "http2_streams_total",
            "http2_streams_reset",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.http2_streams_per_connection_max = max(
            self.http2_streams_per_connection_max, other.http2_streams_per_connection_max
        )
        for reason, n in other.closed.items():
            self.closed[reason] = self.closed.get(reason, 0) + n
        for reason, n in other.http2_closed.items():
            self.http2_closed[reason] = self.http2_closed.get(reason, 0) + n
        for rule, n in other.egress_denied.items():
            self.egress_denied[rule] = self.egress_denied.get(rule, 0) + n
        self.wait.merge(other.wait)
        self.create.merge(other.create)
        self.use.merge(other.use)
        if self.auth is None:
            self.auth = other.auth
        elif other.auth is not None:
            self.auth.merge(other.auth)
        if self.policy is None:
            self.policy = other.policy
        elif other.policy is not None:
            self.policy.merge(other.policy)
        self.merged += other.merged

    def rejections(self) -> dict[str, int]:
        """Calls refused without being sent, by reason: the resilience policy's counts when
        it reports them (admission refusals included), else the pool's own."""
        policy = self.policy
        if policy is not None and policy.rejections is not None:
            refused = {"queue_full": 0, "timeout": 0, **policy.rejections}
        else:
            refused = {"queue_full": self.saturated, "timeout": self.timeouts}
            if policy is not None and policy.breaker_rejections is not None:
                refused["breaker_open"] = policy.breaker_rejections
            if policy is not None and policy.rate_limited is not None:
                refused["rate_limited"] = policy.rate_limited
        return {reason: n for reason, n in refused.items() if LABEL_VALUE.match(reason)}


def read(dest: DestinationPool) -> DestinationReading:
    """Copy one destination's counters (O(buckets); the lock is held for the copy only)."""
    with dest.lock:
        st = dest.state
        reading = DestinationReading(
            name=dest.name,
            idle=st.idle,
            used=st.in_use,
            streams=st.streams,
            streams_total=st.streams_total,
            opening=st.opening,
            closing=st.closing,
            waiting=st.waiting,
            max_connections=st.limits.max_connections,
            limit=st.cap,
            queue_limit=st.limits.queue_limit,
            created=st.created_total,
            closed=dict(st.closed_total),
            acquired=st.acquired_total,
            reused=st.reused_total,
            saturated=st.saturated_total,
            timeouts=st.timeouts_total,
            wait=HistogramReading(WAIT_BUCKETS, list(st.wait_buckets), st.wait_sum, st.wait_count),
            create=HistogramReading.of(st.create_time),
            use=HistogramReading.of(st.use_time),
            egress_denied=dict(dest.egress_denied),
        )
    for reason in CLOSE_REASONS:
        reading.closed.setdefault(reason, 0)
    reading.auth = read_auth(dest.auth)
    reading.policy = read_policy(dest.policy)
    h2 = dest.h2
    if h2 is not None:
        h2s = h2.stats()
        reading.protocol = h2s["protocol"]
        reading.http2_connections = h2s["connections"]
        reading.http2_streams_in_use = h2s["streams_in_use"]
        reading.http2_streams_per_connection_max = max(h2s["streams_per_connection"], default=0)
        reading.http2_opened = h2s["connections_opened"]
        reading.http2_closed = dict(h2s["connections_closed"])
        reading.http2_streams_total = h2s["streams_total"]
        reading.http2_streams_reset = h2s["streams_reset"]
    return reading


# ---------------------------------------------------------------------- auth and policy
#
# The auth provider and the resilience policy are other modules' objects that may or may
# not report stats, and whose snapshots may grow fields over time. They are read by field
# name, tolerating absence, and a failing `stats()` never breaks a scrape (it drops that
# destination's auth or policy series for this scrape and logs at debug level).


def read_into(readings: dict[str, DestinationReading], pool: Pool) -> None:
    """Read every destination of `pool` into `readings` (by name), merged into the reading of
    a same-named destination of another pool already there."""
    for name in pool.destinations:
        reading = read(pool.destination(name))
        if name in readings:
            readings[name].merge(reading)
        else:
            readings[name] = reading


def _stats_of(obj: Any) -> Any:
    stats: Callable[[], Any] | None = getattr(obj, "stats", None)
    if obj is None or not callable(stats):
        return None
    try:
        return stats()
    except Exception:
        log.debug("stats() of %s failed; its series are skipped this scrape", type(obj).__name__)
        return None


def _get(snapshot: Any, *names: str) -> Any:
    """The first of `names` the snapshot has (attribute or mapping key), else None."""
    for name in names:
        if isinstance(snapshot, Mapping):
            if name in snapshot:
                return snapshot[name]
        elif hasattr(snapshot, name):
            return getattr(snapshot, name)
    return None


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _counts(value: Any) -> dict[str, int] | None:
    """A mapping of reason -> count (or a bare number, reported as reason "all")."""
    if isinstance(value, Mapping):
        out = {str(k): n for k, v in value.items() if (n := _int(v)) is not None}
        return out
    number = _int(value)
    return None if number is None else {"all": number}


def read_auth(auth: Any) -> AuthReading | None:
    snap = _stats_of(auth)
    if snap is None:
        return None
    refreshes = _counts(_get(snap, "refreshes_total")) or {}
    fetch: HistogramReading | None = None
    buckets = _get(snap, "fetch_duration_buckets")
    bounds = _get(snap, "bucket_bounds", "fetch_duration_bounds")
    count = _int(_get(snap, "fetch_duration_count"))
    total = _get(snap, "fetch_duration_sum_seconds")
    if (
        isinstance(buckets, tuple | list)
        and isinstance(bounds, tuple | list)
        and len(buckets) == len(bounds) + 1
        and count is not None
        and isinstance(total, int | float)
    ):
        fetch = HistogramReading(
            tuple(float(b) for b in bounds), [int(n) for n in buckets], float(total), count
        )
    return AuthReading(
        refreshes=refreshes,
        failures=_int(_get(snap, "failures_total")) or 0,
        retries=_int(_get(snap, "retries_total")) or 0,
        rejected=_int(_get(snap, "rejected_total")) or 0,
        negative_hits=_int(_get(snap, "negative_hits_total")) or 0,
        contexts=_int(_get(snap, "contexts")) or 0,
        fetch=fetch,
    )


def _state_name(value: Any) -> str | None:
    """A breaker state as one of BREAKER_STATES ("half-open", enums and the like mapped)."""
    if value is None:
        return None
    text = str(getattr(value, "value", value)).lower().replace("-", "_").replace(" ", "_")
    text = text.rsplit(".", 1)[-1]
    return text if text in BREAKER_STATES else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _label(value: Any, allowed: tuple[str, ...] | None = None) -> str | None:
    """A short lowercase label value, or None (never arbitrary text in a label)."""
    if not isinstance(value, str):
        return None
    text = value.lower().replace("-", "_").replace(" ", "_")
    if allowed is not None:
        return text if text in allowed else None
    return text if LABEL_VALUE.match(text) else None


def read_policy(policy: Any) -> PolicyReading | None:
    snap = _stats_of(policy)
    if snap is None:
        return None
    state = _get(snap, "breaker_state")
    changes = None
    down, up = _int(_get(snap, "limit_decreases_total")), _int(_get(snap, "limit_increases_total"))
    if down is not None and up is not None:
        changes = {"decrease": down, "increase": up}
    rejections = _counts(_get(snap, "rejections_total"))
    return PolicyReading(
        retries=_counts(_get(snap, "retries_total")),
        retries_denied=_int(_get(snap, "retries_denied_total")),
        retry_budget=_float(_get(snap, "retry_budget_available")),
        breaker_state=_state_name(state),
        breaker_transitions=_counts(_get(snap, "breaker_transitions_total")),
        rejections=rejections if rejections and "all" not in rejections else None,
        breaker_rejections=_int(_get(snap, "breaker_rejections_total")),
        rate_limited=_int(_get(snap, "rate_limited_total")),
        rate_limit_waits=_int(_get(snap, "rate_limit_waits_total")),
        rate_limit_wait_seconds=_float(_get(snap, "rate_limit_wait_seconds_total")),
        limit_reason=_label(_get(snap, "limit_reason")),
        limit_changes=changes,
        admitted_total=_int(_get(snap, "admitted_total")),
        admission_waits=_int(_get(snap, "admission_waits_total")),
        admitted=_int(_get(snap, "admitted")),
        saturation=_label(_get(snap, "saturation_state"), SATURATION_STATES),
    )
