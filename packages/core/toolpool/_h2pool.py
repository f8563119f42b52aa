"""HTTP/2 destinations: the cap counted in streams, one multiplexed connection per tenant.

On a destination that speaks HTTP/2 a *slot* of the state machine (`_state`) is a permit
for one request in flight (a stream), not a connection: `max_connections`, the wait queue,
FIFO fairness across tenants and admission all stay in the state machine, in the unit
servers count (nginx counts each stream against its limits). A permit holds a
:class:`StreamPermit` where an HTTP/1.1 slot holds a socket. The connections themselves live
here, in :class:`H2Connections`, one set per (auth context, driver):

- **Affinity unchanged**: a connection is opened for one key and only ever carries that
  key's streams.
- **One connection per active context**; a second only when every connection of the key is
  at the server's ``SETTINGS_MAX_CONCURRENT_STREAMS`` (or going away). Opening is
  single-flight per key: requests of a key that arrive together share one connect. The
  request that opens it sends its stream right after the connection preface, without
  waiting a round trip for the server's SETTINGS (RFC 9113 3.4); the key's other requests
  wait for the SETTINGS as for the connect (`opened_early`), so nothing but that one stream
  goes out before the server's stream limit is known.
- **No tenant churn**: a new tenant's first request opens its own connection; nobody else's
  closes while the request cap has room (the state machine frees permits of other tenants
  only at the cap, and a freed permit costs no connection).
- **Health**: a connection idle more than ``BORROW_CHECK_AFTER`` is checked with a PING
  before it carries a stream; no answer within ``PING_TIMEOUT``: it is closed and another
  opened. When the state machine closes a key's last permit (idle TTL, affinity, limit,
  shutdown) the key's connections drain; a connection found without a stream for
  ``idle_ttl`` when its key next borrows is closed; one older than ``max_lifetime`` (minus
  jitter) drains: no new streams, closed once its streams finish.
- **Retry**: a request the server did not process (REFUSED_STREAM, or above a GOAWAY's last
  stream id) is sent once more on another connection when its body can be replayed.
- **Protocol discovery**: the first connect offers ``h2`` and ``http/1.1`` by ALPN. A server
  that picks ``http/1.1`` turns the destination into an HTTP/1.1 destination for good: that
  connection is closed and the request (and every later one) takes the HTTP/1.1 path.

This module holds the rules and the bookkeeping, no I/O: which connection takes a stream,
when to open one (single-flight), ping, drain or close it, when a permit returns, what may be
retried. The request path that carries them out is written once, for asyncio, in
`toolpool._async.h2` (send, open, warm-up, preconnect, the permit's response body);
`toolpool._sync.h2` is generated from it (`tools/unasync.py`). The connections themselves
(`toolpool._h2io`) and how one is opened (`open_h2` in the drivers' `connection` modules)
are written by hand for each driver.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx

from toolpool import _auth_context, _state
from toolpool._destination import DestinationPool
from toolpool._h2 import StreamNotProcessed
from toolpool._h2io import NoNewStream, StreamTrace
from toolpool._state import H2_CLOSE_REASONS, Slot
from toolpool._tls import client_ssl_context

__all__ = [
    "BORROW_CHECK_AFTER",
    "PING_TIMEOUT",
    "Connecting",
    "H2Connections",
    "KeyConnections",
    "StreamPermit",
    "UseHttp11",
    "as_permit",
    "attach",
    "give_back",
    "lifetime_over",
    "opened_early",
    "ping_first",
    "replayable",
    "response",
    "retry_elsewhere",
    "settled",
    "warm_permit",
]

log = logging.getLogger("toolpool.pool")
monotonic = time.monotonic

#: A connection idle longer than this is PINGed before it carries a stream. Not HTTP/1.1's
#: 1 s: there the check is a local peek, here it is a round trip in front of the request, and
#: a peer that closed (FIN, RST, GOAWAY) is seen locally anyway; only silent deaths need the
#: PING, and the maintenance tick PINGs connections idle for health_check_interval (10 s by
#: default) too. At 1 s, ~20 % of the demo storm's calls waited for a PING round trip
#: (benchmarks/RESULTS.md, "What bounds the storm's p99 on HTTP/2").
BORROW_CHECK_AFTER = 10.0
#: How long a PING may take (on borrow, in the maintenance tick, or fencing a cancelled
#: stream's permit) before the connection counts as dead and is closed.
PING_TIMEOUT = 2.0

#: Why the state machine closed a permit when the capacity moved to another tenant (or the
#: cap shrank): the tenant's connection stays open, streamless, for when it comes back.
_CAPACITY_MOVED = frozenset({_state.AFFINITY, _state.LIMIT})

Key = tuple[str | None, Any]
#: What a new HTTP/2 connection offers by ALPN; the server picks.
_ALPN = ("h2", "http/1.1")


class UseHttp11(Exception):
    """The server picked http/1.1 by ALPN: this destination is an HTTP/1.1 destination."""


class StreamPermit:
    """What a slot of an HTTP/2 destination holds instead of a socket: the right to one
    stream on its key's connection. Closing it costs nothing on the wire."""

    __slots__ = ("_dest", "_slot", "key", "tcp_done")

    def __init__(self, dest: DestinationPool, slot: Slot) -> None:
        self._dest = dest
        self._slot = slot
        #: The key this permit counts under in `H2Connections` (the slot's, until the state
        #: machine binds an unbound warm-up permit to the key of its first request).
        self.key: Key = slot.key
        self.tcp_done = monotonic()

    @property
    def alive(self) -> bool:
        return self._dest.h2 is not None and self._dest.h2.protocol != "http/1.1"

    def probe(self) -> bool:
        # A permit is always fit; its connection is checked by PING when borrowed.
        return self.alive

    def close(self) -> None:
        self.close_for(None)

    def close_for(self, reason: str | None) -> None:
        """The state machine closes this permit for `reason` (see `H2Connections.permit_closed`
        for what that means for the key's connections)."""
        self._dest.connection_lost(self._slot)
        h2 = self._dest.h2
        if h2 is not None:
            h2.permit_closed(self.key, keep=reason in _CAPACITY_MOVED, reason=reason)

    def abort(self) -> None:
        self.close()


