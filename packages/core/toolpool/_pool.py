"""`Pool`: the public object. Routes requests to per-destination pools, owns their lifecycle
(warm-up, maintenance thread, shutdown) and hands out clients and stats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from functools import partial
from types import TracebackType
from typing import Any, Literal, Protocol

import httpx

from toolpool import _auth_context, _h2pool, _state
from toolpool._async import h2 as async_h2
from toolpool._async import request as async_request
from toolpool._config import (
    DEFAULT_POLICY_MARK,
    Destination,
    DestinationSettings,
    PoolDefaults,
    origin_of,
    origin_text,
    resolve,
)
from toolpool._destination import DestinationPool
from toolpool._maintenance import Maintenance
from toolpool._overflow import OverflowTier, local_destinations
from toolpool._saturation import Saturation, SaturationHub
from toolpool._state import Slot
from toolpool._stats import DestinationStats, PoolStats, destination_stats
from toolpool._sync import h2 as sync_h2
from toolpool._sync import request as sync_request
from toolpool._sync.connection import SYNC_DRIVER
from toolpool.auth._layer import auth_layer
from toolpool.errors import ConfigError, PoolClosed, UnknownDestination
from toolpool.resilience._admission_control import AsyncAdmission, SyncAdmission
from toolpool.resilience._layer import PolicyRuntime
from toolpool.resilience._policy import DEFAULT_POLICY, Policy

__all__ = ["Pool", "ToolSpans"]

log = logging.getLogger("toolpool.pool")

monotonic = time.monotonic

_DEFAULT_PORTS = {"http": 80, "https": 443}


class ToolSpans(Protocol):
    """What `Pool.tool_span` needs of a tracing integration (`toolpool.otel`'s `Tracing`):
    a context around one tool call."""

    def tool_span(
        self, tool_name: str, call_id: str | None = None, system: str | None = None
    ) -> AbstractContextManager[object]: ...


class Pool:
    """A shared, per-destination, auth-affine connection pool for tool calls.

    ```python
    pool = toolpool.Pool(
        destinations=[
            toolpool.Destination("crm", "https://crm.internal", documented_limit=100),
            toolpool.Destination("search", "https://search.internal", max_connections=20),
        ],
    )
    async with pool:   # starts the maintenance thread and warms up connections
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            r = await pool.client().get("https://crm.internal/contacts")
    ```

    Each destination (an origin: scheme, host, port) has its own pool, capped at
    `max_connections` across all auth contexts; a connection that carried one auth context
    never carries another. Requests beyond the cap wait in a FIFO queue of
    `queue_factor × max_connections`; beyond that they fail at once with `PoolSaturated`.
    `Pool()` with no destinations pools every origin with the defaults below; with
    `unknown_destinations="reject"` only listed origins are reachable.

    Hierarchical pools: with `overflow=toolpool.RemotePool(url, token=...)` each listed
    destination keeps at most `local_max_connections` (default 3) connections here, and a
    request that finds none free for its auth context goes to that pool service instead of
    queuing (`toolpool serve`; the pool closes the RemotePool when it closes).

    Egress policy: every connect is checked on the address its host resolves to then
    (`egress=toolpool.Egress(...)`; by default cloud metadata, link-local, unspecified and
    multicast addresses are refused, in any spelling), raising `toolpool.EgressDenied`.

    HTTP/2 (`http2=True`, the default): https:// destinations offer `h2` and `http/1.1` by
    ALPN; where the server picks h2, a tenant gets one multiplexed connection per destination
    and `max_connections` counts concurrent requests (streams) across tenants
    (toolpool._h2pool explains the rules). Plain http:// is HTTP/1.1; `http2=False` (here or
    per `Destination`) keeps https:// on HTTP/1.1 too.

    Arguments are the pool-wide defaults (see `PoolDefaults` for the reason behind each);
    a `Destination` overrides any of them for itself. A pool used before it is entered
    starts on first use (without warm-up). Use one pool per process and share it.
    """

    def __init__(
        self,
        destinations: Iterable[Destination] = (),
        *,
        max_connections: int = 50,
        idle_ttl: float = 45.0,
        max_lifetime: float = 600.0,
        health_check_interval: float = 10.0,
        queue_factor: float = 2.0,
        warmup: float = 0.25,
        acquire_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        verify: Any = True,
        unknown_destinations: Literal["pool", "reject"] = "pool",
        policy: Policy | None = DEFAULT_POLICY,
        local_max_connections: int | None = None,
        overflow: OverflowTier | None = None,
        egress: Any = None,
        http2: bool = True,
    ) -> None:
        self.defaults = PoolDefaults(
            max_connections=max_connections,
            idle_ttl=idle_ttl,
            max_lifetime=max_lifetime,
            health_check_interval=health_check_interval,
            queue_factor=queue_factor,
            warmup=warmup,
            acquire_timeout=acquire_timeout,
            connect_timeout=connect_timeout,
            verify=verify,
            unknown_destinations=unknown_destinations,
            http2=http2,
            policy=_checked_policy(policy, "policy"),
            **({} if egress is None else {"egress": egress}),
        )
        if isinstance(destinations, Destination):
            destinations = [destinations]
        # Hierarchical pools: a small local tier per destination, the rest to the service.
        self.overflow: OverflowTier | None = overflow
        if overflow is not None or local_max_connections is not None:
            destinations = local_destinations(
                destinations, overflow, local_max_connections, max_connections
            )
        self._by_name: dict[str, DestinationPool] = {}
        # Routes by (scheme, host, port-or-None), as httpx.URL reports them.
        self._routes: dict[tuple[str, str, int | None], DestinationPool] = {}
        self._registry_lock = threading.Lock()
        self._lifecycle_lock = threading.Lock()
        self._maint: Maintenance | None = None
        self._started = False
        self.closed = False
        # Called once when the pool starts closing (auth providers stop background refreshes):
        # see on_close.
        self._close_callbacks: list[Callable[[], None]] = []
        # Subscribers of on_saturation, created on first subscription.
        self._saturation_hub: SaturationHub | None = None
        # Awaited by aclose() before the pool closes, so that what ends gracefully over the
        # pool (an MCP session's DELETE) still can: toolpool.mcp registers its sessions here.
        self._aclose_hooks: list[Callable[[], Awaitable[None]]] = []
        # Called with each destination added later (pooled on demand), after its layers are
        # added: instrumentation that applies to every destination (toolpool.otel).
        self._destination_hooks: list[Callable[[DestinationPool], None]] = []
        for dest in destinations:
            if not isinstance(dest, Destination):
                raise ConfigError(
                    f"destinations must be toolpool.Destination objects, got {type(dest).__name__}"
                )
            self._add(resolve(dest, self.defaults, listed=True))

    def __repr__(self) -> str:
        names = ", ".join(self._by_name)
        return f"<toolpool.Pool destinations=[{names}]{' closed' if self.closed else ''}>"

    # ------------------------------------------------------------------ destinations

    def _add(self, settings: DestinationSettings) -> DestinationPool:
        if settings.name in self._by_name:
            raise ConfigError(
                f"two destinations are named {settings.name!r}; destination names must be unique"
            )
        scheme, host, port = settings.origin
        if (scheme, host, port) in self._routes:
            other = self._routes[(scheme, host, port)].name
            raise ConfigError(
                f"destinations {other!r} and {settings.name!r} have the same origin "
                f"{origin_text(settings.origin)}; give each origin one destination"
            )
        if settings.http2:
            # Slots are stream permits; the HTTP/2 side sends (and falls back to HTTP/1.1).
            dest = DestinationPool(
                self, settings, self.defaults.egress, async_h2.send, sync_h2.send
            )
            _h2pool.attach(dest)
            dest.state.use_stream_permits()
        else:
            dest = DestinationPool(
                self, settings, self.defaults.egress, async_request.send, sync_request.send
            )
        # The send chain (toolpool._chain): each layer goes to its place by its role, innermost
        # first: auth, policy, overflow, then tenant metrics and tracing (added by
        # toolpool.metrics / toolpool.otel, here through the destination hooks).
        if settings.auth is not None:
            dest.add_layer(auth_layer(settings.auth, dest))
        policy = settings.policy
        if policy is DEFAULT_POLICY_MARK:
            policy = DEFAULT_POLICY
        checked = _checked_policy(policy, f"destination {settings.name!r}: policy")
        if checked is not None:
            dest.add_layer(PolicyRuntime(checked, dest))
        if self.overflow is not None and settings.listed:
            dest.add_layer(self.overflow.overflow_layer(dest))
        for hook in self._destination_hooks:
            hook(dest)
        self._by_name[settings.name] = dest
        self._routes[(scheme, host, port)] = dest
        if _DEFAULT_PORTS.get(scheme) == port:
            self._routes[(scheme, host, None)] = dest
        return dest

    def route(self, url: httpx.URL) -> DestinationPool:
        """The destination pool (`toolpool.DestinationPool`) a request to `url` goes
        through: the listed destination of its origin, or one pooled on demand (created
        now; `UnknownDestination` when the pool rejects unknown destinations,
        `httpx.UnsupportedProtocol` for a scheme other than http/https). Starts the pool if
        needed (`PoolClosed` once closed). What transports and adapters send with
        (`dest.async_send` / `dest.sync_send`); `destination(name_or_url)` only looks up."""
        dest = self._routes.get((url.scheme, url.host, url.port))
        if dest is None:
            dest = self._unknown(url)
        if not self._started or self.closed:
            self._ensure_started()  # raises PoolClosed once closed
        return dest

    def _unknown(self, url: httpx.URL) -> DestinationPool:
        origin = origin_of(url)
        if origin[0] not in _DEFAULT_PORTS:
            raise httpx.UnsupportedProtocol(
                f"toolpool pools http:// and https:// URLs, not {url.scheme!r}"
            )
        if self.closed:
            raise PoolClosed()
        if self.defaults.unknown_destinations == "reject":
            raise UnknownDestination(
                origin_text(origin),
                [f"{d.name} ({d.settings.url})" for d in self._by_name.values()],
            )
        with self._registry_lock:
            dest = self._routes.get((origin[0], origin[1], origin[2]))
            if dest is None:
                text = origin_text(origin)
                dest = self._add(resolve(Destination(text, text), self.defaults, listed=False))
        return dest

    def destination(self, name_or_url: str) -> DestinationPool:
        """A destination's run-time pool (`toolpool.DestinationPool`), by name or by URL:
        its `settings`, its send chain (`layers`, `add_layer`), `auth` and `policy`."""
        dest = self._by_name.get(name_or_url)
        if dest is not None:
            return dest
        try:
            origin = origin_of(name_or_url)
        except Exception:
            origin = None
        if origin is not None and origin[0] in _DEFAULT_PORTS:
            found = self._routes.get(origin)
            if found is not None:
                return found
        known = ", ".join(self._by_name) or "none"
        raise KeyError(f"no destination named or located at {name_or_url!r} (known: {known})")

    @property
    def destinations(self) -> list[str]:
        """Names of the destinations known so far (listed and pooled-on-demand)."""
        return list(self._by_name)

    # ------------------------------------------------------------------ clients

    async def request(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Any = None,
        headers: Any = None,
        content: Any = None,
        json: Any = None,
        timeout: float | None = 5.0,
    ) -> httpx.Response:
        """Send one request through the pool and read its body: the lean path.

        The same pooling, auth context, credentials and resilience as `pool.client()`, without
        httpx's client layer (no redirects, cookies, event hooks or default headers), which
        costs more per request than the pool itself. For throughput-bound tool code:

        ```python
        r = await pool.request("GET", "https://crm.internal/contacts", params={"q": "acme"})
        r.raise_for_status()
        ```
        """
        request = self._lean_request(method, url, params, headers, content, json, timeout)
        dest = self.route(request.url)
        try:
            response = await dest.async_send(request, _auth_context._current.get())
        except httpx.RequestError as exc:
            _blame_caller(exc, request)
            raise
        try:
            await response.aread()
        except httpx.RequestError as exc:
            _blame_caller(exc, request)
            raise
        finally:
            await response.aclose()
        response.request = request
        return response

    def request_sync(
        self,
        method: str,
        url: str | httpx.URL,
        *,
        params: Any = None,
        headers: Any = None,
        content: Any = None,
        json: Any = None,
        timeout: float | None = 5.0,
    ) -> httpx.Response:
        """`request` for threads (thread-safe)."""
        request = self._lean_request(method, url, params, headers, content, json, timeout)
        dest = self.route(request.url)
        try:
            response = dest.sync_send(request, _auth_context._current.get())
        except httpx.RequestError as exc:
            _blame_caller(exc, request)
            raise
        try:
            response.read()
        except httpx.RequestError as exc:
            _blame_caller(exc, request)
            raise
        finally:
            response.close()
        response.request = request
        return response

    @staticmethod
    def _lean_request(
        method: str,
        url: str | httpx.URL,
        params: Any,
        headers: Any,
        content: Any,
        json: Any,
        timeout: float | None,
    ) -> httpx.Request:
        limits = httpx.Timeout(timeout, pool=None).as_dict()
        return httpx.Request(
            method,
            url,
            params=params,
            headers=headers,
            content=content,
            json=json,
            extensions={"timeout": limits},
        )

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` whose requests go through this pool.

        Keyword arguments go to `httpx.AsyncClient`; everything not given keeps httpx's
        default, timeouts included, so an SDK handed this client (`openai.AsyncOpenAI(
        http_client=pool.client())`) sees a plain httpx client and applies its own timeouts.
        Waiting for a connection is bounded by the pool's `acquire_timeout` whatever the
        timeouts say (or by a shorter httpx pool timeout). Closing the client does not close
        the pool.
        """
        from toolpool._transport import AsyncTransport

        return httpx.AsyncClient(transport=AsyncTransport(self), **kwargs)

    def sync_client(self, **kwargs: Any) -> httpx.Client:
        """An `httpx.Client` whose requests go through this pool (thread-safe); httpx's
        defaults for everything not given, as `client`."""
        from toolpool._transport import Transport

        return httpx.Client(transport=Transport(self), **kwargs)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Pool:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> Pool:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def astart(self) -> None:
        """Start the pool and warm up its destinations on the running event loop."""
        self._ensure_started()
        jobs = [
            async_request.warm(dest, slot, ctx)
            for dest, slot, ctx in self._warmup_permits(asyncio.get_running_loop())
        ]
        jobs += [async_h2.warm(*job) for job in self._h2_warmups(asyncio.get_running_loop())]
        if jobs:
            results = await asyncio.gather(*jobs)
            self._log_warmup(len(results), sum(results))

    def start(self) -> None:
        """Start the pool and warm up its destinations for the thread driver."""
        self._ensure_started()
        permits = self._warmup_permits(SYNC_DRIVER)
        jobs: list[Callable[[], bool]] = [partial(sync_request.warm, *p) for p in permits]
        jobs += [partial(sync_h2.warm, *job) for job in self._h2_warmups(SYNC_DRIVER)]
        if jobs:
            with ThreadPoolExecutor(min(16, len(jobs)), "toolpool-warmup") as ex:
                results = list(ex.map(lambda job: job(), jobs))
            self._log_warmup(len(results), sum(results))

    def _h2_warmups(self, driver: Any) -> list[tuple[DestinationPool, Any, Slot | None]]:
        """HTTP/2 warm-up, per destination with warm-up on: one connection (and token) per
        listed warm-up context; with none listed, one connection for no identity, on an
        unbound permit that the first request of `driver` binds to its context (tenants and
        requests outside any context alike use it, as an unbound HTTP/1.1 warm-up
        connection). Where identity is in the handshake (mTLS) there is no connection
        without one: only listed contexts are warmed."""
        jobs: list[tuple[DestinationPool, Any, Slot | None]] = []
        now = monotonic()
        for dest in list(self._by_name.values()):
            if dest.h2 is None or not dest.settings.warmup_count or not dest.settings.listed:
                continue
            contexts = dest.settings.warmup_contexts
            if contexts:
                jobs += [(dest, ctx, None) for ctx in contexts]
            elif dest.auth is None or not dest.auth.connection_bound:
                with dest.lock:
                    slots = dest.state.warm((None, driver), 1, now)
                jobs += [(dest, None, slot) for slot in slots]
        return jobs

    def _warmup_permits(self, driver: Any) -> list[tuple[DestinationPool, Slot, Any]]:
        permits: list[tuple[DestinationPool, Slot, Any]] = []
        now = monotonic()
        for dest in list(self._by_name.values()):
            count = dest.settings.warmup_count
            if not count or not dest.settings.listed or dest.h2 is not None:
                continue
            contexts = dest.settings.warmup_contexts
            bound = dest.auth is not None and dest.auth.connection_bound
            with dest.lock:
                if bound:
                    # Connections carry identity from the handshake: warm per listed context.
                    per = max(1, count // max(1, len(contexts)))
                    for ctx in contexts:
                        slots = dest.state.warm((ctx.fingerprint, driver), per, now)
                        permits += [(dest, slot, ctx) for slot in slots]
                else:
                    slots = dest.state.warm((None, driver), count, now)
                    permits += [(dest, slot, None) for slot in slots]
        return permits

    def _log_warmup(self, asked: int, opened: int) -> None:
        if opened < asked:
            log.warning("warm-up opened %d of %d connections", opened, asked)
        else:
            log.debug("warm-up opened %d connections", opened)

    def _ensure_started(self) -> None:
        with self._lifecycle_lock:
            if self.closed:
                raise PoolClosed()
            if self._maint is None:
                self._maint = Maintenance(self._tick)
                self._maint.start()
            self._started = True

    def _maintenance(self) -> Maintenance:
        maint = self._maint
        if maint is None:
            self._ensure_started()
            maint = self._maint
            assert maint is not None
        return maint

    async def aclose(self) -> None:
        """Close the pool: fail waiting requests, close idle connections (gracefully, on
        their event loops), and close in-use ones as their requests finish."""
        if not self.closed:
            for hook in list(self._aclose_hooks):
                try:
                    await asyncio.wait_for(hook(), 15.0)
                except Exception as exc:
                    log.debug("a close hook of the pool failed: %s", exc)
        self._begin_close()
        deadline = monotonic() + 3.0
        # Closes finish on several event loops and the maintenance thread; a bounded poll
        # keeps shutdown simple (it runs once per pool).
        while self._closing_pending() and monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        self._stop_maintenance()

    def close(self) -> None:
        """Close the pool from sync code (see `aclose`)."""
        self._begin_close()
        deadline = monotonic() + 3.0
        while self._closing_pending() and monotonic() < deadline:
            time.sleep(0.01)
        self._stop_maintenance()

    def _begin_close(self) -> None:
        with self._lifecycle_lock:
            if self.closed:
                return
            self.closed = True
        for callback in list(self._close_callbacks):
            callback()
        now = monotonic()
        for dest in list(self._by_name.values()):
            with dest.lock:
                waiters = dest.state.fail_all_waiters()
                actions = dest.state.close_all_idle(now)
            dest.execute(actions)
            for waiter in waiters:
                waiter.notify()
            if dest.h2 is not None:
                dest.h2.close_all()

    def _closing_pending(self) -> bool:
        # Only idle/closing connections on a loop that still runs can finish closing.
        return any(d.state.closing for d in self._by_name.values())

    def _stop_maintenance(self) -> None:
        maint = self._maint
        if maint is not None:
            maint.stop()

    # ------------------------------------------------------------------ maintenance

    def _tick(self, now: float) -> float:
        """Idle TTL, lifetime and health checks for every destination; returns the delay
        until the next tick."""
        delay = self.defaults.health_check_interval
        for dest in list(self._by_name.values()):
            with dest.lock:
                actions = dest.state.expire(now)
                due = dest.state.due_health_checks(now)
                deadline = dest.state.next_deadline()
            if actions:
                dest.execute(actions)
            for slot in due:
                conn = slot.conn
                if conn is not None and not conn.probe():
                    with dest.lock:
                        # A request may have leased it since the check was scheduled: then
                        # that request meets the dead connection and replaces it.
                        was_idle = slot.state == _state.IDLE
                        dead = dest.state.discard(slot, monotonic())
                    if was_idle:
                        conn.abort()
                    dest.execute(dead)
            if dest.h2 is not None:
                dest.h2.tick(now)
            self._adapt_reuse_factor(dest)
            # Nothing wakes this thread when a connection goes idle, so tick at least once
            # per idle TTL: an idle connection then closes at most one TTL late.
            delay = min(delay, dest.settings.health_check_interval, dest.settings.idle_ttl)
            if deadline is not None:
                delay = min(delay, max(0.0, deadline - now))
        return max(delay, 0.01)

    @staticmethod
    def _adapt_reuse_factor(dest: DestinationPool) -> None:
        """How many waiters a tenant's connection serves before the tenant counts as needy
        (and may take another tenant's connection): about the time a new connection costs
        (open, plus the close of the one it replaces) over the time a request holds one."""
        with dest.lock:
            state = dest.state
            opened = state.create_time.count
            if opened < 5 or state.hold_ewma <= 0:
                return
            open_cost = 1.3 * state.create_time.sum / opened
            factor = max(1, min(8, round(open_cost / state.hold_ewma)))
            actions = state.set_reuse_factor(factor) if factor != state.reuse_factor else []
        if actions:
            dest.execute(actions)

    def _orphaned(self, dest: DestinationPool, slot: Slot) -> None:
        """A response was garbage-collected unclosed: close its connection (any thread)."""
        self._defer(lambda: dest.release(slot, False))

    # ------------------------------------------------------------------ stats

    def stats(self) -> PoolStats:
        """A snapshot of every destination's pool: counts by state, queue, totals, waits.

        Cheap enough to call every second; the metrics exporter reads the same data.
        """
        return PoolStats({name: destination_stats(d) for name, d in list(self._by_name.items())})

    def destination_stats(self, name_or_url: str) -> DestinationStats:
        """The stats snapshot of one destination."""
        return destination_stats(self.destination(name_or_url))

    # ------------------------------------------------------------------ host services

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once when the pool begins closing (layers stop their timers and
        background refreshes); the same callback registered twice runs once."""
        with self._lifecycle_lock:
            if callback not in self._close_callbacks:
                self._close_callbacks.append(callback)

    def _defer(self, callback: Callable[[], None]) -> None:
        maint = self._maint
        if maint is not None and not maint.stopped:
            maint.call_soon(callback)

    # ------------------------------------------------------------------ tracing

    # The tracing toolpool.otel installs with `instrument(pool)` (its `Tracing`), None while
    # the pool is not traced; read through `tool_span`.
    _tool_spans: ToolSpans | None = None

    def tool_span(
        self, tool_name: str, call_id: str | None = None, system: str | None = None
    ) -> AbstractContextManager[object]:
        """A span around one tool call, for framework adapters whose framework opens none
        (LangChain): while `toolpool.otel` traces this pool, a GenAI `execute_tool
        {tool_name}` span, current for the call (its requests' spans are its children), with
        `gen_ai.tool.call.id` = `call_id` and `gen_ai.system` = `system` when given;
        otherwise a context that does nothing.

        ```python
        with pool.tool_span("lookup", call_id="call_1", system="langchain"):
            ...  # run the tool
        ```"""
        spans = self._tool_spans
        if spans is None:
            return contextlib.nullcontext()
        return spans.tool_span(tool_name, call_id, system)

    # ------------------------------------------------------------------ admission

    def policy_runtime(self, dest: DestinationPool) -> PolicyRuntime:
        """The resilience layer of `dest` (one of this pool's destinations), which runs its
        admission; a destination without a policy (`Pool(policy=None)`) gets `Policy.off()`
        on first use, so admission works everywhere."""
        runtime = dest.policy
        if runtime is None:
            with self._registry_lock:
                runtime = dest.policy
                if runtime is None:
                    runtime = PolicyRuntime(Policy.off(), dest)
                    dest.add_layer(runtime)
        if not isinstance(runtime, PolicyRuntime):
            raise TypeError(
                f"destination {dest.name!r} has a policy of type {type(runtime).__name__}, "
                f"not a toolpool.resilience.Policy; admission needs the latter"
            )
        return runtime

    def _admission_of(self, destination: str) -> PolicyRuntime:
        try:
            dest = self.destination(destination)
        except KeyError:
            # An origin not seen yet: the pool creates its destination on first use, and so
            # does admission (or raises UnknownDestination when the pool rejects unknown ones).
            try:
                origin = origin_of(destination)
            except Exception:
                raise KeyError(
                    f"no destination named or located at {destination!r} "
                    f"(known: {', '.join(self.destinations) or 'none'})"
                ) from None
            if origin[0] not in _DEFAULT_PORTS or not origin[1]:
                raise
            dest = self.route(httpx.URL(destination))
        return self.policy_runtime(dest)

    @staticmethod
    def _admit_timeout(runtime: PolicyRuntime, timeout: float | None) -> float:
        if timeout is None:
            return runtime.policy.max_wait
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
            raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
        return max(0.0, float(timeout))

    def saturation(self, destination: str) -> Saturation:
        """How busy `destination` (a name or URL) is now: utilization, queue, effective
        limit, a retry-after estimate and a state, "ok", "busy" or "saturated"."""
        return self._admission_of(destination).saturation()

    def admit(self, destination: str, timeout: float | None = None) -> AsyncAdmission:
        """Hold a place for one tool call to `destination` (a name or URL).

        ```python
        async with pool.admit("crm"):
            r = await client.get("https://crm.internal/contacts")
        ```

        Waits (FIFO) while the destination is saturated, at most `timeout` seconds (None:
        the policy's `max_wait`, 5 s by default; 0: do not wait), then raises
        `toolpool.PoolSaturated` with `retry_after` and `reason` ("timeout", "queue_full",
        "breaker_open" or "rate_limited"). Calls inside `admit` are counted against the
        destination's capacity, so their requests do not meet a full queue.
        """
        runtime = self._admission_of(destination)
        return AsyncAdmission(runtime, self._admit_timeout(runtime, timeout))

    def admit_sync(self, destination: str, timeout: float | None = None) -> SyncAdmission:
        """`admit` for sync code: `with pool.admit_sync("crm"): ...` (blocks the thread)."""
        runtime = self._admission_of(destination)
        return SyncAdmission(runtime, self._admit_timeout(runtime, timeout))

    def on_saturation(self, callback: Callable[[Saturation], object]) -> Callable[[], None]:
        """Call `callback(Saturation)` whenever a destination changes state: becomes busy
        (utilization >= 80 % or calls queued), saturated (queue full, breaker open, or a
        Retry-After pause), or recovers. Returns a function that unsubscribes.

        Callbacks run on the thread that saw the change, with no pool lock held; keep them
        short (e.g. `loop.call_soon_threadsafe(...)` into your own event loop).
        """
        hub = self._saturation_hub
        if hub is None:
            with self._registry_lock:
                hub = self._saturation_hub
                if hub is None:
                    hub = self._saturation_hub = SaturationHub()
        return hub.subscribe(callback)


def _checked_policy(policy: object, what: str) -> Policy | None:
    if policy is not None and not isinstance(policy, Policy):
        raise ConfigError(
            f"{what} must be a toolpool.resilience.Policy or None, got {type(policy).__name__}"
        )
    return policy


def _blame_caller(exc: httpx.RequestError, request: httpx.Request) -> None:
    """Point an exception at the caller's request, never at a copy an auth layer made
    (that one carries the credential), as httpx's client does for `pool.client()`."""
    exc.request = request
