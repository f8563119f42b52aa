"""Fleet-wide rate limits: the resilience layer's GCRA (see `toolpool.resilience._ratelimit`)
with its theoretical arrival time kept in Redis, one atomic script per decision, so every
replica draws from the same bucket per destination (or per (destination, tenant)).

Redis's clock decides (`TIME` inside the script), so replicas' clocks need not agree. While
Redis is unreachable each replica falls back to a local bucket at `rate / replicas` (burst
likewise), which keeps the fleet's total within the limit as long as at most `replicas` run.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolpool.fleet._coordinator import Coordinator, CoordinatorDown
from toolpool.resilience._ratelimit import TokenBucket

if TYPE_CHECKING:
    from toolpool.resilience._ratelimit import RateLimit

__all__ = ["GCRA", "FleetRates"]

# Microseconds throughout: Lua numbers are doubles, exact to 2**53 µs (285 years).
GCRA = """
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local max_wait = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local delay = tat - tau - now
if delay < 0 then delay = 0 end
if delay > max_wait then return -1 end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX',
           math.floor((new_tat - now) / 1000) + 1000)
return math.floor(delay)
"""

_MAX_LOCAL = 10_000


def _seconds(micros: int) -> float | None:
    """The script's answer: seconds to wait, or None (negative: past `max_wait`)."""
    return None if micros < 0 else micros / 1e6


class FleetRates:
    """`reserve` a start for one request against the fleet's bucket (see the docstring)."""

    def __init__(self, coordinator: Coordinator, replicas: int) -> None:
        self.coordinator = coordinator
        self.replicas = replicas
        self._local: OrderedDict[tuple[str, str | None], TokenBucket] = OrderedDict()
        self._lock = threading.Lock()
        self.fallbacks_total = 0

    def __repr__(self) -> str:
        return f"<toolpool.fleet.FleetRates replicas={self.replicas}>"

    def _key(self, destination: str, tenant: str | None, config: RateLimit) -> str:
        if config.per_tenant:
            return self.coordinator.key("rate", destination, "t", tenant or "")
        return self.coordinator.key("rate", destination)

    @staticmethod
    def _args(config: RateLimit, max_wait: float) -> list[int]:
        interval = 1e6 / config.rate
        tau = (config.effective_burst - 1) * interval
        return [round(interval), round(tau), math.floor(max_wait * 1e6)]

    async def reserve(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float, now: float
    ) -> float | None:
        """Seconds to wait before sending, or None (would wait longer than `max_wait`)."""
        call = self._gcra(destination, tenant, config, max_wait)
        try:
            micros = int(await self.coordinator.run(call))
        except CoordinatorDown:
            return self._local_reserve(destination, tenant, config, max_wait, now)
        return _seconds(micros)

    def reserve_sync(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float, now: float
    ) -> float | None:
        """`reserve` for the thread driver."""
        call = self._gcra(destination, tenant, config, max_wait)
        try:
            micros = int(self.coordinator.run_sync(call))
        except CoordinatorDown:
            return self._local_reserve(destination, tenant, config, max_wait, now)
        return _seconds(micros)

    def _gcra(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float
    ) -> Callable[[Any], Any]:
        """The GCRA script's run on a Redis client (async: it returns the awaitable)."""
        key = self._key(destination, tenant, config)
        args = self._args(config, max_wait)
        return lambda client: client.register_script(GCRA)(keys=[key], args=args)

    def _local_reserve(
        self, destination: str, tenant: str | None, config: RateLimit, max_wait: float, now: float
    ) -> float | None:
        """This replica's static share of the limit while Redis is unreachable."""
        ident = (destination, tenant if config.per_tenant else None)
        with self._lock:
            self.fallbacks_total += 1
            bucket = self._local.get(ident)
            if bucket is None:
                rate = config.rate / self.replicas
                burst = max(1, config.effective_burst // self.replicas)
                bucket = self._local[ident] = TokenBucket(rate, burst)
                if len(self._local) > _MAX_LOCAL:
                    self._local.popitem(last=False)
            return bucket.reserve(now, max_wait)
