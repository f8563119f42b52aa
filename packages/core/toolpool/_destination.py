"""One destination at run time: its state machine behind a lock, and the execution of the
actions it returns, shared by the asyncio and thread drivers.

The drivers call in here to report what happened to a slot (opened, released, lost); this
module asks `_state` what follows and carries it out: waking waiters (possibly on another
thread or event loop) and starting graceful closes.
"""

from __future__ import annotations

import contextvars
import logging
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import httpx

from toolpool import _state
from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, SendChain, SendLayer, SyncSend
from toolpool._config import DestinationSettings
from toolpool._egress import Egress
from toolpool._maintenance import Maintenance
from toolpool._saturation import Saturation, SaturationHub
from toolpool._state import Action, Close, DestinationState, Limits, Slot, Waiter
from toolpool._tls import client_ssl_context
from toolpool.errors import PoolClosed, PoolSaturated, PoolTimeout

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

__all__ = [
    "AuthLayer",
    "DestinationPool",
    "H2Side",
    "PolicyLayer",
    "PoolHost",
    "Probe",
    "connect_error",
    "counted_calls",
    "is_event_stream",
    "mark_counted",
    "pool_key",
    "unmark_counted",
]

log = logging.getLogger("toolpool.pool")

monotonic = time.monotonic

#: The destinations (ids of their `DestinationPool`) for which the requests made in the
#: current task or thread belong to a call already counted: a call inside admission or
#: accepted by the resilience layer (which bound their number), a token fetch (part of the
#: call it is for), a retry of such a call. The drivers queue such requests without the
#: queue bound (see `_state`'s theory of operation); the layers that count set it around
#: their inner send.
counted_calls: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "toolpool_counted_calls", default=frozenset()
)


def mark_counted(dest: DestinationPool) -> contextvars.Token[frozenset[int]] | None:
    """Mark the current task's (or thread's) requests to `dest` as belonging to a counted
    call until `unmark_counted(token)`; None (nothing to undo) if they already are."""
    marks = counted_calls.get()
    key = id(dest)
    if key in marks:
        return None
    return counted_calls.set(marks | {key})


def unmark_counted(token: contextvars.Token[frozenset[int]] | None) -> None:
    """Undo `mark_counted` (in the same task or thread)."""
    if token is not None:
        counted_calls.reset(token)


def pool_key(ctx: AuthContext | None, driver: Any) -> tuple[str, Any]:
    """The state machine's key for requests of `ctx` on `driver` (an event loop, or the
    thread driver): the auth context's fingerprint ("" for no context) and the driver."""
    return (ctx._fingerprint if ctx is not None else "", driver)


def connect_error(
    dest: DestinationPool, exc: BaseException, timeout: float | None
) -> BaseException:
    """The httpx exception for a driver's failed connect (cancellation and others pass
    through), naming the destination and what to look at."""
    where = f"{dest.name} ({dest.host}:{dest.port})"
    if isinstance(exc, TimeoutError):
        return httpx.ConnectTimeout(f"connecting to {where} timed out after {timeout} s")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return httpx.ConnectError(f"TLS handshake with {where} failed: {exc}")
    if isinstance(exc, OSError):
        return httpx.ConnectError(f"cannot connect to {where}: {exc}")
    return exc


def is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response head announces a `text/event-stream` body (SSE): a long-lived
    response that holds its connection until the stream ends."""
    for name, value in headers:
        if len(name) == 12 and name.lower() == b"content-type":
            return value[:17].lower() == b"text/event-stream"
    return False


class PoolHost(Protocol):
    """What a destination and its layers need of the pool that holds them (`toolpool.Pool`
    implements it): no routing table, clients or stats, so nothing here imports the pool."""

    @property
    def closed(self) -> bool:
        """Whether the pool has begun closing."""
        ...

    #: The pool's `on_saturation` subscribers (None until the first subscription).
    @property
    def _saturation_hub(self) -> SaturationHub | None: ...

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call `callback()` once when the pool begins closing (e.g. stop a refresh timer)."""
        ...

    def route(self, url: httpx.URL) -> DestinationPool:
        """The destination of a request URL (a token endpoint's, for an auth layer)."""
        ...

    def _maintenance(self) -> Maintenance:
        """The maintenance thread (started if needed); raises PoolClosed once closed."""
        ...

    def _defer(self, callback: Callable[[], None]) -> None:
        """Run `callback()` soon on the maintenance thread (dropped if it has stopped):
        for finalizers, which must not take locks their thread may hold."""
        ...

    def _orphaned(self, dest: DestinationPool, slot: Slot) -> None:
        """A response was garbage-collected unclosed: close its connection (any thread)."""
        ...


