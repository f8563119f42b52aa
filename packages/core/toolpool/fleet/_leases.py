"""Capacity leases: each replica's share of a destination's fleet-wide cap, held in Redis and
rebalanced by demand, and the local permits that keep this replica inside its share.

Theory of operation
-------------------
Redis keeps, per destination, one *record* per live replica: the permits it may be using, its
demand, and an expiry `lease_ttl - busy_interval` ahead (the record TTL: a starved survivor
renews every `busy_interval`, so a dead replica's capacity is free again within lease_ttl).
One Lua script (`RENEW`, atomic) renews a replica:

    1. records past their expiry are dropped (a SIGKILLed replica's capacity returns here,
       at most one record TTL after its last renewal)
    2. the replica's record becomes its *claim*: max(its local lease, permits in use), an upper
       bound on what it uses until the answer arrives
    3. its target is the cap split in proportion to demand (peak in use + waiting over the
       last few renewals; whole permits by largest remainder), at least 1 (when the cap has
       one per replica) so an idle replica's first request does not wait for a renewal
    4. below target it grows by at most the free capacity (cap - all records), so the records
       never sum past the cap; above target it is told to shrink, and its record stays at the
       claim until the next renewal reports the smaller use

Invariant: each replica uses at most its record, and the records sum to at most the cap, so
the fleet's requests in flight stay within the cap at every instant. A lost answer only ever
leaves Redis counting more than is used.

Locally a replica admits a request while `in_use < limit`; others wait FIFO. The local lease
is good until `sent + record TTL × 0.9` (the Redis record lives one record TTL from when the
script ran, which is later). A replica with waiters renews every `busy_interval`, otherwise every
`renew_interval`.

When Redis does not answer (down or slower than `op_timeout`): the last lease holds until it
expires; then no new permits until `lease_ttl` after the first failure (every other replica's
lease has expired by then); then the static share `floor(cap / replicas)` (what
`StaticShare` gives). When Redis answers again the replica claims what it holds and the
leases take over.

After Redis restarts empty (or the fleet was idle for `lease_ttl`), no record grows for a
*grace* period (two renew intervals plus `op_timeout`): replicas that still hold a lease from
before re-register it first, so nobody is granted capacity that is still in use.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["LEASE", "NONE", "STATIC", "Share"]

monotonic = time.monotonic

# Modes of a share: granted by Redis, fallen back to the static share, or waiting in between.
LEASE, NONE, STATIC = "lease", "none", "static"

# The local lease ends this fraction of lease_ttl after the renewal was sent: Redis keeps the
# record lease_ttl from when the script ran, so this leaves room for clock-rate drift.
LOCAL_FRACTION = 0.9

RENEW = """
local leases, demands, expiry, alive, grace_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local replica = ARGV[1]
local claim = tonumber(ARGV[2])
local demand = tonumber(ARGV[3])
local cap = tonumber(ARGV[4])
local ttl = tonumber(ARGV[5])
local grace_ms = tonumber(ARGV[6])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', alive) == 0 then
  redis.call('SET', grace_key, '1', 'PX', grace_ms)
end
redis.call('SET', alive, '1', 'PX', ttl)
local grace = redis.call('EXISTS', grace_key) == 1
local dead = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
for _, r in ipairs(dead) do
  redis.call('HDEL', leases, r)
  redis.call('HDEL', demands, r)
  redis.call('ZREM', expiry, r)
end
redis.call('HSET', leases, replica, claim)
redis.call('HSET', demands, replica, demand)
redis.call('ZADD', expiry, now + ttl, replica)
local all_leases = redis.call('HGETALL', leases)
local others = 0
local count = 0
for i = 1, #all_leases, 2 do
  count = count + 1
  if all_leases[i] ~= replica then others = others + tonumber(all_leases[i + 1]) end
end
local all_demands = redis.call('HGETALL', demands)
local parts = {}
local total = 0
for i = 1, #all_demands, 2 do
  local d = tonumber(all_demands[i + 1])
  parts[#parts + 1] = {all_demands[i], d}
  total = total + d
end
-- the cap split in proportion to demand (equally when nobody has any), the remainder of
-- the whole-number split to the largest fractions (ties by name, the same on every replica)
local assigned = 0
for _, p in ipairs(parts) do
  local exact = (total > 0) and (cap * p[2] / total) or (cap / #parts)
  p[3] = math.floor(exact)
  p[4] = exact - p[3]
  assigned = assigned + p[3]
end
table.sort(parts, function(a, b)
  if a[4] ~= b[4] then return a[4] > b[4] end
  return a[1] < b[1]
end)
local target = 0
for j, p in ipairs(parts) do
  if j <= cap - assigned then p[3] = p[3] + 1 end
  if p[1] == replica then target = p[3] end
end
if target < 1 and (demand > 0 or cap >= count) then target = 1 end
local new
if claim >= target then
  new = target
else
  local free = cap - others - claim
  if grace or free < 0 then free = 0 end
  new = claim + math.min(target - claim, free)
  if new > claim then redis.call('HSET', leases, replica, new) end
end
return {new, count, others, grace and 1 or 0}
"""


@dataclass
class Share:
    """This replica's permits for one destination (all fields guarded by the event loop)."""

    destination: str
    cap: int
    static: int
    limit: int = 0
    mode: str = NONE
    in_use: int = 0
    # Peak of in_use + waiting since the last renewal, and the peaks of the renewals before:
    # the demand reported is the highest of the last few, so a replica whose callers pause
    # for a moment (or whose event loop is slow to read them) does not give its share away.
    peak: int = 0
    recent: collections.deque[int] = field(default_factory=lambda: collections.deque(maxlen=4))
    lease_until: float = -math.inf
    replicas_seen: int = 0
    renewals_total: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    @property
    def demand(self) -> int:
        return self.in_use + len(self.waiters)

    def claim(self) -> int:
        """What this replica may be using until it hears back: max(limit, in use)."""
        return max(self.limit, self.in_use)

    def reported_demand(self) -> int:
        """The demand sent to Redis: the peak of this window and the last few."""
        return max(self.peak, *self.recent) if self.recent else self.peak

    def next_window(self) -> None:
        """A renewal succeeded: start a new demand window."""
        self.recent.append(self.peak)
        self.peak = self.demand

    def note_demand(self) -> None:
        d = self.demand
        if d > self.peak:
            self.peak = d

    def set_limit(self, limit: int) -> None:
        self.limit = max(0, limit)
        self.wake()

    def wake(self) -> None:
        """Grant waiting requests while there is room (FIFO)."""
        waiters = self.waiters
        while waiters and self.in_use < self.limit:
            fut = waiters.popleft()
            if fut.done():
                continue
            self.in_use += 1
            fut.set_result(None)

    def release(self) -> None:
        self.in_use -= 1
        self.wake()

    def snapshot(self) -> dict[str, Any]:
        """The numbers the metrics and tests read."""
        return {
            "destination": self.destination,
            "cap": self.cap,
            "limit": self.limit,
            "mode": self.mode,
            "in_use": self.in_use,
            "waiting": len(self.waiters),
            "replicas_seen": self.replicas_seen,
        }
