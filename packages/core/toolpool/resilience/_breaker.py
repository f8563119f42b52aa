"""The circuit breaker of one destination: its configuration and its state machine (no I/O).

Every method takes `now` (a monotonic clock reading) and returns what the caller must do; none
blocks or sleeps. Not thread-safe by itself; the policy runtime calls it under its lock.

Theory of operation
-------------------
Three states, as in every breaker since Nygard's "Release It!":

    CLOSED     calls pass; their outcomes are counted in a sliding window
    OPEN       calls fail fast (the caller raises DestinationUnavailable) until `open_for`
               seconds have passed
    HALF_OPEN  up to `probes` calls pass as probes; the others fail fast

    CLOSED    --(failure rate >= failure_rate over >= min_calls, or
                 consecutive_failures in a row)------------------------------------> OPEN
    OPEN      --(open_for elapsed; checked by the next `allow`)-------------------> HALF_OPEN
    HALF_OPEN --(a probe succeeds)-------------------------------------------------> CLOSED
    HALF_OPEN --(a probe fails; open_for doubles, up to max_open_for)--------------> OPEN

`allow` hands out a `Permit`; the caller reports the call's outcome with `record(permit, ...)`
exactly once, including "ignore" when the call ended without saying anything about the
destination (cancelled, refused locally). Each opening starts a new *generation*; outcomes of
calls admitted in an earlier generation are ignored, so stragglers that were in flight when
the breaker opened can neither close it nor re-open it.

A failure counts once per *incident*. On HTTP/2 one connection carries many calls, and one
lost connection fails all of them at once: the caller passes the loss's `incident` token
with each, and only the first of them counts, toward the consecutive failures and the rate
alike. Otherwise one reset of a busy connection (10 streams) would read as "10 consecutive
failures" and stop every tenant's calls for `open_for` seconds, where the same reset on
HTTP/1.1 fails one call.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

__all__ = [
    "CLOSED",
    "FAILURE",
    "HALF_OPEN",
    "IGNORE",
    "OPEN",
    "SUCCESS",
    "Breaker",
    "CircuitBreaker",
    "Permit",
]

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"
STATES = (CLOSED, OPEN, HALF_OPEN)

# Outcomes a caller reports.
SUCCESS = "success"
FAILURE = "failure"
IGNORE = "ignore"


@dataclass(frozen=True)
class CircuitBreaker:
    """When a destination counts as down, and how it is probed back.

    A failure is a connection-level error, a timeout, or a status in `failure_statuses`;
    4xx answers (including 429) and other statuses are successes: the destination answered.

    >>> CircuitBreaker(consecutive_failures=3, open_for=2.0).open_for
    2.0
    """

    # Half of the calls failing means the destination is broken, not unlucky.
    failure_rate: float = 0.5
    # ...but only over enough calls that the rate means something.
    min_calls: int = 20
    # A destination that is down fails every call: 5 in a row says so without waiting for
    # min_calls (a quiet destination would otherwise never trip).
    consecutive_failures: int = 5
    # Failure rates are measured over the last 10 s: recent enough to react, long enough to
    # smooth one bad second.
    window: float = 10.0
    # Rest 5 s before the first probe: long enough to stop a retry storm, short enough that a
    # restarted downstream is used again quickly.
    open_for: float = 5.0
    # A downstream that keeps failing its probes is probed less and less, up to once a minute.
    max_open_for: float = 60.0
    # One probe at a time: a recovering downstream gets one request, not a thundering herd.
    probes: int = 1
    # Statuses that mean "the destination is not working" (gateway errors, unavailable).
    failure_statuses: frozenset[int] = field(default=frozenset({502, 503, 504}))

    def __post_init__(self) -> None:
        if not 0 < self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1], got {self.failure_rate!r}")
        for name in ("min_calls", "consecutive_failures", "probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        for name in ("window", "open_for", "max_open_for"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
        if self.max_open_for < self.open_for:
            raise ValueError(
                f"max_open_for ({self.max_open_for}) must be >= open_for ({self.open_for})"
            )
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))


class Permit:
    """Leave to send one call; report its outcome with `Breaker.record` exactly once."""

    __slots__ = ("generation", "probe", "recorded")

    def __init__(self, generation: int, probe: bool) -> None:
        self.generation = generation
        self.probe = probe
        self.recorded = False


class Breaker:
    """One destination's breaker state (see the module docstring)."""

    _BUCKETS = 10

    def __init__(self, config: CircuitBreaker) -> None:
        self.config = config
        self.state = CLOSED
        self.generation = 0
        self.opened_at = -math.inf
        self.open_for = config.open_for
        self.consecutive = 0
        self.probes_out = 0
        # Why it last opened (for DestinationUnavailable and logs).
        self.reason = ""
        # state -> times entered (for metrics).
        self.transitions: dict[str, int] = dict.fromkeys(STATES, 0)
        self._width = config.window / self._BUCKETS
        self._latest = -math.inf
        self._epoch = [-1] * self._BUCKETS
        self._ok = [0] * self._BUCKETS
        self._failed = [0] * self._BUCKETS
        # The incidents of the latest failures counted (see the module docstring). One loss
        # fails its calls within moments of each other; 64 is far more incidents than can be
        # interleaved with them.
        self._incidents: deque[object] = deque(maxlen=64)

    # ------------------------------------------------------------------ queries

    def retry_after(self, now: float) -> float:
        """Seconds until a call may pass again (0 when it may pass now)."""
        if self.state == OPEN:
            return max(0.0, self.opened_at + self.open_for - now)
        if self.state == HALF_OPEN and self.probes_out >= self.config.probes:
            # A probe is out; its answer decides. Suggest a short look-again.
            return min(self.open_for, 1.0)
        return 0.0

    def rejecting(self, now: float) -> bool:
        """True while a call arriving now would fail fast."""
        return self.retry_after(now) > 0.0

    def window_counts(self, now: float) -> tuple[int, int]:
        """(successes, failures) in the sliding window ending at `now`."""
        now = max(now, self._latest)
        oldest = math.floor(now / self._width) - self._BUCKETS + 1
        ok = failed = 0
        for i in range(self._BUCKETS):
            if self._epoch[i] >= oldest:
                ok += self._ok[i]
                failed += self._failed[i]
        return ok, failed

    # ------------------------------------------------------------------ calls

    def allow(self, now: float) -> Permit | None:
        """A call wants to go: a Permit, or None when it must fail fast (`retry_after`)."""
        state = self.state
        if state == CLOSED:
            return Permit(self.generation, probe=False)
        if state == OPEN:
            if now < self.opened_at + self.open_for:
                return None
            self._enter(HALF_OPEN)
            self.probes_out = 0
        if self.probes_out >= self.config.probes:
            return None
        self.probes_out += 1
        return Permit(self.generation, probe=True)

    def record(
        self, permit: Permit, outcome: str, now: float, incident: object | None = None
    ) -> str | None:
        """Report how a permitted call ended. Returns the new state if it changed.

        `incident` names the event behind a FAILURE shared by several calls (an HTTP/2
        connection lost under them); the failures after the first of an incident are ignored.
        """
        if permit.recorded:
            return None
        permit.recorded = True
        if permit.generation != self.generation:
            return None  # admitted before the last opening: says nothing about now
        if outcome == FAILURE and incident is not None:
            if any(seen is incident for seen in self._incidents):
                outcome = IGNORE  # already counted: the same lost connection
            else:
                self._incidents.append(incident)
        if permit.probe:
            if self.state != HALF_OPEN:
                return None
            self.probes_out -= 1
            if outcome == SUCCESS:
                self._close()
                return CLOSED
            if outcome == FAILURE:
                self.open_for = min(self.config.max_open_for, self.open_for * 2)
                self._open(now, "probe failed")
                return OPEN
            return None  # ignored: the probe slot is free for the next call
        if self.state != CLOSED or outcome == IGNORE:
            return None
        index = self._slot(now)
        cfg = self.config
        if outcome == SUCCESS:
            self._ok[index] += 1
            self.consecutive = 0
        else:
            self._failed[index] += 1
            self.consecutive += 1
            if self.consecutive >= cfg.consecutive_failures:
                self._open(now, f"{self.consecutive} consecutive failures")
                return OPEN
        if outcome == SUCCESS and not any(self._failed):
            return None  # no failure in the window: no rate to judge (the common case)
        # The rate is judged on every outcome once the window holds min_calls (as
        # Resilience4j does): the call that completes the volume may be a success.
        ok, failed = self.window_counts(now)
        total = ok + failed
        if total >= cfg.min_calls and failed >= cfg.failure_rate * total:
            self._open(now, f"{failed} of the last {total} calls failed")
            return OPEN
        return None

    # ------------------------------------------------------------------ internals

    def _enter(self, state: str) -> None:
        self.state = state
        self.transitions[state] += 1

    def _open(self, now: float, reason: str) -> None:
        self._enter(OPEN)
        self.generation += 1
        self.opened_at = now
        self.reason = reason
        self.probes_out = 0

    def _close(self) -> None:
        self._enter(CLOSED)
        self.generation += 1
        self.open_for = self.config.open_for
        self.consecutive = 0
        self.probes_out = 0  # probes still out belong to the old generation
        self.reason = ""
        self._epoch = [-1] * self._BUCKETS
        self._ok = [0] * self._BUCKETS
        self._failed = [0] * self._BUCKETS

    def _slot(self, now: float) -> int:
        now = self._latest = max(now, self._latest)
        epoch = math.floor(now / self._width)
        index = epoch % self._BUCKETS
        if self._epoch[index] != epoch:
            self._epoch[index] = epoch
            self._ok[index] = 0
            self._failed[index] = 0
        return index
