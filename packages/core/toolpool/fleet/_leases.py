"""Capacity leases: each replica's share of a destination's fleet-wide cap, held in Redis and
rebalanced by demand, and the local permits that keep this replica inside its share.

Theory of operation
-------------------
Redis keeps, per destination, one *record* per live replica: the permits it may be using, its
demand, and an expiry one *record TTL* ahead (`lease_ttl - 4 × busy_interval`: a starved
survivor renews every `busy_interval`, so a dead replica's capacity is in use again within
lease_ttl). One Lua script (`RENEW`, atomic) renews a replica:

    1. records past their expiry are dropped (a SIGKILLed replica's capacity returns here,
       at most one record TTL after its last renewal)
    2. the replica's record becomes its *claim*: max(its local lease, permits in use), an upper
       bound on what it uses until the answer arrives
    3. the *targets* of all live replicas are computed at once from all their demands (peak
       in use + waiting over the last `4 × renew_interval`), so they always sum to exactly the
       cap and every replica's script computes the same ones: work-conserving — when the demands
       add up to the cap or more, the cap is split in proportion to them (whole permits by
       largest remainder; a replica with demand gets at least one while the cap allows);
       below that, each gets its demand, an idle replica one permit (so its first request does
       not wait for a renewal), and what is left goes in proportion to demand
    4. below target it grows by at most the free capacity (cap - all records), so the records
       never sum past the cap; above target it is told to shrink, and its record stays at the
       claim until its next renewal reports the smaller use (a replica that owes capacity
       renews as soon as its use has come down, like a starved one)

Invariant: each replica uses at most its record, and the records sum to at most the cap, so
the fleet's requests in flight stay within the cap at every instant. A lost answer only ever
leaves Redis counting more than is used.

Locally a replica admits a request while `in_use < limit`; others wait FIFO. The local lease
is good until `sent + record TTL × 0.9` (the Redis record lives one record TTL from when the
script ran, which is later). A replica with waiters (below the cap) or owing capacity renews
every `busy_interval`, otherwise every `renew_interval`.

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

# The local lease ends this fraction of the record TTL after the renewal was sent: Redis keeps
# the record one record TTL from when the script ran, so this leaves room for clock-rate drift.
LOCAL_FRACTION = 0.9

# Lua 5.1 in Redis: numbers are doubles, so the same demands give the same targets on every
# replica's call (ties are broken by replica name).
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

-- members: {name, demand, target}, in name order (the same order for every caller)
local members = {}
local all_demands = redis.call('HGETALL', demands)
for i = 1, #all_demands, 2 do
  members[#members + 1] = {all_demands[i], tonumber(all_demands[i + 1]), 0}
end
table.sort(members, function(a, b) return a[1] < b[1] end)

-- `amount` whole permits over the members in `idx` in proportion to weight(m) (equally
-- when every weight is 0): floors, then the largest remainders (ties by name order)
local function split(idx, amount, weight)
  if amount <= 0 or #idx == 0 then return end
  local sum = 0
  for _, j in ipairs(idx) do sum = sum + weight(members[j]) end
  local rest = amount
  local fracs = {}
  for _, j in ipairs(idx) do
    local exact = (sum > 0) and (amount * weight(members[j]) / sum) or (amount / #idx)
    local whole = math.floor(exact)
    members[j][3] = members[j][3] + whole
    rest = rest - whole
    fracs[#fracs + 1] = {j, exact - whole}
  end
  table.sort(fracs, function(a, b)
    if a[2] ~= b[2] then return a[2] > b[2] end
    return a[1] < b[1]
  end)
  for k = 1, rest do members[fracs[k][1]][3] = members[fracs[k][1]][3] + 1 end
end

local total = 0
local all, idle, busy = {}, {}, {}
for j, m in ipairs(members) do
  total = total + m[2]
  all[#all + 1] = j
  if m[2] > 0 then busy[#busy + 1] = j else idle[#idle + 1] = j end
end
if total >= cap then
  -- not enough for everyone: in proportion to demand...
  split(busy, cap, function(m) return m[2] end)
  -- ...and one permit to each replica with demand that got none, taken from the largest
  local order = {}
  for _, j in ipairs(busy) do order[#order + 1] = j end
  table.sort(order, function(a, b)
    if members[a][2] ~= members[b][2] then return members[a][2] > members[b][2] end
    return a < b
  end)
  for _, j in ipairs(order) do
    if members[j][3] == 0 then
      local top = nil
      for _, k in ipairs(busy) do
        if members[k][3] > 1 and (top == nil or members[k][3] > members[top][3]) then top = k end
      end
      if top == nil then break end
      members[top][3] = members[top][3] - 1
      members[j][3] = 1
    end
  end
else
  -- enough: each its demand, one to each idle replica, the rest in proportion to demand
  for _, j in ipairs(busy) do members[j][3] = members[j][2] end
  local left = cap - total
  for _, j in ipairs(idle) do
    if left > 0 then
      members[j][3] = 1
      left = left - 1
    end
  end
  split((total > 0) and busy or all, left, function(m) return m[2] end)
end

local target = 0
for _, m in ipairs(members) do
  if m[1] == replica then target = m[3] end
end
local new
local record = claim
if claim >= target then
  new = target
else
  local free = cap - others - claim
  if grace or free < 0 then free = 0 end
  new = claim + math.min(target - claim, free)
  if new > claim then
    redis.call('HSET', leases, replica, new)
    record = new
  end
end
return {new, count, others, grace and 1 or 0, target, record}
"""


@dataclass
class Share:
    """This replica's permits for one destination (all fields guarded by the event loop)."""

    destination: str
    cap: int
    static: int
    limit: int = 0
    # What Redis counts for this replica (its record) and its target, as of the last renewal.
    record: int = 0
    target: int = 0
    mode: str = NONE
    in_use: int = 0
    # Peak of in_use + waiting since the last renewal, and the peaks of the renewals of the
    # last `demand_window` seconds (time, peak): the demand reported is the highest of them, so
    # a replica whose callers pause for a moment (or whose event loop is slow to read them)
    # does not give its share away, and the targets do not flap with every renewal. Demand
    # rises at once; it falls after demand_window.
    peak: int = 0
    recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
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

    def owes(self) -> bool:
        """Redis still counts permits this replica no longer uses (its lease shrank): the
        next renewal gives them back to the replicas waiting for them."""
        return self.mode == LEASE and self.record > max(self.limit, self.in_use)

    def starved(self) -> bool:
        """Requests wait and the lease may still grow."""
        return bool(self.waiters) and self.limit < self.cap

    def reported_demand(self) -> int:
        """The demand sent to Redis: the peak of this renewal and of the recent ones."""
        return max(self.peak, max((p for _, p in self.recent), default=0))

    def next_window(self, now: float, window: float) -> None:
        """A renewal succeeded: keep its peak for `window` seconds, start a new one."""
        recent = self.recent
        recent.append((now, self.peak))
        while recent and recent[0][0] < now - window:
            recent.popleft()
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
            "target": self.target,
            "mode": self.mode,
            "in_use": self.in_use,
            "waiting": len(self.waiters),
            "replicas_seen": self.replicas_seen,
        }