class KeyConnections:
    """The HTTP/2 connections of one (auth context, driver) key, and the rules choosing one.
    Every method takes the destination's HTTP/2 lock (`lock`) itself."""

    __slots__ = ("conns", "lock", "opening", "permits", "retire")

    def __init__(self, lock: threading.Lock, retire: Callable[[list[Any], str], None]) -> None:
        self.lock = lock
        #: Counts connections leaving the key for good (`H2Connections.retire`).
        self.retire = retire
        self.conns: list[Any] = []
        #: Stream permits (slots of the state machine) this key holds, in any state.
        self.permits = 0
        #: A connect of this key is under way: the driver's event its other requests wait
        #: on (an asyncio.Event, or a threading.Event), set when the connect ends.
        self.opening: Any = None

    def pick(self, exclude: object = None) -> Any:
        """The connection to carry the next stream: the oldest with room (streams pack onto
        as few connections as the server's stream limit allows), or None. Lock held."""
        found = None
        gone: list[Any] = []
        for conn in self.conns:  # one pass: closed ones leave, the first with room is taken
            if conn.is_closed:
                gone.append(conn)
            elif found is None and conn is not exclude and conn.is_available:
                found = conn
        if gone:
            self.conns = [c for c in self.conns if not c.is_closed]
            self.retire(gone, "error")
        return found

    def expire(self, idle_ttl: float) -> list[Any]:
        """Connections idle (no stream) for ``idle_ttl``: removed, for the caller to close.
        Lock held."""
        gone = [c for c in self.conns if not c.state.streams and c.idle_for() >= idle_ttl]
        if gone:
            self.conns = [c for c in self.conns if c not in gone]
            self.retire(gone, "idle_ttl")
        return gone

    def borrow(
        self, idle_ttl: float, exclude: object, event: Callable[[], Any]
    ) -> tuple[list[Any], Any, Any, bool]:
        """One step of finding a connection for a stream: (connections found idle for
        ``idle_ttl``, for the caller to close; the connection to check and use, or None;
        the connect to wait for; whether the caller opens it). With no connection and no
        connect under way the caller opens one, and the key's other requests wait on
        ``event()`` until it is done (single-flight)."""
        with self.lock:
            stale = self.expire(idle_ttl)
            conn = self.pick(exclude)
            opening = self.opening
            mine = conn is None and opening is None
            if mine:
                self.opening = opening = event()
        return stale, conn, opening, mine

    def opened(self, conn: Any | None) -> None:
        """The caller's connect ended, with `conn` (or failed: None); its waiters wake."""
        with self.lock:
            if conn is not None:
                self.conns.append(conn)
            opening, self.opening = self.opening, None
        if opening is not None:
            opening.set()


