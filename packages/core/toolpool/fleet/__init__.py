"""toolpool.fleet: several processes (`toolpool serve` replicas, agent processes) share one
connection cap per destination, one rate limit and one token per (destination, context),
coordinated through Redis or Valkey (`pip install 'toolpool[fleet]'`).

```toml
# toolpool.toml of every replica
[limits]
provider = "redis"
url_env = "TOOLPOOL_REDIS_URL"   # redis://HOST:6379/0, rediss:// for TLS, password in the URL
replicas = 3                     # the static share each replica falls back to without Redis
```

Tokens are shared when `TOOLPOOL_FLEET_KEY` (32+ random characters, the same on every
replica) is set: they are stored encrypted with a key derived from it.

- Caps: capacity leases, rebalanced by demand (`_leases.py` states the protocol and its
  invariant: the fleet's requests in flight to a destination never exceed its cap).
- Rate limits: the resilience layer's GCRA with its state in Redis, one script per decision.
- Tokens: one fetch per (destination, context) for the fleet, a fleet-wide lock, 401 drops it.
- Redis down or slow: no hang (every command is bounded by `op_timeout`); last lease, then
  the static share; local rate buckets at rate / replicas; local token fetches;
  `toolpool_fleet_coordinator_up 0`; recovery by itself.
"""

from __future__ import annotations

from toolpool.fleet._fleet import RedisFleet
from toolpool.fleet._rates import FleetRates
from toolpool.fleet._tokens import FleetTokens

__all__ = ["FleetRates", "FleetTokens", "RedisFleet"]