class H2Side(Protocol):
    """A destination's HTTP/2 side (`toolpool._h2pool.H2Connections`), as the pool, the
    stats readers and a stream permit use it; the HTTP/2 request path itself works on the
    concrete type (`_h2pool.h2_side(dest)`)."""

    #: None until the first connect, then what ALPN chose: "h2" or "http/1.1".
    protocol: str | None

    def permit_opened(self, key: _state.Key) -> None:
        """The state machine granted a stream permit to `key`."""
        ...

    def permit_closed(self, key: _state.Key, keep: bool = False, reason: str | None = None) -> None:
        """The state machine closed one of `key`'s permits for `reason` (`keep`: its capacity
        moved)."""
        ...

    def tick(self, now: float) -> None:
        """The maintenance thread's pass: drain idle connections, PING quiet ones."""
        ...

    def stats(self) -> dict[str, Any]:
        """protocol, connections, streams_in_use, streams_per_connection,
        connections_opened, connections_closed (by reason), streams_total, streams_reset."""
        ...

    def close_all(self) -> None:
        """Pool shutdown: every connection drains."""
        ...


class Probe(Protocol):
    """Receives timings from the drivers and the auth layer (`toolpool.otel`'s tracing).
    None of its methods may raise or block; each is told what happened, when (monotonic
    seconds)."""

    def attempt(self, dest: DestinationPool, asked: float) -> None:
        """The pooled send of one attempt starts (before it asks for a connection)."""

    def waited(self, dest: DestinationPool, waiter: Waiter, error: BaseException | None) -> None:
        """A queued request was served (`waiter.since` to `waiter.granted_at`), or gave up
        with `error` (then it waited until now)."""

    def connected(
        self,
        dest: DestinationPool,
        started: float,
        tcp_done: float | None,
        done: float,
        error: BaseException | None,
        protocol: str | None = None,
        tls_done: float | None = None,
        settings_at: float | None = None,
    ) -> None:
        """A connection opened (or failed to): TCP from `started` to `tcp_done`, TLS from
        `tcp_done` to `tls_done` (or `done`; `tcp_done` None: not known, or plain HTTP).
        HTTP/2: `protocol` is what ALPN chose ("h2", "http/1.1"; None: an HTTP/1.1 driver's
        connection); `settings_at`: when the server's SETTINGS arrived (None: not yet, or
        not HTTP/2). A request that opens a connection sends its stream at `done`, right
        after the preface, without waiting for the SETTINGS (RFC 9113 3.4); a warm-up or
        preconnect waits for them (then `done` is `settings_at`). Told when the opening
        request's exchange ends, so that the SETTINGS arrival is known."""

    def exchanged(
        self,
        dest: DestinationPool,
        sent: float,
        status: int | None,
        error: BaseException | None,
        sent_at: float | None = None,
        reset: bool = False,
    ) -> None:
        """The request went out at `sent` and its response head came in now (`status`), or
        the exchange failed with `error`. HTTP/2: its body was sent completely at `sent_at`
        (None: no body, or not known), and `reset` says a failed stream was cancelled with
        RST_STREAM while its connection stays."""

    def connect_waited(self, dest: DestinationPool, since: float, end: float) -> None:
        """HTTP/2: a request waited from `since` to `end` for the connection another request
        of its auth context was opening (one connect per context at a time)."""

    def pinged(self, dest: DestinationPool, since: float, end: float, answered: bool) -> None:
        """HTTP/2: an idle connection was PINGed before it took the request's stream; not
        `answered` in time: it was closed and another one taken."""

    def resent(self, dest: DestinationPool, reason: str) -> None:
        """The request is sent again on another connection: the server did not process it
        (`reason` "refused_stream", "goaway", "no_new_stream"; HTTP/1.1: "connection_closed")."""

    def fell_back(self, dest: DestinationPool) -> None:
        """The HTTP/2 attempt found that the server picked http/1.1 by ALPN: the HTTP/1.1
        driver sends the request instead, as the same attempt."""

    def admission_waited(
        self,
        dest: DestinationPool,
        since: float,
        end: float,
        outcome: str,
        error: BaseException | None,
    ) -> None:
        """A call waited at `dest`'s admission gate from `since` to `end` (a wrapped agent's
        tool call beyond the connections, a `pool.admit` beyond the queue): `outcome`
        "admitted", or the refusal's reason ("timeout", "breaker_open", "cancelled", ...)."""

    def token_fetch(self, dest: DestinationPool, reason: str) -> AbstractContextManager[object]:
        """A scope around one token request of `dest`'s auth provider (reason: "initial",
        "expiry" or "401"), or around a wait for another request's fetch (reason "wait")."""
        ...


