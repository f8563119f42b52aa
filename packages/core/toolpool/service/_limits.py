"""The fleet-wide limit interface of `toolpool serve`: how one replica finds its share of each
destination's connection cap, and the hook where a distributed coordinator plugs in.

One service instance enforces each destination's cap across all agents that use it (the
pool's per-destination cap). With several replicas behind a load balancer nothing is shared
between them, so the fleet-wide connection count is bounded by the *sum* of the replicas'
caps. `StaticShare(replicas=N)` (the default, N = 1) gives each replica `floor(cap / N)`, which
keeps the sum at or under the configured cap as long as at most N replicas run.

A coordinator (Redis, etcd, a lease service) plugs in as another `GlobalLimit`: `replica_cap`
sets the replica's hard ceiling, and `hold(destination)` is entered around every proxied
request (until its response body is done), so a coordinator can hand out fleet-wide permits
and refuse with `toolpool.PoolSaturated` when the fleet is at its limit. Configure it with
`[limits] provider = "package.module:factory"`; the other keys of `[limits]` are passed to the
factory as keyword arguments. `provider = "redis"` is `toolpool.fleet.RedisFleet`: capacity
leases on Redis, plus fleet-wide rate limits and tokens.

A limit may also have these optional methods, which the service calls when present:
`async start(registry)` on the service's event loop at startup (with its Prometheus
registry), `attach(pool)` once its pool is built, and `async aclose()` at shutdown.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from toolpool.errors import ConfigError

__all__ = ["GlobalLimit", "StaticShare"]


@runtime_checkable
class GlobalLimit(Protocol):
    """How this replica's connection caps relate to the fleet's (see the module docstring)."""

    def replica_cap(self, destination: str, fleet_cap: int) -> int:
        """The most connections this replica may open to `destination`, whose fleet-wide cap
        is `fleet_cap` (the configured `max_connections`, or 70 % of `documented_limit`)."""
        ...

    def hold(self, destination: str, tenant: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Entered around each proxied request; may wait for a fleet-wide permit, or raise
        `toolpool.PoolSaturated` to refuse the request (the agent then gets a 503)."""
        ...


class StaticShare:
    """Each of `replicas` service instances takes an equal share of every cap.

    >>> StaticShare(replicas=3).replica_cap("crm", 70)
    23
    """

    def __init__(self, replicas: int = 1) -> None:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ConfigError(f"replicas must be a whole number >= 1, got {replicas!r}")
        self.replicas = replicas

    def replica_cap(self, destination: str, fleet_cap: int) -> int:
        """`floor(fleet_cap / replicas)`, at least 1."""
        return max(1, fleet_cap // self.replicas)

    @contextlib.asynccontextmanager
    async def hold(self, destination: str, tenant: str) -> AsyncIterator[None]:
        """No fleet-wide permit is needed: the static shares already bound the sum."""
        yield

    def __repr__(self) -> str:
        return f"StaticShare(replicas={self.replicas})"