def lifetime_over(conn: Any) -> bool:
    """`conn` has lived its max lifetime: it drains (no new streams) instead of carrying one."""
    return bool(conn.expires_at is not None and monotonic() >= conn.expires_at)


def ping_first(conn: Any) -> bool:
    """`conn` has been idle long enough to be PINGed before it carries a stream."""
    return bool(conn.idle_for() > BORROW_CHECK_AFTER)


class H2Connections:
    """A destination's HTTP/2 side: the protocol it speaks and its connections by key."""

    def __init__(self, dest: DestinationPool) -> None:
        self.dest = dest
        #: None until the first connect: "h2" or "http/1.1" (what ALPN chose).
        self.protocol: str | None = None
        self.by_key: dict[Key, KeyConnections] = {}
        self.lock = threading.Lock()
        self.opened = 0
        #: Connections closed by reason, and the streams opened and reset on connections
        #: no longer counted below (`retire`).
        self.closed: dict[str, int] = dict.fromkeys(H2_CLOSE_REASONS, 0)
        self._retired_streams = 0
        self._retired_resets = 0
        self._count_lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def ssl_context(self, ctx: _auth_context.AuthContext | None) -> ssl.SSLContext:
        """The TLS context of a new HTTP/2 connection acting for `ctx`, offering ``h2`` and
        ``http/1.1`` by ALPN. With client certificates per context (mTLS, a connection-bound
        auth layer) it presents `ctx`'s certificate: the auth layer builds and caches one
        per (context, ALPN), and the connection serves that context's key only, so a
        connection that presented tenant A's certificate never carries tenant B."""
        auth = self.dest.auth
        if auth is not None and auth.connection_bound:
            return auth.ssl_context(ctx, _ALPN)
        if self._ssl is None:
            settings = self.dest.settings
            sslctx = client_ssl_context(settings.verify, settings.cert)
            sslctx.set_alpn_protocols(list(_ALPN))
            self._ssl = sslctx
        return self._ssl

    def use_http11(self) -> None:
        """The server picked http/1.1: from now on this is an HTTP/1.1 destination."""
        self.protocol = "http/1.1"
        with self.dest.lock:  # slots are connections now: need counts them as such
            actions = self.dest.state.use_stream_permits(False)
        if actions:
            self.dest.execute(actions)
        if self._ssl is not None:
            # A caller's own SSLContext (verify=ctx) is shared with the HTTP/1.1 path, which
            # must not be offered h2 again.
            self._ssl.set_alpn_protocols(["http/1.1"])

    def adopt(self, conn: Any) -> None:
        """`conn` is a new HTTP/2 connection of this destination, ready for streams: it
        drains after its max lifetime (minus up to 10 % jitter) and counts as opened."""
        conn.expires_at = monotonic() + self.dest.settings.max_lifetime * (
            1 - 0.1 * random.random()
        )
        self.opened += 1

    def key(self, key: Key) -> KeyConnections:
        with self.lock:
            kc = self.by_key.get(key)
            if kc is None:
                kc = self.by_key[key] = KeyConnections(self.lock, self.retire)
            return kc

    def retire(self, conns: list[Any], reason: str) -> None:
        """`conns` leave the pool's books (closed, or draining to close): counted as closed
        for the reason the pool gave when it decided (`conn.close_reason`), else `reason`;
        their stream counts move to the destination's totals."""
        with self._count_lock:
            for conn in conns:
                why = conn.close_reason or reason
                self.closed[why] = self.closed.get(why, 0) + 1
                self._retired_streams += conn.state.streams_opened
                self._retired_resets += conn.state.resets_sent

    def permit_opened(self, key: Key) -> None:
        kc = self.key(key)
        with self.lock:
            kc.permits += 1

    def bind(self, permit: StreamPermit, key: Key) -> None:
        """The state machine bound an unbound warm-up permit to `key` (the key of its first
        request): the permit counts under `key` from now on, and the connection warm-up
        opened for no identity goes with it. That connection has carried no stream and
        presented no client certificate (a destination whose identity is in the handshake
        warms no unbound connection), so from now on it carries `key`'s streams only: the
        same rule as an unbound HTTP/1.1 warm-up connection."""
        with self.lock:
            unbound = self.by_key.get(permit.key)
            bound = self.by_key.get(key)
            if bound is None:
                bound = self.by_key[key] = KeyConnections(self.lock, self.retire)
            bound.permits += 1
            if unbound is not None:
                unbound.permits -= 1
                bound.conns += unbound.conns
                unbound.conns = []
            permit.key = key

    def permit_closed(self, key: Key, keep: bool = False, reason: str | None = None) -> None:
        """The state machine closed one of `key`'s permits (idle TTL, affinity, limit,
        shutdown). With the last one gone the key's connections drain: the state machine's
        decisions about a tenant's idleness decide about its connections too. Except with
        `keep` (the capacity moved to another tenant at the cap, or the cap shrank): a
        connection without streams costs the server's stream limit nothing, so the tenant
        keeps it for its next request (no tenant churn); `tick` closes it once it has been
        idle for the idle TTL with no permit."""
        with self.lock:
            kc = self.by_key.get(key)
            if kc is None:
                return
            kc.permits -= 1
            if kc.permits > 0 or keep:
                return
            conns, kc.conns = kc.conns, []
        self.retire(conns, reason if reason in H2_CLOSE_REASONS else "error")
        for conn in conns:
            conn.drain_threadsafe()

    def tick(self, now: float) -> None:
        """The maintenance thread's periodic pass: connections of keys that hold no permit
        and idle for the idle TTL drain (they carry no stream, so they close at once); every
        other connection idle for the health-check interval is PINGed (without waiting here)
        and closed when the server does not answer within ``PING_TIMEOUT``, so a dead
        connection is found before a request borrows it."""
        settings = self.dest.settings
        gone: list[Any] = []
        due: list[Any] = []
        with self.lock:
            for kc in self.by_key.values():
                if kc.permits <= 0 and kc.conns:
                    gone += kc.expire(settings.idle_ttl)
                for conn in kc.conns:
                    if (
                        not conn.is_closed
                        and conn.is_available
                        and now - conn.pinged_at >= settings.health_check_interval
                        and conn.idle_for() >= settings.health_check_interval
                    ):
                        conn.pinged_at = now
                        due.append(conn)
        for conn in gone:
            conn.drain_threadsafe()
        for conn in due:
            conn.check_in_background(PING_TIMEOUT, partial(_dead, self.dest.name, conn))

    def stats(self) -> dict[str, Any]:
        """The destination's protocol, streams in use and streams per open connection."""
        with self.lock:
            booked = [c for kc in self.by_key.values() for c in kc.conns]
        conns = [c for c in booked if not c.is_closed]
        per_conn = [c.state.streams_in_use for c in conns]
        with self._count_lock:
            closed = dict(self.closed)
            streams = self._retired_streams + sum(c.state.streams_opened for c in booked)
            resets = self._retired_resets + sum(c.state.resets_sent for c in booked)
        return {
            "protocol": self.protocol or "unknown",
            "connections": len(conns),
            "streams_in_use": sum(per_conn),
            "streams_per_connection": per_conn,
            "connections_opened": self.opened,
            "connections_closed": closed,
            "streams_total": streams,
            "streams_reset": resets,
        }

    def close_all(self) -> None:
        """Pool shutdown: every connection drains (open streams finish, then it closes)."""
        with self.lock:
            conns = [c for kc in self.by_key.values() for c in kc.conns]
            self.by_key.clear()
        self.retire(conns, "shutdown")
        for conn in conns:
            conn.drain_threadsafe()


