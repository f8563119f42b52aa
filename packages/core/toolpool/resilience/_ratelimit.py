"""Rate limits of one destination: its configuration, the token buckets (optionally one per
tenant) and the pauses a server asks for with Retry-After. No I/O, no clock of its own.

Every method takes `now` (a monotonic clock reading); the policy runtime calls them under its
lock and does the waiting itself, outside it.

Theory of operation
-------------------
A bucket is kept as GCRA (the generic cell rate algorithm, ITU-T I.371): instead of a token
count it keeps the *theoretical arrival time* `tat` of the next request at the steady rate.
With emission interval `T = 1 / rate` and burst tolerance `tau = (burst - 1) * T`, a request
arriving at `t` may start at `max(t, tat - tau)`; starting it moves `tat` to
`max(t, tat) + T`. Reserving is one comparison and one addition, and over any interval of
length `L` at most `burst + L * rate` requests start (the bucket's promise).

`reserve` never grants a start later than `max_wait` from now: the request is refused instead
(PoolSaturated with reason "rate_limited") and the bucket is left untouched, so a refused
request costs the others nothing. A granted reservation is a promise to the bucket: the caller
waits until its start and then sends, so the downstream never sees more than the limit.

A pause (`pause`) comes from the server: a 503 with Retry-After pauses the whole destination, a
429 with Retry-After pauses the tenant that got it (rate limits are usually per API key), each
for at most `max_pause` seconds. A request may not start before its pauses end.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

__all__ = ["RateLimit", "RateLimiter", "SharedRateLimiter", "TokenBucket"]

# Tenants with a bucket or a pause are remembered up to this many (least recently used go).
_MAX_TENANTS = 10_000
# Starts this close to max_wait count as within it (float sums of the interval drift).
_SLACK = 1e-9


@dataclass(frozen=True)
class RateLimit:
    """Requests per second to one destination (or to each of its tenants), with a burst.

    >>> RateLimit(rate=50, burst=10, per_tenant=True).per_tenant
    True
    """

    # Sustained requests per second the downstream allows (no default: it is the
    # downstream's number, from its documentation).
    rate: float
    # Requests that may start back to back after a quiet spell; None: one second's worth
    # (at least 1), what most "N requests per second" limits tolerate.
    burst: int | None = None
    # One bucket per tenant (AuthContext.tenant) instead of one for the destination: the
    # limit is per API key or per customer, as most SaaS APIs enforce it.
    per_tenant: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int | float):
            raise ValueError(f"rate must be a number of requests per second, got {self.rate!r}")
        if not 0 < self.rate < math.inf:
            raise ValueError(f"rate must be > 0 requests per second, got {self.rate!r}")
        if self.burst is not None and (
            isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 1
        ):
            raise ValueError(f"burst must be a whole number >= 1 or None, got {self.burst!r}")

    @property
    def effective_burst(self) -> int:
        """The burst in use (`burst`, or one second's worth of requests)."""
        return self.burst if self.burst is not None else max(1, math.floor(self.rate))


class SharedRateLimiter(Protocol):
    """A bucket kept outside this process (e.g. `toolpool.fleet`'s Redis GCRA), which a
    destination's policy draws from instead of its own (`PolicyRuntime.share_rate_limit`).
    Both methods answer like `RateLimiter.reserve`: seconds to wait, or None to refuse; they
    must return within a bounded time and fall back on their own when their store is down."""

    async def reserve(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float, now: float
    ) -> float | None: ...

    def reserve_sync(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float, now: float
    ) -> float | None: ...


class TokenBucket:
    """One GCRA bucket (see the module docstring).

    >>> bucket = TokenBucket(rate=10, burst=2)
    >>> bucket.reserve(0.0, max_wait=1.0), bucket.reserve(0.0, 1.0), bucket.reserve(0.0, 1.0)
    (0.0, 0.0, 0.1)
    """

    __slots__ = ("interval", "tat", "tau")

    def __init__(self, rate: float, burst: int) -> None:
        self.interval = 1.0 / rate
        self.tau = (burst - 1) * self.interval
        self.tat = -math.inf

    def delay(self, at: float) -> float:
        """Seconds after `at` at which a request arriving at `at` could start."""
        return max(0.0, self.tat - self.tau - at)

    def room(self, at: float, max_wait: float) -> int:
        """How many requests arriving at `at` could be reserved a start within `max_wait`."""
        backlog = max(0.0, self.tat - at)
        return max(0, math.floor((max_wait + _SLACK + self.tau - backlog) / self.interval) + 1)

    def reserve(self, at: float, max_wait: float) -> float | None:
        """Reserve a start for a request arriving at `at`: its delay, or None (refused)."""
        delay = max(0.0, self.tat - self.tau - at)
        if delay > max_wait + _SLACK:
            return None
        self.tat = max(at, self.tat) + self.interval
        return delay


class RateLimiter:
    """A destination's buckets and pauses; `reserve` says how long a request must wait."""

    def __init__(self, config: RateLimit | None, max_wait: float, max_pause: float) -> None:
        self.config = config
        self.max_wait = max_wait
        self.max_pause = max_pause
        self._bucket: TokenBucket | None = None
        self._tenant_buckets: OrderedDict[str | None, TokenBucket] = OrderedDict()
        if config is not None and not config.per_tenant:
            self._bucket = TokenBucket(config.rate, config.effective_burst)
        # Destination-wide pause (from a 503 + Retry-After) and per-tenant pauses (429).
        self.paused_until = -math.inf
        self._tenant_pauses: OrderedDict[str | None, float] = OrderedDict()

    def _bucket_of(self, tenant: str | None) -> TokenBucket | None:
        if self._bucket is not None or self.config is None:
            return self._bucket
        bucket = self._tenant_buckets.get(tenant)
        if bucket is None:
            bucket = TokenBucket(self.config.rate, self.config.effective_burst)
            self._tenant_buckets[tenant] = bucket
            if len(self._tenant_buckets) > _MAX_TENANTS:
                self._tenant_buckets.popitem(last=False)
        else:
            self._tenant_buckets.move_to_end(tenant)
        return bucket

    def pause_end(self, tenant: str | None, now: float) -> float:
        """When the pauses that apply to `tenant` end (<= now when none applies)."""
        end = self.paused_until
        tenant_end = self._tenant_pauses.get(tenant)
        if tenant_end is not None:
            if tenant_end <= now:
                del self._tenant_pauses[tenant]
            elif tenant_end > end:
                end = tenant_end
        return end

    def reserve(self, tenant: str | None, now: float) -> float | None:
        """Seconds `tenant`'s request must wait before it is sent, or None when that would be
        longer than `max_wait` (refuse it; nothing was reserved)."""
        start = max(now, self.pause_end(tenant, now))
        if start - now > self.max_wait:
            return None
        bucket = self._bucket_of(tenant)
        if bucket is None:
            return start - now
        delay = bucket.reserve(start, self.max_wait - (start - now))
        if delay is None:
            return None
        return start - now + delay

    def retry_after(self, tenant: str | None, now: float) -> float:
        """Seconds until a request of `tenant` could start without waiting."""
        start = max(now, self.pause_end(tenant, now))
        bucket = self._bucket_of(tenant) if self.config is not None else None
        wait = start - now
        if bucket is not None:
            wait += bucket.delay(start)
        return wait

    def pause(self, tenant: str | None, seconds: float, now: float, whole: bool) -> float:
        """The server asked for `seconds` of rest (Retry-After): pause the destination
        (`whole`) or `tenant`. Bounded by `max_pause`. Returns the pause's end."""
        end = now + min(max(0.0, seconds), self.max_pause)
        if whole:
            self.paused_until = max(self.paused_until, end)
            return self.paused_until
        current = self._tenant_pauses.get(tenant, -math.inf)
        self._tenant_pauses[tenant] = max(current, end)
        self._tenant_pauses.move_to_end(tenant)
        if len(self._tenant_pauses) > _MAX_TENANTS:
            self._tenant_pauses.popitem(last=False)
        return self._tenant_pauses[tenant]

    def room(self, now: float) -> int | None:
        """How many more requests the destination-wide limit (and pause) could start within
        `max_wait` of now; None when there is no destination-wide bucket."""
        bucket = self._bucket
        if bucket is None:
            return None
        start = max(now, self.paused_until)
        if start - now > self.max_wait:
            return 0
        return bucket.room(start, self.max_wait - (start - now))

    def room_in(self, now: float) -> float:
        """Seconds until `room` is at least one again (0 when it is now)."""
        bucket = self._bucket
        start = max(now, self.paused_until)
        if bucket is None:
            return max(0.0, start - now - self.max_wait)
        backlog = max(0.0, bucket.tat - start)
        return max(0.0, start - now + backlog - bucket.tau - self.max_wait)
