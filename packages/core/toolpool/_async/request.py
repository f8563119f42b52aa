"""The asyncio driver's request path: acquire a slot, open its connection if needed,
exchange, retry once on a stale reuse; warm-up and preconnect.

It executes what `_state` decides and never decides itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING, Any

import httpx

from toolpool import _auth_context
from toolpool._async.connection import (
    AsyncConnection,
    AsyncResponseStream,
    Notifier,
    Stale,
    connect,
    time_out,
)
from toolpool._runtime import DestinationPool, counted_calls, pool_key
from toolpool._state import Slot, Waiter, retry_stale
from toolpool._wire import NO_TIMEOUTS, RequestBytes, make_response
from toolpool.errors import PoolClosed

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["acquire", "handle_request", "open_slot", "preconnect", "send", "warm"]

monotonic = time.monotonic
_current_auth = _auth_context._current


async def acquire(
    dest: DestinationPool,
    key: tuple[str | None, Any],
    loop: asyncio.AbstractEventLoop,
    timeout: float,
) -> Slot:
    """A slot for `key`: an idle connection, a permit to open one, or after waiting. A
    request of a call already counted (`counted_calls`) is never refused for a full queue."""
    state = dest.state
    counted = id(dest) in counted_calls.get()
    with dest.lock:
        got = state.acquire(key, monotonic(), None, counted)
        if type(got) is Waiter:
            fut: asyncio.Future[None] = loop.create_future()
            got.notify = Notifier(loop, fut)
            actions = state.take_actions()
    if type(got) is Slot:
        return got
    if got is None:
        raise dest.saturated()
    assert isinstance(got, Waiter)
    waiter = got
    if actions:
        dest.execute(actions)
    handle = (
        loop.call_later(timeout, time_out, fut, _WaitTimedOut()) if timeout != math.inf else None
    )
    try:
        await fut
    except _WaitTimedOut:
        err = dest.give_up(waiter, timeout)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, err)
        raise err from None
    except BaseException as exc:
        dest.cancel(waiter)
        if dest.probe is not None:
            dest.probe.waited(dest, waiter, exc)
        raise
    finally:
        if handle is not None:
            handle.cancel()
    if dest.probe is not None:
        dest.probe.waited(dest, waiter, None)
    slot = waiter.grant
    if slot is None:  # woken by pool shutdown
        raise PoolClosed()
    return slot


class _WaitTimedOut(Exception):
    pass


async def open_slot(
    dest: DestinationPool,
    slot: Slot,
    loop: asyncio.AbstractEventLoop,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> AsyncConnection:
    """Open the permit's connection for the request holding it."""
    started = monotonic()
    try:
        conn = await connect(dest, slot, loop, ctx, timeout)
    except BaseException as exc:
        dest.connect_failed(started, exc)
        raise
    dest.connect_done(slot, conn, started)
    return conn


async def warm(dest: DestinationPool, slot: Slot, ctx: _auth_context.AuthContext | None) -> bool:
    """Open one warm-up connection into the idle pool; True if it opened."""
    loop = asyncio.get_running_loop()
    started = monotonic()
    try:
        conn = await connect(dest, slot, loop, ctx, dest.settings.connect_timeout)
    except httpx.TransportError:
        return False
    dest.warmed(slot, conn, monotonic() - started)
    return True


async def handle_request(pool: Pool, request: httpx.Request) -> httpx.Response:
    """Send one request through the pool (the body of AsyncTransport.handle_async_request).

    The destination's `async_send` is `send` below, possibly wrapped by its auth provider
    and resilience policy (each wraps the one inside it once, when the pool is built).
    """
    dest = pool._route(request.url)
    return await dest.async_send(request, _current_auth.get())


async def send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on a pooled connection of `ctx`'s key: acquire, open if needed,
    exchange, and retry once on a new connection if a reused one turns out closed."""
    loop = asyncio.get_running_loop()
    key = pool_key(ctx, loop)
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    req = RequestBytes(request)
    asked = monotonic()
    probe = dest.probe
    if probe is not None:
        probe.attempt(dest, asked)
    slot = await acquire(dest, key, loop, _wait_limit(dest, timeouts))
    waited = monotonic() - asked
    retried = False
    while True:
        # Every reuse is checked for staleness (the rule lives in _state.replace).
        slot = dest.checked_lease(slot)
        conn: AsyncConnection | None = slot.conn
        fresh = conn is None
        if conn is None:
            conn = await open_slot(dest, slot, loop, ctx, _connect_limit(dest, timeouts))
        sent = monotonic() if probe is not None else 0.0
        try:
            head = await conn.exchange(req, timeouts)
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
    stream = AsyncResponseStream(dest, slot, conn, timeouts.get("read"))
    return make_response(head, stream, dest.name, slot.id, not fresh, waited)


async def preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> None:
    """Make sure an idle connection of `ctx`'s key exists (open one if the cap allows),
    without sending anything. Auth providers call it while fetching a token, so that a
    cold call pays for connection setup and token fetch at the same time, not in turn."""
    loop = asyncio.get_running_loop()
    got = dest.lease_if_room(pool_key(ctx, loop))
    if got is None:
        return  # at the cap: the request will queue like any other
    if got.conn is None:
        try:
            await open_slot(dest, got, loop, ctx, timeout or dest.settings.connect_timeout)
        except httpx.TransportError:
            return  # the request itself will meet (and report) the failure
    dest.release(got, True)


def _wait_limit(dest: DestinationPool, timeouts: dict[str, float | None]) -> float:
    """How long a request may wait for a slot: the pool's bound and httpx's, the smaller."""
    pool_timeout = timeouts.get("pool")
    limit = dest.settings.acquire_timeout
    return pool_timeout if pool_timeout is not None and pool_timeout < limit else limit


def _connect_limit(dest: DestinationPool, timeouts: dict[str, float | None]) -> float:
    connect = timeouts.get("connect")
    limit = dest.settings.connect_timeout
    return connect if connect is not None and connect < limit else limit