def _dead(name: str, conn: Any) -> None:
    log.debug("idle HTTP/2 connection to %s did not answer a PING: closed", name)
    conn.close_reason = conn.close_reason or "health"
    conn.close()


def as_permit(dest: DestinationPool, slot: Slot) -> Slot:
    """`slot` (granted by the state machine) as a stream permit: a slot still holding an
    HTTP/1.1 connection from before gives it up; a fresh one is 'opened' at once (no socket);
    an unbound warm-up permit the state machine just bound takes its connection along."""
    h2 = h2_side(dest)
    if slot.conn is not None and not isinstance(slot.conn, StreamPermit):
        slot = dest.replace(slot)
    permit = slot.conn
    if permit is None:
        h2.permit_opened(slot.key)
        # No connect time: a permit opens no connection (`Connecting` records real ones).
        dest.opened(slot, StreamPermit(dest, slot), None)
    elif permit.key != slot.key:
        h2.bind(permit, slot.key)
    return slot


def warm_permit(dest: DestinationPool, slot: Slot) -> None:
    """A warm-up permit (unbound, from the state machine's `warm`) whose connection is open:
    it idles, unbound, until the first request of its driver binds it (`H2Connections.bind`),
    or goes to a waiter that can bind it now."""
    assert dest.h2 is not None
    dest.h2.permit_opened(slot.key)
    dest.warmed(slot, StreamPermit(dest, slot))


