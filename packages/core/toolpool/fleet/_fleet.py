"""`RedisFleet`: the fleet-wide limit of `toolpool serve` replicas on Redis (a `GlobalLimit`),
and the owner of the fleet's shared rate limits and tokens.

The service calls `replica_cap` while it builds its pool, `start()` on its event loop, `hold()`
around every proxied request, `attach(pool)` once, and `aclose()` at shutdown. The lease
protocol and its invariant are in `_leases.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from toolpool.auth._header import HeaderAuth
from toolpool.errors import ConfigError, PoolSaturated
from toolpool.fleet._coordinator import Coordinator, CoordinatorDown, derive, secret_from_env
from toolpool.fleet._leases import LEASE, LOCAL_FRACTION, NONE, RENEW, STATIC, Share
from toolpool.fleet._rates import FleetRates
from toolpool.fleet._tokens import FleetTokens
from toolpool.resilience._layer import PolicyRuntime

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import Metric

    from toolpool._pool import Pool
    from toolpool.resilience import RateLimit

__all__ = ["RedisFleet"]

log = logging.getLogger("toolpool.fleet")

monotonic = time.monotonic


def _number(
    name: str, value: Any, *, minimum: float = 0.0, whole: bool = False, what: str = ""
) -> Any:
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not minimum < value < math.inf:
        what = what or ("a whole number > 0" if whole else f"a number of seconds > {minimum:g}")
        raise ConfigError(f"fleet option {name} must be {what}, got {value!r}")
    return value


class RedisFleet:
    """Fleet-wide connection caps, rate limits and tokens shared through Redis (or Valkey).

    ```toml
    [limits]
    provider = "redis"                 # toolpool serve: every replica with the same settings
    url_env = "TOOLPOOL_REDIS_URL"     # redis://, rediss://, password in the URL
    replicas = 3                       # the static share while Redis is unreachable
    ```

    In Python (an in-process pool shares rate limits and tokens with the fleet):

    ```python
    fleet = toolpool.fleet.RedisFleet(url="redis://127.0.0.1:6379/0", replicas=3)
    pool = toolpool.Pool([...])
    fleet.attach(pool)       # shared tokens (needs TOOLPOOL_FLEET_KEY) and rate limits
    ```

    `lease_ttl` bounds how long a dead replica's capacity stays lost; `renew_interval` and
    `busy_interval` how often an idle and a starved replica renew; `op_timeout` how long any
    Redis command may take before this replica falls back; `max_wait` how long a request
    waits for a fleet permit, `queue_factor` how many may wait on this replica (× the cap;
    beyond that a request is refused at once, as by a pool). Tokens are shared only with a
    fleet key (`key_env`, at least 32 random characters, the same on every replica).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        url_env: str = "TOOLPOOL_REDIS_URL",
        replicas: int = 1,
        lease_ttl: float = 3.0,
        renew_interval: float = 0.5,
        busy_interval: float = 0.1,
        op_timeout: float = 1.0,
        max_wait: float = 30.0,
        queue_factor: float = 2.0,
        namespace: str = "default",
        key_env: str = "TOOLPOOL_FLEET_KEY",
        replica_id: str | None = None,
        rate_limits: Mapping[str, Mapping[str, Any]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        environ = os.environ if env is None else env
        if url is None:
            url = environ.get(url_env)
            if not url:
                raise ConfigError(
                    f"the fleet's Redis URL is read from ${url_env}, which is not set; "
                    f"export {url_env}=redis://HOST:6379/0 (rediss:// for TLS, "
                    f"redis://:PASSWORD@HOST for a password)"
                )
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "the fleet's Redis URL must start with redis://, rediss:// or unix://"
            )
        self.replicas = _number("replicas", replicas, whole=True)
        self.lease_ttl = _number("lease_ttl", lease_ttl)
        self.renew_interval = _number("renew_interval", renew_interval)
        self.busy_interval = _number("busy_interval", busy_interval)
        self.op_timeout = _number("op_timeout", op_timeout)
        self.max_wait = _number(
            "max_wait", max_wait, minimum=-1e-9, what="a number of seconds >= 0"
        )
        self.queue_factor = _number(
            "queue_factor", queue_factor, minimum=-1e-9, what="a number >= 0 (× the cap)"
        )
        if self.busy_interval * 8 > self.lease_ttl:
            raise ConfigError(
                f"busy_interval ({busy_interval:g} s) must be at most an eighth of lease_ttl"
            )
        # A record lives this long in Redis: a dead replica's capacity is free again after
        # it, and a starved survivor's next renewal (busy_interval later) takes it, with three
        # more busy intervals to spare for the renewal's round trip and the requests reaching
        # the destination: all within lease_ttl.
        self.record_ttl = self.lease_ttl - 4 * self.busy_interval
        # A replica's demand is the peak of this long (see Share.recent).
        self.demand_window = 4 * self.renew_interval
        if self.renew_interval * 2 + self.op_timeout >= self.record_ttl * LOCAL_FRACTION:
            raise ConfigError(
                f"lease_ttl ({lease_ttl:g} s) must be longer than two renew intervals plus "
                f"op_timeout, or leases lapse between renewals; raise lease_ttl"
            )
        if not isinstance(namespace, str) or not namespace or ":" in namespace:
            raise ConfigError(
                f"fleet namespace must be a non-empty name without ':', got {namespace!r}"
            )
        self.namespace = namespace
        self.replica_id = (
            replica_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        )
        self.coordinator = Coordinator(
            url, namespace=namespace, op_timeout=self.op_timeout, probe_interval=self.renew_interval
        )
        key = secret_from_env(key_env, environ)
        self.key_env = key_env
        self.rates = FleetRates(self.coordinator, replicas)
        self.tokens = (
            FleetTokens(self.coordinator, derive(key, "encrypt"), derive(key, "name"))
            if key is not None
            else None
        )
        self.rate_limits = _rate_limits(rate_limits or {})
        self._shares: dict[str, Share] = {}
        self._task: asyncio.Task[None] | None = None
        self._kick: asyncio.Event | None = None
        self._closed = False
        self._grace_ms = int((2 * self.renew_interval + self.op_timeout) * 1000) + 1
        self._static_at: float | None = None
        self.coordinator.on_change(self._coordinator_changed)

    def __repr__(self) -> str:
        return (
            f"<toolpool.fleet.RedisFleet {self.coordinator!r} replicas={self.replicas} "
            f"lease_ttl={self.lease_ttl:g}>"
        )

    # ------------------------------------------------------------------ GlobalLimit

    def replica_cap(self, destination: str, fleet_cap: int) -> int:
        """This replica's pool may open up to the whole fleet cap; `hold` keeps it to its lease."""
        if destination not in self._shares:
            static = max(1, fleet_cap // self.replicas)
            self._shares[destination] = Share(destination, fleet_cap, static)
        return fleet_cap

    @contextlib.asynccontextmanager
    async def hold(self, destination: str, tenant: str) -> AsyncIterator[None]:
        """One fleet permit for the request's whole life (until its response body is done)."""
        share = self._shares.get(destination)
        if share is None:  # a destination the config did not list: nothing to share
            yield
            return
        await self._acquire(share)
        try:
            yield
        finally:
            share.release()
            self._maybe_kick(share)

    async def _acquire(self, share: Share) -> None:
        if share.in_use < share.limit and not share.waiters:
            share.in_use += 1
            share.note_demand()
            return
        # As one pool of the whole cap: the cap in use plus a queue of queue_factor × cap.
        if share.in_use + len(share.waiters) >= share.cap + self._queue_limit(share):
            raise self._saturated(share, "queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        share.waiters.append(fut)
        share.note_demand()
        self._maybe_kick(share)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.max_wait)
        except TimeoutError:
            if fut.done() and not fut.cancelled():
                return  # granted as the wait ran out: keep it
            fut.cancel()
            with contextlib.suppress(ValueError):
                share.waiters.remove(fut)
            raise self._saturated(share, "timeout") from None
        except BaseException:
            if fut.done() and not fut.cancelled():
                share.release()  # granted as we were cancelled: hand it on
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    share.waiters.remove(fut)
            raise

    def _saturated(self, share: Share, reason: str) -> PoolSaturated:
        return PoolSaturated(
            share.destination,
            in_use=share.in_use,
            waiting=len(share.waiters),
            max_connections=share.cap,
            queue_limit=self._queue_limit(share),
            retry_after=self.busy_interval if reason == "queue_full" else 1.0,
            reason=reason,
        )

    def _queue_limit(self, share: Share) -> int:
        return int(self.queue_factor * share.cap)

    def _maybe_kick(self, share: Share) -> None:
        if self._kick is not None and (share.starved() or share.owes()):
            self._kick.set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self, registry: CollectorRegistry | None = None) -> None:
        """Take the first leases and start renewing them on the running loop; register the
        fleet's metrics on `registry` when given."""
        if registry is not None:
            registry.register(_FleetCollector(self))
        if self._task is not None:
            return
        self._kick = asyncio.Event()
        await self._renew_all(monotonic())
        self._task = asyncio.get_running_loop().create_task(
            self._renew_forever(), name="toolpool-fleet-leases"
        )

    async def aclose(self) -> None:
        """Stop renewing, give the leases back, close the Redis clients."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.coordinator.up and self._shares:
            keys = [self._keys(name) for name in self._shares]
            replica = self.replica_id

            async def give_back(client: Any) -> None:
                pipe = client.pipeline(transaction=False)
                for k in keys:
                    pipe.hdel(k[0], replica)
                    pipe.hdel(k[1], replica)
                    pipe.zrem(k[2], replica)
                await pipe.execute()

            with contextlib.suppress(CoordinatorDown):
                await self.coordinator.run(give_back)
        await self.coordinator.aclose()

    def attach(self, pool: Pool) -> None:
        """Share `pool`'s tokens (when a fleet key is set) and rate limits with the fleet:
        each destination's policy rate limit, or the one `rate_limits` names for it."""
        unknown = sorted(set(self.rate_limits) - set(pool.destinations))
        if unknown:
            raise ConfigError(
                f"[limits.rate_limits] names {', '.join(map(repr, unknown))}, which is not a "
                f"destination (known: {', '.join(pool.destinations)})"
            )
        for name in pool.destinations:
            dest = pool.destination(name)
            auth = dest.auth
            if self.tokens is not None and isinstance(auth, HeaderAuth):
                auth.share_tokens(self.tokens)
            policy = dest.policy
            configured = self.rate_limits.get(name)
            if isinstance(policy, PolicyRuntime):
                policy.share_rate_limit(self.rates, configured)
            elif configured is not None:
                raise ConfigError(
                    f"destination {name!r} has a fleet rate limit but no resilience layer "
                    f'(policy = "none"); use policy = "off" or "default"'
                )

    # ------------------------------------------------------------------ renewing

    def _keys(self, destination: str) -> list[str]:
        k = self.coordinator.key
        return [
            k("lease", destination, "records"),
            k("lease", destination, "demand"),
            k("lease", destination, "expiry"),
            k("alive"),
            k("grace"),
        ]

    async def _renew_forever(self) -> None:
        kick = self._kick
        assert kick is not None
        last = monotonic()
        next_at = last + self.renew_interval
        while not self._closed:
            now = monotonic()
            wake_at = min(next_at, self._next_deadline(now))
            if wake_at > now:
                kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(kick.wait(), wake_at - now)
                now = monotonic()
                if kick.is_set():
                    # Starved, or owing capacity to others: renew now, but not more often
                    # than every busy_interval.
                    next_at = min(next_at, max(now, last + self.busy_interval))
            self._expire(now)
            if now >= next_at:
                last = now
                busy = await self._renew_all(now)
                # Intervals from the start of a renewal, so a starved replica's renewals are
                # busy_interval apart however long Redis takes to answer.
                next_at = last + (self.busy_interval if busy else self.renew_interval)

    def _next_deadline(self, now: float) -> float:
        deadline = math.inf
        for share in self._shares.values():
            if share.mode == LEASE:
                deadline = min(deadline, share.lease_until)
        if self._static_at is not None:
            deadline = min(deadline, self._static_at)
        return deadline

    async def _renew_all(self, now: float) -> bool:
        """Renew every destination's lease at once; True if any is starved."""
        shares = list(self._shares.values())
        if not shares:
            return False
        sent = monotonic()
        args = []
        for share in shares:
            share.note_demand()
            args.append(
                (self._keys(share.destination), share.claim(), share.reported_demand(), share)
            )
        ttl_ms = int(self.record_ttl * 1000)

        async def renew(client: Any) -> list[Any]:
            script = client.register_script(RENEW)
            pipe = client.pipeline(transaction=False)
            for keys, claim, demand, share in args:
                await script(
                    keys=keys,
                    args=[self.replica_id, claim, demand, share.cap, ttl_ms, self._grace_ms],
                    client=pipe,
                )
            return list(await pipe.execute())

        try:
            results = await self.coordinator.run(renew)
        except CoordinatorDown:
            self._expire(monotonic())
            return any(s.waiters for s in shares)
        self._static_at = None
        until = sent + self.record_ttl * LOCAL_FRACTION
        for (_, _, _, share), result in zip(args, results, strict=True):
            granted, count = int(result[0]), int(result[1])
            share.mode = LEASE
            share.lease_until = until
            share.replicas_seen = count
            share.target = int(result[4])
            share.record = int(result[5])
            share.renewals_total += 1
            share.next_window(sent, self.demand_window)
            share.set_limit(granted)
        return any(s.starved() or s.owes() for s in shares)

    def _expire(self, now: float) -> None:
        """Without Redis: last lease until it expires, then nothing, then the static share."""
        down_since = self.coordinator.down_since
        if self.coordinator.up or down_since is None:
            return
        static_at = down_since + self.lease_ttl
        self._static_at = static_at if now < static_at else None
        for share in self._shares.values():
            if share.mode == LEASE and now >= share.lease_until:
                share.mode = NONE
                share.set_limit(0)
            if share.mode == NONE and now >= static_at:
                share.mode = STATIC
                share.set_limit(share.static)

    def _coordinator_changed(self, up: bool) -> None:
        if not up and self._kick is not None:
            self._kick.set()  # re-plan deadlines at once

    # ------------------------------------------------------------------ observability

    def shares(self) -> dict[str, dict[str, Any]]:
        """This replica's view of each destination: cap, limit, mode, in use, waiting."""
        return {name: share.snapshot() for name, share in self._shares.items()}


