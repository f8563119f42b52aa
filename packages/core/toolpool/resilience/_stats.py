"""`PolicyStats`: the typed snapshot of one destination's resilience counters
(`pool.destination(name).policy.stats()`), read by toolpool.metrics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["PolicyStats"]


@dataclass(frozen=True)
class PolicyStats:
    """One destination's resilience counters at one instant.

    Counters (`*_total`) only grow. Label values are bounded sets: retry reasons
    ("http_429", "http_502", "http_503", "http_504", "connect_error", "connection_lost"),
    breaker states ("closed", "open", "half_open"), rejection reasons ("queue_full",
    "timeout", "breaker_open", "rate_limited"), limit reasons ("initial", "recovery",
    "latency", "http_429", "http_503", "timeout").
    """

    destination: str
    # Requests sent again, by why the previous attempt failed.
    retries_total: Mapping[str, int]
    # Retries the retry budget refused (the failure went back to the caller instead).
    retries_denied_total: int
    # Retries the budget would grant right now.
    retry_budget_available: float
    breaker_state: str
    # Times the breaker entered each state.
    breaker_transitions_total: Mapping[str, int]
    # Calls refused by the resilience layer, by reason (includes the pool's own queue-full
    # refusals of requests that went through the policy).
    rejections_total: Mapping[str, int]
    # The same as rejections_total["breaker_open"] / ["rate_limited"] (flat names for
    # exporters).
    breaker_rejections_total: int
    rate_limited_total: int
    # Requests that waited for a rate-limit token or a Retry-After pause, and how long.
    rate_limit_waits_total: int
    rate_limit_wait_seconds_total: float
    # The adaptive connection limit, its ceiling, and why it last changed.
    effective_limit: int
    max_connections: int
    limit_reason: str
    limit_decreases_total: int
    limit_increases_total: int
    # Calls admitted by `pool.admit`, and those that had to wait for it.
    admitted_total: int
    admission_waits_total: int
    # Calls inside admit now, and requests in flight that were not admitted.
    admitted: int
    in_flight_unadmitted: int
    # "ok", "busy" or "saturated" (see toolpool.resilience.Saturation).
    saturation_state: str
