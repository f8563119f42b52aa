"""`AuthStats`: one destination's credential counters (fetches, refreshes by reason, failures,
fetch durations), the data behind the auth metrics. Secret-free by construction: numbers and
the destination's name only."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "FETCH_BUCKETS",
    "REFRESH_REASONS",
    "AuthCounters",
    "AuthStats",
]

# Why a credential was fetched: the first one for a context, one ahead of (or past) its
# expiry, or one replacing a credential the destination rejected with 401.
INITIAL, EXPIRY, REJECTED = "initial", "expiry", "401"
REFRESH_REASONS = (INITIAL, EXPIRY, REJECTED)

# Upper bounds (seconds) of the fetch-duration histogram buckets; the last bucket is +Inf.
FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class AuthStats:
    """One destination's credential counters at one instant (`dest.auth.stats()`).

    Totals count since the pool was built. `refreshes_total` splits `fetches_total` by reason
    (`"initial"`, `"expiry"`, `"401"`); `background_refreshes_total` counts the expiry
    refreshes no request waited for (started while the old credential was still valid);
    `fetch_duration_buckets[i]` counts fetches that took
    at most `FETCH_BUCKETS[i]` seconds (and more than the bound before), the last entry those
    above every bound. Cancelled fetches count in `fetches_total` and `abandoned_total` only.
    """

    destination: str
    provider: str
    fetches_total: int
    refreshes_total: Mapping[str, int]
    failures_total: int
    abandoned_total: int
    fetch_duration_sum_seconds: float
    fetch_duration_count: int
    fetch_duration_buckets: tuple[int, ...]
    background_refreshes_total: int
    retries_total: int
    rejected_total: int
    negative_hits_total: int
    contexts: int

    @property
    def bucket_bounds(self) -> tuple[float, ...]:
        """The buckets' upper bounds in seconds (`FETCH_BUCKETS`; +Inf is implied last)."""
        return FETCH_BUCKETS


class AuthCounters:
    """The mutable counters behind `AuthStats`; the caller serialises updates."""

    __slots__ = (
        "abandoned_total",
        "background_refreshes_total",
        "duration_buckets",
        "duration_count",
        "duration_sum",
        "failures_total",
        "fetches_total",
        "negative_hits_total",
        "refreshes_total",
        "rejected_total",
        "retries_total",
    )

    def __init__(self) -> None:
        self.fetches_total = 0
        self.refreshes_total = dict.fromkeys(REFRESH_REASONS, 0)
        self.failures_total = 0
        self.abandoned_total = 0
        self.duration_sum = 0.0
        self.duration_count = 0
        self.duration_buckets = [0] * (len(FETCH_BUCKETS) + 1)
        # Expiry refreshes started ahead of expiry, while requests kept the old credential.
        self.background_refreshes_total = 0
        # A request re-sent after a 401 and a fresh credential.
        self.retries_total = 0
        # A request that met 401 again with a fresh credential (raised AuthError).
        self.rejected_total = 0
        # Requests failed at once because their context's credentials failed recently.
        self.negative_hits_total = 0

    def started(self, reason: str) -> None:
        self.fetches_total += 1
        self.refreshes_total[reason] += 1

    def observe(self, seconds: float, failed: bool) -> None:
        if failed:
            self.failures_total += 1
        self.duration_sum += seconds
        self.duration_count += 1
        self.duration_buckets[bisect.bisect_left(FETCH_BUCKETS, seconds)] += 1

    def snapshot(self, destination: str, provider: str, contexts: int) -> AuthStats:
        return AuthStats(
            destination=destination,
            provider=provider,
            fetches_total=self.fetches_total,
            refreshes_total=dict(self.refreshes_total),
            failures_total=self.failures_total,
            abandoned_total=self.abandoned_total,
            fetch_duration_sum_seconds=self.duration_sum,
            fetch_duration_count=self.duration_count,
            fetch_duration_buckets=tuple(self.duration_buckets),
            background_refreshes_total=self.background_refreshes_total,
            retries_total=self.retries_total,
            rejected_total=self.rejected_total,
            negative_hits_total=self.negative_hits_total,
            contexts=contexts,
        )
