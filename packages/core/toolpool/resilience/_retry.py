"""Retries: their configuration and the tenacity strategies that carry them out.

tenacity runs the loop; this module only supplies its strategy objects:

    retry  = RetryableOutcome         idempotent requests (GET, HEAD, OPTIONS, TRACE, PUT,
                                      DELETE, or any method with an Idempotency-Key) on a
                                      retryable status or a lost connection; any method when
                                      the connection failed before anything was sent
    stop   = stop_after_attempt(n)    at most `attempts` attempts,
           | RetryAfterBeyond(max)    a Retry-After longer than `max_retry_after`: the response
                                      goes back to the caller instead of a long silent wait,
           | BudgetSpent(spend)       the destination's retry budget is empty (checked last,
                                      so budget is only spent on retries that will happen)
    wait   = RetryAfterOrBackoff      full-jitter exponential backoff, and never sooner than
                                      the server's Retry-After
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from tenacity import RetryCallState
from tenacity.retry import retry_base
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

from toolpool.resilience._outcome import retry_after_seconds, retry_reason

__all__ = [
    "BudgetSpent",
    "Retry",
    "RetryAfterBeyond",
    "RetryAfterOrBackoff",
    "RetryableOutcome",
    "attempt_outcome",
]

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


@dataclass(frozen=True)
class Retry:
    """Which failed attempts are sent again, how soon, and how many overall.

    >>> Retry(attempts=5, budget_ratio=0.1).budget_ratio
    0.1
    """

    # 1 call + 2 retries: two more chances ride out a blip; more would multiply a storm.
    attempts: int = 3
    # Full-jitter exponential backoff: the n-th retry waits a random time below
    # backoff * 2**(n-1) seconds, so retries of many callers spread out instead of syncing.
    backoff: float = 0.1
    # ...and never more than 2 s: a tool call is interactive.
    max_backoff: float = 2.0
    # A Retry-After of up to 5 s is waited for; a longer one is returned to the caller (the
    # destination is paused for everyone meanwhile, see Policy.max_pause).
    max_retry_after: float = 5.0
    # Retries may add at most 20 % to the calls of the last `budget_window` seconds
    # (Finagle's and gRPC's choice): a failing downstream sees 1.2x load, never 3x.
    budget_ratio: float = 0.2
    # ...plus 10 retries per window, so a lone caller can still retry at low traffic.
    budget_floor: int = 10
    # The budget's sliding window.
    budget_window: float = 10.0
    # Statuses that mean "try again": rate limited, bad gateway, unavailable, gateway
    # timeout. Retried for idempotent requests only.
    statuses: frozenset[int] = field(default=frozenset({429, 502, 503, 504}))
    # Methods that are idempotent (RFC 9110 9.2.2): sending them twice does no harm.
    methods: frozenset[str] = field(default=_IDEMPOTENT)
    # A request carrying this header is idempotent whatever its method (the server
    # deduplicates it); None disables this.
    idempotency_header: str | None = "idempotency-key"

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int):
            raise ValueError(f"attempts must be a whole number >= 1, got {self.attempts!r}")
        if self.attempts < 1:
            raise ValueError(f"attempts must be a whole number >= 1, got {self.attempts!r}")
        for name in ("backoff", "max_backoff", "max_retry_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
        if not isinstance(self.budget_ratio, int | float) or not 0 <= self.budget_ratio < math.inf:
            raise ValueError(
                f"budget_ratio must be a finite number >= 0, got {self.budget_ratio!r}"
            )
        if isinstance(self.budget_floor, bool) or not isinstance(self.budget_floor, int):
            raise ValueError(f"budget_floor must be a whole number >= 0, got {self.budget_floor!r}")
        if self.budget_floor < 0:
            raise ValueError(f"budget_floor must be a whole number >= 0, got {self.budget_floor!r}")
        if not isinstance(self.budget_window, int | float) or not 0 < self.budget_window < math.inf:
            raise ValueError(
                f"budget_window must be a number of seconds > 0, got {self.budget_window!r}"
            )
        object.__setattr__(self, "statuses", frozenset(self.statuses))
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        if self.idempotency_header is not None:
            object.__setattr__(self, "idempotency_header", self.idempotency_header.lower())

    def idempotent(self, request: httpx.Request) -> bool:
        """True if sending `request` twice is harmless."""
        if request.method in self.methods:
            return True
        header = self.idempotency_header
        return header is not None and header in request.headers


def attempt_outcome(
    rs: RetryCallState,
) -> tuple[httpx.Request, httpx.Response | None, BaseException | None]:
    """(request, response, exception) of the attempt tenacity just ran."""
    request = rs.args[0]
    outcome = rs.outcome
    assert outcome is not None
    if outcome.failed:
        return request, None, outcome.exception()
    return request, outcome.result(), None


def reason_of(config: Retry, rs: RetryCallState) -> str | None:
    """Why the last attempt may be retried (see `_outcome.retry_reason`), or None."""
    request, response, exc = attempt_outcome(rs)
    return retry_reason(request, response, exc, config.statuses, config.idempotent(request))


class RetryableOutcome(retry_base):
    """tenacity `retry`: the last attempt failed in a way that may be retried."""

    def __init__(self, config: Retry) -> None:
        self.config = config

    def __call__(self, retry_state: RetryCallState) -> bool:
        return reason_of(self.config, retry_state) is not None


class RetryAfterBeyond(stop_base):
    """tenacity `stop`: the server asked for a longer pause than we wait for."""

    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        _, response, _ = attempt_outcome(retry_state)
        if response is None:
            return False
        seconds = retry_after_seconds(response)
        return seconds is not None and seconds > self.limit


class BudgetSpent(stop_base):
    """tenacity `stop` (last in the chain): ask the destination's budget for one retry;
    `spend(reason)` returns False when the budget refuses."""

    def __init__(self, config: Retry, spend: Callable[[str], bool]) -> None:
        self.config = config
        self.spend = spend

    def __call__(self, retry_state: RetryCallState) -> bool:
        reason = reason_of(self.config, retry_state)
        return reason is None or not self.spend(reason)


class RetryAfterOrBackoff(wait_base):
    """tenacity `wait`: full-jitter exponential backoff, at least the server's Retry-After."""

    def __init__(self, config: Retry) -> None:
        self.backoff = wait_random_exponential(multiplier=config.backoff, max=config.max_backoff)

    def __call__(self, retry_state: RetryCallState) -> float:
        wait = self.backoff(retry_state)
        _, response, _ = attempt_outcome(retry_state)
        if response is not None:
            seconds = retry_after_seconds(response)
            if seconds is not None and seconds > wait:
                return seconds
        return wait
