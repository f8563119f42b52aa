"""`Policy`: a destination's resilience configuration (a frozen dataclass, each default with
its reason). Configuration only: the pool runs it as a `PolicyRuntime` layer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from toolpool.errors import ConfigError
from toolpool.resilience._adaptive import AdaptiveLimit
from toolpool.resilience._breaker import CircuitBreaker
from toolpool.resilience._ratelimit import RateLimit
from toolpool.resilience._retry import Retry

__all__ = ["DEFAULT_POLICY", "Policy"]


@dataclass(frozen=True)
class Policy:
    """A destination's resilience: retries, circuit breaker, rate limit, adaptive limit.

    Every pool applies `Policy()` to each destination unless told otherwise
    (`toolpool.Pool(policy=...)` for all, `Destination(policy=...)` for one, `Policy.off()`
    to turn the pieces off; `Pool(policy=None)` for no resilience layer at all). Set a piece to
    None to turn it off.

    ```python
    from toolpool.resilience import Policy, RateLimit, Retry

    Destination("crm", "https://crm.internal", documented_limit=100,
                policy=Policy(rate_limit=RateLimit(rate=50, per_tenant=True),
                              retry=Retry(attempts=4)))
    ```
    """

    # Retries of idempotent requests and of failed connects, within a 20 % retry budget.
    retry: Retry | None = field(default_factory=Retry)
    # Fail fast while a destination is down instead of queueing calls that will fail.
    breaker: CircuitBreaker | None = field(default_factory=CircuitBreaker)
    # No rate limit unless you know the downstream's (the connection limit already bounds
    # concurrency; a made-up rate would only slow healthy traffic).
    rate_limit: RateLimit | None = None
    # On: 429, 503 and connect timeouts (never a caller's own read timeout) lower the
    # connection limit below max_connections, and
    # recovery raises it one step per window (latency is opt-in, see AdaptiveLimit).
    adaptive: AdaptiveLimit | None = field(default_factory=AdaptiveLimit)
    # A request waits at most 5 s for a rate-limit start or the end of a Retry-After pause,
    # and `pool.admit` waits 5 s by default: long enough to ride out a burst (a full queue
    # drains in about queue_factor service times), short enough that an agent gets a
    # readable "busy, retry in N s" instead of a hung tool call.
    max_wait: float = 5.0
    # A server's Retry-After pauses the destination (503) or the tenant (429) for at most
    # 30 s: the server knows when it recovers, but a bogus header must not park a
    # destination for hours.
    max_pause: float = 30.0
    # Utilization (connections in use / effective limit) from which a destination is "busy":
    # 80 % leaves room to react before the queue fills.
    busy_at: float = 0.8

    def __post_init__(self) -> None:
        for name, kind in (
            ("retry", Retry),
            ("breaker", CircuitBreaker),
            ("rate_limit", RateLimit),
            ("adaptive", AdaptiveLimit),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(
                    f"Policy.{name} must be a toolpool.resilience.{kind.__name__} or None, "
                    f"got {type(value).__name__}"
                )
        for name in ("max_wait", "max_pause"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"Policy.{name} must be a number of seconds, got {value!r}")
            if not 0 <= value < math.inf:
                raise ConfigError(f"Policy.{name} must be finite and >= 0, got {value!r}")
        if not isinstance(self.busy_at, int | float) or not 0 < self.busy_at <= 1:
            raise ConfigError(f"Policy.busy_at must be a fraction in (0, 1], got {self.busy_at!r}")

    @classmethod
    def off(cls) -> Policy:
        """No retries, breaker, rate limit or adaptive limit; admission still works."""
        return cls(retry=None, breaker=None, rate_limit=None, adaptive=None)


#: The policy a pool applies to destinations that name none (`toolpool.Pool(policy=...)`).
DEFAULT_POLICY = Policy()
