"""The adaptive concurrency limit of one destination: its configuration and the AIMD rule
that moves the effective connection limit between `min_limit` and max_connections.

Pure: `sample` takes `now` and returns the new limit when it changes; the policy runtime
applies it to the pool's state machine (`DestinationState.set_cap`). Not thread-safe by
itself; the runtime calls it under its lock.

Theory of operation
-------------------
Additive increase / multiplicative decrease, as in TCP and Netflix's concurrency-limits:

    a 429, 503 or connect timeout     limit *= overload_backoff at once   reason "http_429" ...
    at the end of a window (at least `interval` seconds and `min_samples` samples):
      median service time > latency_tolerance x baseline
        (and > baseline + min_latency_rise)     limit *= latency_backoff  reason "latency"
      otherwise                                 limit += 1                reason "recovery"

An overload signal acts at once, so a probe one step too high costs one refused request, not
a window's worth; signals of requests sent before the last decrease are echoes of the same
overload and are ignored, as TCP reacts to one loss per round trip.
A decrease starts a new window. Every decrease lowers the limit by at least one, never below
`min_limit`; increases stop at max_connections. The service time of a sample excludes the
time the request waited for a connection (the pool reports it), so a lowered limit does not
read as a slower downstream.

The *baseline* is the no-load service time: it follows a window's median down at once, and
up slowly (`baseline_drift` of the gap per window), so a downstream that stays slow becomes
the new normal after a while and the limit grows back, and one that recovers is trusted again
at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AdaptiveLimit", "AimdLimit"]

INITIAL = "initial"
LATENCY = "latency"
RECOVERY = "recovery"
TIMEOUT = "timeout"
HTTP_429 = "http_429"
HTTP_503 = "http_503"
OVERLOAD_SIGNALS = (HTTP_503, HTTP_429, TIMEOUT)
REASONS = (INITIAL, LATENCY, RECOVERY, *OVERLOAD_SIGNALS)


@dataclass(frozen=True)
class AdaptiveLimit:
    """How the effective connection limit reacts to overload.

    By default it reacts to unambiguous overload signals from the downstream: 429, 503 and
    connect timeouts at the pool's own `connect_timeout`. A read timeout is the caller's own
    deadline and lowers nothing (a slow downstream shows in its latency). Reacting to
    latency is opt-in (`latency_tolerance=2.0`): one tool destination often serves endpoints
    whose latencies differ a hundredfold, so its median latency moves with the mix of calls,
    not only with load, and a latency-driven limit would throttle healthy traffic.

    >>> AdaptiveLimit(latency_tolerance=2.0).latency_tolerance
    2.0
    """

    # Never below 2: one slow call must not serialise a whole destination.
    min_limit: int = 2
    # Windows of at least 250 ms: recovery climbs 4 steps a second at most, and the overload
    # signals of one round of requests count once.
    interval: float = 0.25
    # ...and at least 10 samples, so that a window's median means something.
    min_samples: int = 10
    # 429/503/connect timeouts cut the limit by a quarter: the downstream said "too much".
    overload_backoff: float = 0.75
    # Rising latency cuts by a tenth: a softer signal, a gentler step (Netflix's AIMD value).
    latency_backoff: float = 0.9
    # None: ignore latency (see above). A number: a window median above this many times the
    # baseline is overload.
    latency_tolerance: float | None = None
    # ...and above the baseline by at least 10 ms, so sub-millisecond jitter is not overload.
    min_latency_rise: float = 0.010
    # The baseline climbs 5 % of the gap per window: a downstream slow for ~20 windows
    # (5 s) is the new normal.
    baseline_drift: float = 0.05

    def __post_init__(self) -> None:
        if isinstance(self.min_limit, bool) or not isinstance(self.min_limit, int):
            raise ValueError(f"min_limit must be a whole number >= 1, got {self.min_limit!r}")
        if self.min_limit < 1:
            raise ValueError(f"min_limit must be a whole number >= 1, got {self.min_limit!r}")
        if not 0 < self.interval < math.inf:
            raise ValueError(
                f"interval must be a finite number of seconds > 0, got {self.interval!r}"
            )
        if isinstance(self.min_samples, bool) or self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {self.min_samples!r}")
        for name in ("overload_backoff", "latency_backoff"):
            value = getattr(self, name)
            if not 0 < value < 1:
                raise ValueError(f"{name} must be a fraction in (0, 1), got {value!r}")
        if self.latency_tolerance is not None and not self.latency_tolerance > 1:
            raise ValueError(
                f"latency_tolerance must be > 1 (a multiple of the baseline) or None, "
                f"got {self.latency_tolerance!r}"
            )
        if not self.min_latency_rise >= 0:
            raise ValueError(f"min_latency_rise must be >= 0, got {self.min_latency_rise!r}")
        if not 0 < self.baseline_drift <= 1:
            raise ValueError(f"baseline_drift must be in (0, 1], got {self.baseline_drift!r}")


class AimdLimit:
    """One destination's effective limit (see the module docstring)."""

    def __init__(self, config: AdaptiveLimit, max_limit: int, now: float) -> None:
        self.config = config
        self.max_limit = max_limit
        self.min_limit = min(config.min_limit, max_limit)
        self.limit = max_limit
        self.reason = INITIAL
        self.baseline: float | None = None
        self.decreases = 0
        self.increases = 0
        self._start = now
        self._last_decrease = -math.inf
        self._latencies: list[float] = []

    def sample(
        self,
        now: float,
        latency: float | None,
        signal: str | None = None,
        sent_at: float | None = None,
    ) -> int | None:
        """One request's outcome: its service time (None if it got no response), its
        overload signal (one of OVERLOAD_SIGNALS, or None) and when it was sent. Returns the
        new limit when it changed, else None."""
        cfg = self.config
        if signal is not None:
            if sent_at is not None and sent_at < self._last_decrease:
                return None  # an echo of the overload already acted on
            old = self.limit
            self._decrease(cfg.overload_backoff, signal)
            self._last_decrease = self._start = now
            self._latencies = []
            return self.limit if self.limit != old else None
        if latency is not None:
            self._latencies.append(latency)
        if now - self._start < cfg.interval or len(self._latencies) < cfg.min_samples:
            return None
        return self._close_window(now)

    def _close_window(self, now: float) -> int | None:
        cfg = self.config
        latencies = self._latencies
        self._latencies = []
        self._start = now
        latencies.sort()
        median = latencies[len(latencies) // 2]
        old = self.limit
        if (
            self.baseline is not None
            and cfg.latency_tolerance is not None
            and median > cfg.latency_tolerance * self.baseline
            and median - self.baseline > cfg.min_latency_rise
        ):
            self._decrease(cfg.latency_backoff, LATENCY)
            self._last_decrease = now
        elif self.limit < self.max_limit:
            self.limit += 1
            self.increases += 1
            self.reason = RECOVERY
        if self.baseline is None or median < self.baseline:
            self.baseline = median
        else:
            self.baseline += cfg.baseline_drift * (median - self.baseline)
        return self.limit if self.limit != old else None

    def _decrease(self, factor: float, reason: str) -> None:
        new = max(self.min_limit, min(self.limit - 1, math.floor(self.limit * factor)))
        if new < self.limit:
            self.limit = new
            self.decreases += 1
            self.reason = reason
