"""The request path of a driver: acquire a slot, open its connection if needed, exchange,
retry once on a stale reuse, read the response body and release; warm-up and preconnect.

Written once, for asyncio; `_sync/request.py` is generated from this file by
`tools/unasync.py` (`make unasync`; `make lint` fails when it is not current), so edit this
file only. Whatever differs between the drivers lives in their hand-written `connection`
modules; whatever is decided lives in `_state` (through `DestinationPool`): this path
carries the decisions out and decides nothing itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from toolpool import _auth_context
from toolpool._async.connection import (
    AsyncConnection,
    Notifier,
    Stale,
    connect,
    current_driver,
    settled,
)
from toolpool._destination import DestinationPool, counted_calls, pool_key
from toolpool._messages import NO_TIMEOUTS, RequestBytes, make_response
from toolpool._state import Slot, Waiter
from toolpool.errors import PoolClosed

__all__ = [
    "AsyncResponseStream",
    "acquire",
    "open_slot",
    "preconnect",
    "send",
    "warm",
]

monotonic = time.monotonic


class AsyncResponseStream(httpx.AsyncByteStream):
    """A response body read from its connection; releases the connection when done."""

    __slots__ = ("_conn", "_dest", "_done", "_slot")

    def __init__(self, dest: DestinationPool, slot: Slot, conn: AsyncConnection) -> None:
        self._dest = dest
        self._slot = slot
        self._conn = conn
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        conn = self._conn
        parser = conn.parser
        try:
            while True:
                chunk = parser.take_body()
                if parser.complete:
                    # Release before handing out the last bytes: the connection is free.
                    self._finish(parser.reusable and conn.error is None)
                    if chunk:
                        yield chunk
                    return
                if chunk:
                    conn.resume_reading()
                    yield chunk
                    continue
                await conn.read_more()
        except BaseException:
            self._finish(False)
            raise

    async def aclose(self) -> None:
        # A body already received in full (a 202 with none, an SSE stream whose end came with
        # its last event) leaves the connection reusable, as httpcore does.
        conn = self._conn
        parser = conn.parser
        reusable = parser.complete and parser.reusable and conn.error is None
        if reusable and not self._done:
            conn.resume_reading()
        self._finish(reusable)

    def _finish(self, reusable: bool) -> None:
        if not self._done:
            self._done = True
            self._conn.active = False
            self._dest.release(self._slot, reusable)

    def __del__(self) -> None:
        # A response that was never read to the end nor closed: close its connection
        # (from any thread, without taking locks that the collecting thread may hold).
        if not self._done:
            self._done = True
            self._dest.pool._orphaned(self._dest, self._slot)


async def acquire(dest: DestinationPool, key: tuple[str | None, Any], timeout: float) -> Slot:
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
        granted = await notifier.wait(timeout)
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


async def open_slot(
    dest: DestinationPool,
    slot: Slot,
    ctx: _auth_context.AuthContext | None,
    timeout: float | None,
) -> AsyncConnection:
    """Open the permit's connection for the request holding it."""
    started = monotonic()
    try:
        conn = await connect(dest, slot, ctx, timeout)
    except BaseException as exc:
        dest.connect_failed(started, exc)
        raise
    dest.connect_done(slot, conn, started)
    return conn


async def warm(dest: DestinationPool, slot: Slot, ctx: _auth_context.AuthContext | None) -> bool:
    """Open one warm-up connection into the idle pool; True if it opened."""
    started = monotonic()
    try:
        conn = await connect(dest, slot, ctx, dest.settings.connect_timeout)
    except httpx.TransportError:
        return False
    dest.warmed(slot, conn, monotonic() - started)
    return True


async def send(
    dest: DestinationPool, request: httpx.Request, ctx: _auth_context.AuthContext | None
) -> httpx.Response:
    """Send one request on a pooled connection of `ctx`'s key: acquire, open if needed,
    exchange, and retry once on a new connection if a reused one turns out closed."""
    key = pool_key(ctx, current_driver())
    timeouts = request.extensions.get("timeout", NO_TIMEOUTS)
    req = RequestBytes(request)
    asked = monotonic()
    probe = dest.probe
    if probe is not None:
        probe.attempt(dest, asked)
    slot = await acquire(dest, key, dest.wait_limit(timeouts))
    waited = monotonic() - asked
    retried = False
    while True:
        # A reuse is checked for staleness if the state machine says so (`must_check`);
        # a connection that fails the check is replaced, unless it was only TLS records
        # without data waiting to be read (`settled`).
        if dest.state.must_check(slot) and not slot.conn.probe():
            try:
                fit = await settled(slot.conn)
            except BaseException:
                # Cancelled while it was being checked: nothing was sent, the slot is ours
                # alone, and a connection in doubt goes.
                dest.release(slot, False)
                raise
            if not fit:
                slot = dest.replace(slot)
        conn: AsyncConnection | None = slot.conn
        fresh = conn is None
        if conn is None:
            conn = await open_slot(dest, slot, ctx, dest.connect_limit(timeouts))
        sent = monotonic() if probe is not None else 0.0
        try:
            head = await conn.exchange(req, timeouts)
        except Stale as exc:
            if probe is not None:
                probe.exchanged(dest, sent, None, exc)
            # Failed before any response byte: retry on a new connection, or fail, as the
            # state machine decides (`DestinationState.unanswered`).
            retry = dest.unanswered(slot, not fresh, retried, req.replayable)
            if retry is None:
                raise
            if probe is not None:
                probe.resent(dest, "connection_closed")
            retried = True
            slot = retry
            continue
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
    stream = AsyncResponseStream(dest, slot, conn)
    return make_response(head, stream, dest.name, slot.id, not fresh, waited)


async def preconnect(
    dest: DestinationPool, ctx: _auth_context.AuthContext | None, timeout: float | None = None
) -> bool:
    """Make sure an idle connection of `ctx`'s key exists (open one if the cap allows),
    without sending anything; True if one is there. Auth providers call it while fetching a
    token, so that a cold call pays for connection setup and token fetch at the same time,
    not in turn. (An HTTP/2 destination's: `toolpool._async.h2.preconnect`.)"""
    got = dest.lease_if_room(pool_key(ctx, current_driver()))
    if got is None:
        return False  # at the cap: the request will queue like any other
    if got.conn is None:
        try:
            await open_slot(dest, got, ctx, timeout or dest.settings.connect_timeout)
        except httpx.TransportError:
            return False  # the request itself will meet (and report) the failure
    dest.release(got, True)
    return True
