"""Typed snapshots of pool state: `pool.stats()` and the data behind the metrics."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from toolpool._runtime import DestinationPool

__all__ = ["DestinationStats", "PoolStats", "destination_stats"]


@dataclass(frozen=True)
class DestinationStats:
    """One destination's pool at one instant."""

    name: str
    url: str
    max_connections: int
    queue_limit: int
    idle: int
    in_use: int
    opening: int
    closing: int
    waiting: int
    created_total: int
    closed_total: Mapping[str, int]
    acquired_total: int
    reused_total: int
    saturated_total: int
    timeouts_total: int
    wait_count: int
    wait_sum_seconds: float
    wait_p50_seconds: float
    wait_p99_seconds: float

    @property
    def connections(self) -> int:
        """Connections that count against the cap (opening, idle, in use, closing)."""
        return self.opening + self.idle + self.in_use + self.closing

    @property
    def utilization(self) -> float:
        """Share of max_connections in use or being opened (0..1)."""
        return (self.in_use + self.opening) / self.max_connections


@dataclass(frozen=True)
class PoolStats(Mapping[str, DestinationStats]):
    """Stats per destination name; also totals across destinations."""

    destinations: Mapping[str, DestinationStats]

    def __getitem__(self, name: str) -> DestinationStats:
        return self.destinations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.destinations)

    def __len__(self) -> int:
        return len(self.destinations)

    @property
    def in_use(self) -> int:
        return sum(d.in_use for d in self.destinations.values())

    @property
    def idle(self) -> int:
        return sum(d.idle for d in self.destinations.values())

    @property
    def waiting(self) -> int:
        return sum(d.waiting for d in self.destinations.values())

    @property
    def created_total(self) -> int:
        return sum(d.created_total for d in self.destinations.values())


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def destination_stats(dest: DestinationPool) -> DestinationStats:
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
        )
    return snapshot