def _rate_limits(table: Mapping[str, Mapping[str, Any]]) -> dict[str, RateLimit]:
    """`[limits.rate_limits.NAME]` tables: rate (per second), burst, per_tenant."""
    from toolpool.resilience import RateLimit

    out: dict[str, RateLimit] = {}
    if not isinstance(table, Mapping):
        raise ConfigError("rate_limits must be a table of [limits.rate_limits.DESTINATION]")
    for name, options in table.items():
        if not isinstance(options, Mapping):
            raise ConfigError(f"rate_limits.{name} must be a table with rate = N")
        extra = set(options) - {"rate", "burst", "per_tenant"}
        if extra or "rate" not in options:
            raise ConfigError(
                f"rate_limits.{name} takes rate (requests per second), burst and per_tenant"
                + (f"; unknown: {', '.join(sorted(extra))}" if extra else "")
            )
        try:
            out[name] = RateLimit(**options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"rate_limits.{name}: {exc}") from None
    return out


class _FleetCollector:
    """Prometheus collector: coordinator health and this replica's leases."""

    def __init__(self, fleet: RedisFleet) -> None:
        self.fleet = fleet

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fleet = self.fleet
        up = GaugeMetricFamily(
            "toolpool_fleet_coordinator_up",
            "1 while the fleet's Redis answers within op_timeout, 0 while this replica runs on "
            "its last lease or the static share.",
        )
        up.add_metric([], 1.0 if fleet.coordinator.up else 0.0)
        yield up
        failures = CounterMetricFamily(
            "toolpool_fleet_coordinator_failures",
            "Redis commands that failed or took longer than op_timeout.",
        )
        failures.add_metric([], fleet.coordinator.failures_total)
        yield failures
        limit = GaugeMetricFamily(
            "toolpool_fleet_limit",
            "Requests this replica may have in flight to the destination now (its lease, or "
            "the static share while Redis is unreachable).",
            labels=["destination", "mode"],
        )
        in_use = GaugeMetricFamily(
            "toolpool_fleet_in_use", "Fleet permits in use on this replica.", labels=["destination"]
        )
        waiting = GaugeMetricFamily(
            "toolpool_fleet_waiting",
            "Requests waiting for a fleet permit on this replica.",
            labels=["destination"],
        )
        for name, share in list(fleet._shares.items()):
            limit.add_metric([name, share.mode], share.limit)
            in_use.add_metric([name], share.in_use)
            waiting.add_metric([name], len(share.waiters))
        yield limit
        yield in_use
        yield waiting
