"""The thread driver's request path: acquire a slot, open its connection if needed, exchange,
retry once on a stale reuse; warm-up and preconnect.

Safe to use from many threads at once: threads meet only in the destination's state machine
(behind its lock). It executes what `_state` decides and never decides itself.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import httpx

from toolpool import _auth_context
from toolpool._async.request import _connect_limit, _wait_limit
from toolpool._runtime import DestinationPool, counted_calls, pool_key
from toolpool._state import Slot, Waiter, retry_stale
from toolpool._sync.connection import (
    SYNC_DRIVER,
    Notifier,
    Stale,
    SyncConnection,
    SyncResponseStream,
    connect,
)
from toolpool._wire import NO_TIMEOUTS, RequestBytes, make_response
from toolpool.errors import PoolClosed

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["acquire", "handle_request", "open_slot", "preconnect", "send", "warm"]

monotonic = time.monotonic
_current_auth = _auth_context._current


def acquire(dest: DestinationPool, key: tuple[str | None, Any], timeout: float) -> Slot:
    """A slot for `key`: an idle connection, a permit to open one, or after waiting. A
    request of a call already counted (`counted_calls`) is never refused for a full queue."""
    state = dest.state
    counted = id(dest) in counted_calls.get()
    with dest.lock:
        got = state.acquire(key, monotonic(), None, counted)
        if type(got) is Waiter:
            notifier = Notifier()
            got.notify = notifier
            actions = state.take_actions()
    if type(got) is Slot:
        return got
    if got is None:
        raise dest.saturated()
    assert isinstance(got, Waiter)
    waiter = got
    if actions:
        dest.execute(actions)
    try:
        granted = notifier.wait(timeout)
    except BaseException as exc:
        dest.cancel(waiter)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, exc)
        raise
    if not granted:
        err = dest.give_up(waiter, timeout)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, err)
        raise err
    if dest.probe is not None:
        dest.probe.waited(dest, waiter, None)
    slot = waiter.grant
    if slot is None:  # woken by pool shutdown
        raise PoolClosed()
    return slot


def open_slot(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> SyncConnection:
    """Open the permit's connection for the request holding it."""
    started = monotonic()
    try:
        conn = connect(dest, slot, ctx, timeout)
    except BaseException as exc:
        dest.connect_failed(started, exc)
        raise
    dest.connect_done(slot, conn, started)
    return conn


def warm(dest: DestinationPool, slot: Slot, ctx: _auth_context.AuthContext | None) -> bool:
    """Open one warm-up connection into the idle pool; True if it opened."""
    started = monotonic()
    try:
        conn = connect(dest, slot, ctx, dest.settings.connect_timeout)
    except httpx.TransportError:
        return False
    dest.warmed(slot, conn, monotonic() - started)
    return True


def handle_request(pool: Pool, request: httpx.Request) -> httpx.Response:
    """Send one request through the pool (the body of Transport.handle_request); see
    `_async.request.handle_request` for the layering of `sync_send`."""
    dest = pool._route(request.url)
    return dest.sync_send(request, _current_auth.get())


def send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on a pooled connection of `ctx`'s key (see `_async.request.send`)."""
    key = pool_key(ctx, SYNC_DRIVER)
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    req = RequestBytes(request)
    asked = monotonic()
    probe = dest.probe
    if probe is not None:
        probe.attempt(dest, asked)
    slot = acquire(dest, key, _wait_limit(dest, timeouts))
    waited = monotonic() - asked
    retried = False
    while True:
        # Every reuse is checked for staleness (the rule lives in _state.replace).
        slot = dest.checked_lease(slot)
        conn: SyncConnection | None = slot.conn
        fresh = conn is None
        if conn is None:
            conn = open_slot(dest, slot, ctx, _connect_limit(dest, timeouts))
        sent = monotonic() if probe is not None else 0.0
        try:
            head = conn.exchange(req, timeouts)
        except Stale as exc:
            if probe is not None:
                probe.exchanged(dest, sent, None, exc)
            if retry_stale(not fresh, retried, req.replayable):
                # A reused connection the peer had closed: retry once on a new one.
                retried = True
                slot = dest.replace(slot)
                continue
            conn.active = False
            dest.release(slot, False)
            raise
        except BaseException as exc:
            if probe is not None:
                probe.exchanged(dest, sent, None, exc)
            conn.active = False
            dest.release(slot, False)
            raise
        break
    if probe is not None:
        probe.exchanged(dest, sent, head.status, None)
    dest.response_started(slot, head.headers)
    stream = SyncResponseStream(dest, slot, conn)
    return make_response(head, stream, dest.name, slot.id, not fresh, waited)


def preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> None:
    """Make sure an idle connection of `ctx`'s key exists (see `_async.request.preconnect`)."""
    got = dest.lease_if_room(pool_key(ctx, SYNC_DRIVER))
    if got is None:
        return
    if got.conn is None:
        try:
            open_slot(dest, got, ctx, timeout or dest.settings.connect_timeout)
        except httpx.TransportError:
            return
    dest.release(got, True)