class AuthLayer(SendLayer, Protocol):
    """What the core asks of a destination's auth layer besides sending (`dest.auth`)."""

    #: Whether identity is set by the TLS handshake (mTLS): then every new connection of a
    #: context uses `ssl_context(ctx)` and warm-up opens connections per listed context.
    @property
    def connection_bound(self) -> bool: ...

    def ssl_context(self, ctx: AuthContext | None, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """The TLS context presenting `ctx`'s identity and offering `alpn` (none: no ALPN,
        HTTP/1.1), connection-bound layers only."""
        ...

    def stats(self) -> object:
        """The layer's counters (`toolpool.auth.AuthStats`)."""
        ...


class PolicyLayer(SendLayer, Protocol):
    """What the core and the metrics ask of a destination's resilience layer (`dest.policy`,
    a `toolpool.resilience.PolicyRuntime`) besides sending."""

    def stats(self) -> object:
        """The layer's counters (`toolpool.resilience.PolicyStats`)."""
        ...

    def saturation(self) -> Saturation:
        """How busy the destination is now."""
        ...


class DestinationPool:
    """One destination of a `toolpool.Pool` at run time (`pool.destination("crm")`): its
    state machine, its send chain, and what its layers report.

    Public attributes: `name`, `settings` (the resolved `Destination`), `auth` (the auth
    layer, if any: `.stats()`), `policy` (the resilience layer, if any: `.stats()`,
    `.saturation()`), `layers` (the send chain, innermost first), `async_send` /
    `sync_send` (send one request through the whole chain). Layers join and leave the chain
    with `add_layer` / `remove_layer`.
    """

    def __init__(
        self,
        pool: PoolHost,
        settings: DestinationSettings,
        egress: Egress,
        async_driver: Callable[[DestinationPool, httpx.Request, AuthContext | None], Any],
        sync_driver: Callable[[DestinationPool, httpx.Request, AuthContext | None], Any],
    ) -> None:
        self.pool = pool
        self.settings = settings
        self.name = settings.name
        self.listed = settings.listed
        scheme, self.host, self.port = settings.origin
        self.tls = scheme == "https"
        self.state = DestinationState(
            Limits(
                max_connections=settings.max_connections,
                queue_limit=settings.queue_limit,
                idle_ttl=settings.idle_ttl,
                max_lifetime=settings.max_lifetime,
                health_check_interval=settings.health_check_interval,
            )
        )
        self.lock = threading.Lock()
        # The pool's toolpool.Egress, checked by the drivers at every connect (_egress).
        self.egress = egress
        # Connects the egress policy refused, by rule (toolpool_egress_denied_total).
        self.egress_denied: dict[str, int] = {}
        self._ssl: ssl.SSLContext | None = None
        self._ssl_lock = threading.Lock()
        # The auth layer (toolpool.auth) and the resilience layer (toolpool.resilience), when
        # the destination has them: also in `layers`, kept here for their other duties.
        self.auth: AuthLayer | None = None
        self.policy: PolicyLayer | None = None
        # Set by toolpool.otel when the pool is traced: told of waits, connects and exchanges
        # (see `Probe`); None costs the drivers one attribute test.
        self.probe: Probe | None = None
        # The send chain (see `toolpool._chain`): the drivers' pooled send under the layers.
        # `base_*` stay unwrapped, for requests that must skip the layers (token requests).
        self.base_async_send: AsyncSend = partial(async_driver, self)
        self.base_sync_send: SyncSend = partial(sync_driver, self)
        self._chain = SendChain(self.base_async_send, self.base_sync_send)
        self.async_send: AsyncSend = self.base_async_send
        self.sync_send: SyncSend = self.base_sync_send
        # The HTTP/2 side (toolpool._h2pool.H2Connections) when HTTP/2 is offered: then a
        # slot is a permit for one stream, and the pool gives `_async/h2`, `_sync/h2` as drivers.
        self.h2: H2Side | None = None

    def __repr__(self) -> str:
        return f"<DestinationPool {self.name!r} {self.settings.url}>"

    # ------------------------------------------------------------------ send chain

    @property
    def layers(self) -> tuple[SendLayer, ...]:
        """The layers of the send chain, innermost first (see `toolpool._chain`)."""
        return self._chain.layers

    def add_layer(self, layer: SendLayer) -> None:
        """Put `layer` in its place in the send chain (by its role) and rebuild the chain.
        An auth layer also becomes `auth`; a policy layer, `policy`."""
        self._chain.add(layer, self.name)
        if layer.role == "auth":
            self.auth = cast(AuthLayer, layer)
        elif layer.role == "policy":
            self.policy = cast(PolicyLayer, layer)
        self.async_send = self._chain.async_send
        self.sync_send = self._chain.sync_send

    def remove_layer(self, layer: SendLayer) -> None:
        """Take `layer` out of the send chain and rebuild the chain."""
        self._chain.remove(layer)
        if self.auth is layer:
            self.auth = None
        if self.policy is layer:
            self.policy = None
        self.async_send = self._chain.async_send
        self.sync_send = self._chain.sync_send

    # ------------------------------------------------------------------ TLS

    def ssl_context(self, ctx: AuthContext | None) -> ssl.SSLContext | None:
        """The TLS context for a new connection acting for `ctx` (None for plain HTTP)."""
        if not self.tls:
            return None
        auth = self.auth
        if auth is not None and auth.connection_bound:
            return auth.ssl_context(ctx)
        sslctx = self._ssl
        if sslctx is None:
            with self._ssl_lock:
                if self._ssl is None:
                    self._ssl = client_ssl_context(self.settings.verify, self.settings.cert)
                sslctx = self._ssl
        return sslctx

    def lease_if_room(self, key: tuple[str, Any]) -> Slot | None:
        """An idle connection of `key`, or a permit, but only without queueing (None at the
        cap). For preconnect: a connection opened ahead of a request never waits."""
        with self.lock:
            state = self.state
            if state.total >= state.cap:
                return None
            got = state.acquire(key, monotonic())
        assert isinstance(got, Slot)
        return got

    # ------------------------------------------------------------------ reports from drivers

    def egress_refused(self, rule: str) -> None:
        """The egress policy refused a connect of this destination (counted by rule)."""
        with self.lock:
            self.egress_denied[rule] = self.egress_denied.get(rule, 0) + 1

    def opened(self, slot: Slot, conn: Any, connect_seconds: float | None = None) -> None:
        with self.lock:
            self.state.opened(slot, conn, monotonic())
            if connect_seconds is not None:
                self.state.record_create(connect_seconds)

    def record_connect(self, seconds: float) -> None:
        """A connection not tied to a slot (HTTP/2: slots are stream permits) took
        `seconds` to open: the create-time histogram counts it."""
        with self.lock:
            self.state.record_create(seconds)

    def connect_failed(self, started: float, exc: BaseException) -> None:
        """A driver's connect for this destination, begun at `started`, raised `exc`: told to
        the probe, if any (the driver itself reports the slot with `open_failed`)."""
        if self.probe is not None:
            self.probe.connected(self, started, None, monotonic(), exc)

    def connect_done(self, slot: Slot, conn: Any, started: float) -> None:
        """A driver's connect for the request holding `slot`, begun at `started`, opened
        `conn`: `opened` with its connect time, and told to the probe, if any."""
        done = monotonic()
        with self.lock:
            self.state.opened(slot, conn, done)
            self.state.record_create(done - started)
        if self.probe is not None:
            self.probe.connected(self, started, conn.tcp_done, done, None)

    def warmed(self, slot: Slot, conn: Any, connect_seconds: float | None = None) -> None:
        with self.lock:
            actions = self.state.warmed(slot, conn, monotonic())
            if connect_seconds is not None:
                self.state.record_create(connect_seconds)
        if actions:
            self.execute(actions)

    def open_failed(self, slot: Slot) -> None:
        with self.lock:
            actions = self.state.open_failed(slot, monotonic())
        if actions:
            self.execute(actions)

    def abandon(self, slot: Slot, sock: Any) -> None:
        """Give up opening the permit's connection whose TCP handshake completed: `sock`
        (a blocking or non-blocking socket, ours alone) closes gracefully on the maintenance
        thread, and the slot counts against the cap until the peer has seen the close."""
        with self.lock:
            actions = self.state.abandon(slot, monotonic())
        try:
            maintenance = self.pool._maintenance()
        except PoolClosed:  # no thread to wait on the peer any more: close at once
            sock.close()
            self.connection_lost(slot)
        else:
            maintenance.close_gracefully(sock, partial(self.connection_lost, slot))
        if actions:
            self.execute(actions)

    def release(self, slot: Slot, reusable: bool) -> None:
        """The request is done with the slot's connection."""
        if reusable and (self.pool.closed or not slot.conn.alive):
            reusable = False
        with self.lock:
            actions = self.state.release(slot, monotonic(), reusable)
        if actions:
            self.execute(actions)

    def checked_lease(self, slot: Slot) -> Slot:
        """`slot` if its connection passes the stale check the state machine asks for
        (`DestinationState.must_check`), else a permit in its place."""
        if not self.state.must_check(slot) or slot.conn.probe():
            return slot
        return self.replace(slot)

    def unanswered(self, slot: Slot, reused: bool, retried: bool, replayable: bool) -> Slot | None:
        """The slot's connection failed before any byte of the response: a permit to retry
        the request on, or None once the slot is closed and the request must fail (the
        state machine decides: `DestinationState.unanswered`)."""
        conn = slot.conn
        conn.active = False
        with self.lock:
            got = self.state.unanswered(slot, monotonic(), reused, retried, replayable)
        if isinstance(got, Slot):
            conn.abort()  # dead: no graceful close, and no report follows for its slot
            return got
        if got:
            self.execute(got)
        return None

    def wait_limit(self, timeouts: dict[str, float | None]) -> float:
        """How long a request may wait for a slot: the pool's bound and httpx's, the smaller."""
        pool_timeout = timeouts.get("pool")
        limit = self.settings.acquire_timeout
        return pool_timeout if pool_timeout is not None and pool_timeout < limit else limit

    def connect_limit(self, timeouts: dict[str, float | None]) -> float:
        """How long a connect may take: the pool's bound and httpx's, the smaller."""
        connect = timeouts.get("connect")
        limit = self.settings.connect_timeout
        return connect if connect is not None and connect < limit else limit

    def response_started(self, slot: Slot, headers: list[tuple[bytes, bytes]]) -> None:
        """The slot's response head arrived: an event stream is long-lived from now on."""
        if is_event_stream(headers):
            with self.lock:
                actions = self.state.stream(slot, monotonic())
            if actions:
                self.execute(actions)

    def replace(self, slot: Slot) -> Slot:
        """Swap a leased connection found dead for a permit, keeping the request's turn."""
        slot.conn.abort()
        with self.lock:
            return self.state.replace(slot, monotonic())

    def cancel(self, waiter: Waiter, timed_out: bool = False) -> None:
        with self.lock:
            actions = self.state.cancel(waiter, monotonic(), timed_out)
        if actions:
            self.execute(actions)

    def give_up(self, waiter: Waiter, timeout: float) -> PoolTimeout:
        """The waiter timed out: leave the queue, and the error to raise, whose counts are
        read before it left (it was one of the waiters it reports)."""
        with self.lock:
            error = self.timed_out(timeout)
            actions = self.state.cancel(waiter, monotonic(), True)
        if actions:
            self.execute(actions)
        return error

    def connection_lost(self, slot: Slot) -> None:
        """The connection's socket is closed (by us or the peer). Called exactly once."""
        with self.lock:
            if slot.state == _state.CLOSING:
                actions = self.state.closed(slot, monotonic())
            elif slot.state == _state.IDLE:
                actions = self.state.discard(slot, monotonic(), _state.HEALTH)
            else:
                # In use or opening: the request that holds it meets the error and releases.
                return
        if actions:
            self.execute(actions)

    # ------------------------------------------------------------------ actions

    def execute(self, actions: list[Action]) -> None:
        """Carry out the state machine's actions. Never call with the lock held."""
        for action in actions:
            if isinstance(action, Close):
                slot = action.slot
                log.debug("closing connection #%d to %s: %s", slot.id, self.name, action.reason)
                # An HTTP/2 stream permit wants the reason (_h2pool.StreamPermit.close_for).
                close_for = getattr(slot.conn, "close_for", None)
                if close_for is not None:
                    close_for(action.reason)
                else:
                    slot.conn.close()
            else:
                waiter = action.waiter
                if not waiter.notify():
                    # Its event loop is gone: nobody will take the grant; give it back.
                    self.cancel(waiter)

    # ------------------------------------------------------------------ errors

    def saturated(self) -> PoolSaturated:
        st = self.state
        return PoolSaturated(
            self.name,
            in_use=st.in_use,
            waiting=st.waiting,
            max_connections=st.limits.max_connections,
            queue_limit=st.limits.queue_limit,
            retry_after=round(st.retry_after(), 3),
            opening=st.opening,
            closing=st.closing,
        )

    def timed_out(self, timeout: float) -> PoolTimeout:
        st = self.state
        return PoolTimeout(
            self.name,
            timeout,
            in_use=st.in_use + st.opening,
            waiting=st.waiting,
            streams=st.streams,
        )