def give_back(dest: DestinationPool, slot: Slot, conn: Any, complete: bool) -> None:
    """The request holding `slot` is done with its stream on `conn`: the permit returns at
    once when the stream completed, else once the server has read the RST_STREAM (a PING
    round trip: until then the server still counts the stream), or the connection closed
    because no answer came within ``PING_TIMEOUT``."""
    release = partial(dest.release, slot, True)
    if complete:
        release()
    else:
        conn.fence(release, PING_TIMEOUT)


def replayable(request: httpx.Request) -> bool:
    """A request the server did not process can be sent again: its body is in memory."""
    return isinstance(request.stream, httpx.ByteStream)


def retry_elsewhere(exc: StreamNotProcessed, request: httpx.Request) -> bool:
    """A stream the server did not process goes to another connection when nothing of it
    was sent (the connection took no new stream) or its body can be sent again."""
    return isinstance(exc, NoNewStream) or replayable(request)


def response(
    dest: DestinationPool,
    slot: Slot,
    inner: httpx.Response,
    stream: Any,
    waited: float,
    reused: bool,
) -> httpx.Response:
    """The response handed to the caller: the connection's, with the permit's body.
    `reused`: the connection was there when the request looked for one (False when the
    request opened it or waited for another request to open it)."""
    return httpx.Response(
        inner.status_code,
        headers=inner.headers.raw,
        stream=stream,
        extensions={
            "http_version": b"HTTP/2",
            "toolpool": {
                "destination": dest.name,
                "connection_id": slot.id,
                "reused": reused,
                "wait_seconds": waited,
                "stream_id": inner.extensions.get("stream_id"),
                "streams": inner.extensions.get("streams"),
            },
        },
    )


def h2_side(dest: DestinationPool) -> H2Connections:
    """`dest.h2` as what `attach` made it (the destination offers HTTP/2)."""
    h2 = dest.h2
    assert isinstance(h2, H2Connections)
    return h2


class Connecting:
    """The timings of one HTTP/2 connect, told to the destination's probe (when traced) as a
    connect span: TCP (`tcp_done`), the TLS handshake with ALPN (`tls_done`), the server's
    SETTINGS (when they arrived); a connection that speaks h2 goes to the create-time
    histogram.

    A connection opened for a request is ready once its preface is written (`ready`): the
    request's stream goes out without waiting for the server's SETTINGS (RFC 9113 3.4), and
    the span is told when that first exchange ends (`report`), the SETTINGS arrival known by
    then (a server sends them before any response). Warm-up and preconnect wait for the
    SETTINGS (`done`)."""

    __slots__ = ("dest", "ready_at", "started", "tcp_done", "tls_done")

    def __init__(self, dest: DestinationPool) -> None:
        self.dest = dest
        self.started = monotonic()
        self.tcp_done: float | None = None
        self.tls_done: float | None = None
        self.ready_at: float | None = None

    def failed(self, error: BaseException) -> None:
        probe = self.dest.probe
        if probe is not None:
            probe.connected(
                self.dest, self.started, self.tcp_done, monotonic(), error, None, self.tls_done
            )

    def done(self, protocol: str) -> None:
        """Connected, speaking `protocol` (what ALPN chose: "h2" after the server's SETTINGS
        arrived, or "http/1.1")."""
        now = monotonic()
        if protocol == "h2":
            self.dest.record_connect(now - self.started)
        probe = self.dest.probe
        if probe is not None:
            settings_at = now if protocol == "h2" else None
            probe.connected(
                self.dest,
                self.started,
                self.tcp_done,
                now,
                None,
                protocol,
                self.tls_done,
                settings_at,
            )

    def ready(self) -> None:
        """Speaking h2, the preface written: the opening request's stream goes out now."""
        self.ready_at = monotonic()
        self.dest.record_connect(self.ready_at - self.started)

    def report(self, conn: Any) -> None:
        """The opening request's exchange on `conn` ended: the connect span, with the
        SETTINGS arrival if they came (`conn.settings_at`)."""
        probe = self.dest.probe
        if probe is not None and self.ready_at is not None:
            probe.connected(
                self.dest,
                self.started,
                self.tcp_done,
                self.ready_at,
                None,
                "h2",
                self.tls_done,
                conn.settings_at,
            )


def opened_early(kc: KeyConnections, conn: Any) -> None:
    """`conn` was opened for a request that sends its stream before the server's SETTINGS
    arrive: the key's other requests keep waiting for the connect until the SETTINGS arrive
    (then the server's stream limit governs) or the connection is gone, not one stream more
    goes out before. `settled` is the fallback when the opening request is done first."""
    conn.when_settled(partial(kc.opened, conn))


def settled(conn: Any, timing: Connecting) -> None:
    """The opening request's exchange on `conn` ended (or failed): its key's waiters go on
    now whatever came of the SETTINGS, and the connect is reported."""
    conn.settle()
    timing.report(conn)


def stream_trace(dest: DestinationPool) -> StreamTrace | None:
    """What a traced request's stream tells its probe (None when not traced: no cost)."""
    return StreamTrace() if dest.probe is not None else None


def trace_reset(trace: StreamTrace | None) -> bool:
    return trace is not None and trace.reset


def trace_sent(trace: StreamTrace | None) -> float | None:
    return None if trace is None else trace.sent_at


def attach(dest: DestinationPool) -> None:
    """Give an HTTP/2-enabled destination its HTTP/2 side (the pool builds the destination
    with `toolpool._async.h2.send` / `toolpool._sync.h2.send` as its drivers)."""
    dest.h2 = H2Connections(dest)
