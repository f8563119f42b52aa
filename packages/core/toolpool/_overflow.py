"""Hierarchical pools, the local side: each listed destination keeps a small tier of its own
connections and sends the requests that find none free to the pool service (`toolpool serve`,
reached through a `toolpool.RemotePool`), instead of queuing them.

`OverflowLayer` is the "overflow" layer of the destination's send chain (see `_chain`);
`local_destinations` caps the local tier. The service client itself (`_remote`) sits above
the pool and is seen here only as an `OverflowTier`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import httpx

from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, MethodLayer, SyncSend
from toolpool._config import Destination
from toolpool._destination import pool_key
from toolpool._h2 import StreamNotProcessed
from toolpool._h2pool import retry_elsewhere
from toolpool._saturation import Saturation
from toolpool._state import Action
from toolpool._sync.connection import SYNC_DRIVER
from toolpool._watched import WatchedStream
from toolpool.errors import ConfigError, PoolSaturated

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["OverflowLayer", "OverflowStats", "OverflowTier", "local_destinations"]

monotonic = time.monotonic


@runtime_checkable
class OverflowTier(Protocol):
    """Where a local destination's excess requests go (`toolpool.RemotePool` is one)."""

    async def asend(
        self, destination: str, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """Send `request` to the service's `destination` acting for `ctx`."""
        ...

    def send(
        self, destination: str, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """`asend` for threads."""
        ...

    def overflow_layer(self, dest: DestinationPool) -> OverflowLayer:
        """The overflow layer of the local destination `dest`."""
        ...


@dataclass(frozen=True)
class OverflowStats:
    """One local destination's split between its own connections and the pool service."""

    destination: str
    #: Requests sent on the local pool's connections.
    local_total: int
    #: Requests sent to the pool service because no local connection was free.
    overflow_total: int
    #: Overflowed requests the service refused as saturated (both tiers full).
    overflow_saturated_total: int
    #: Overflowed requests in flight now.
    overflow_in_flight: int
    #: Of `overflow_total`: requests the local tier's server did not process (HTTP/2:
    #: REFUSED_STREAM or above a GOAWAY's last stream id, on two connections), sent to the
    #: service instead of failing.
    overflow_unprocessed_total: int = 0


class OverflowLayer(MethodLayer):
    """The "overflow" layer of one local destination's send chain (outside auth and policy,
    see `toolpool._chain`): a request goes to a free local connection of its (destination,
    context), else to the pool service; it never waits in the local queue for one."""

    role = "overflow"

    def __init__(self, remote: OverflowTier, dest: DestinationPool, remote_name: str) -> None:
        self.remote = remote
        self.dest = dest
        self.remote_name = remote_name
        self._inner_a: AsyncSend = dest.base_async_send
        self._inner_s: SyncSend = dest.base_sync_send
        self._lock = threading.Lock()
        self.local_total = 0
        self.overflow_total = 0
        self.saturated_total = 0
        self.unprocessed_total = 0
        self.in_flight = 0
        # Requests on the local tier from the admission decision until their body is done.
        self.local_busy = 0
        # Until when the service refused this destination as saturated (both tiers full).
        self._remote_full_until = 0.0

    def _claim_local(self, ctx: AuthContext | None, driver: Any) -> bool:
        """Take a place on the local tier if a request of ctx would get a connection now
        without queuing: an idle one of its key, an unbound idle one of its driver, or room
        under the cap with nobody waiting. Local requests in flight (from here until their
        body is done) never exceed the cap, even while one waits for a token fetch.

        On HTTP/2 an idle slot of another key is room too: it is a stream permit, and giving
        it up costs nothing (its tenant's connection stays open, `toolpool._h2pool`), so it
        is closed here and the request takes its place. On HTTP/1.1 it is that tenant's
        connection, which the local tier does not close for another tenant's request."""
        key = pool_key(ctx, driver)
        dest = self.dest
        state = dest.state
        freed: list[Action] = []
        with dest.lock:
            if self.local_busy >= state.cap:
                return False
            idle = state._idle
            room = bool(idle.get(key) or idle.get((None, driver))) or (
                state.total < state.cap and not state.waiting
            )
            if not room and not state.waiting and state.idle and _counts_streams(dest):
                freed = state.free_idle(monotonic())
                room = True
            if room:
                self.local_busy += 1
        if freed:
            dest.execute(freed)
        return room

    def _release_local(self, _: bool = False) -> None:
        with self.dest.lock:
            self.local_busy -= 1

    def _count(self, local: bool) -> None:
        with self._lock:
            if local:
                self.local_total += 1
            else:
                self.overflow_total += 1
                self.in_flight += 1

    def _done(self, saturated: bool = False) -> None:
        with self._lock:
            self.in_flight -= 1

    def _refused(self, exc: BaseException) -> None:
        with self._lock:
            self.in_flight -= 1
            if isinstance(exc, PoolSaturated):
                self.saturated_total += 1
                until = monotonic() + max(0.05, exc.retry_after)
                self._remote_full_until = max(self._remote_full_until, until)

    def adjust_saturation(self, local: Saturation) -> Saturation:
        """The local tier's `Saturation` (read by `pool.saturation` and the adapters), made
        "saturated" (reason "overflow_saturated") while the local tier is full and the
        service recently refused overflow as saturated: readings cover both tiers."""
        remaining = self._remote_full_until - monotonic()
        if remaining <= 0 or local.state == "ok":
            return local
        return replace(
            local,
            state="saturated",
            reason="overflow_saturated",
            retry_after=max(local.retry_after, round(remaining, 3)),
        )

    # The rules of a call, once for both sends: which tier takes it (`_claim_local`), what a
    # local failure means (`_local_failed`), how each tier's response is watched.

    def _local_failed(self, exc: BaseException, request: httpx.Request) -> bool:
        """A request on the local tier raised `exc`: free its place; True if the service
        takes the request instead:

        - the local tier refused it (its queue is full);
        - the server did not process it (HTTP/2: REFUSED_STREAM, or above a GOAWAY's last
          stream id, `StreamNotProcessed`) on the connection the local tier sent it on, nor
          on the second one it sent it to, and its body can still be sent: it is in memory,
          or none of it was ever read (neither connection took a stream for it). Nothing of
          it was processed downstream, so the service sending it is no duplicate; the caller
          gets the service's answer instead of an error the service can absorb. A one-shot
          body the server refused after reading it is not sent again by anyone (the local
          tier does not retry it either): the caller gets `StreamNotProcessed`.
        """
        self._release_local()
        if isinstance(exc, PoolSaturated):
            return exc.destination == self.dest.name and exc.reason == "queue_full"
        if isinstance(exc, StreamNotProcessed) and retry_elsewhere(exc, request):
            with self._lock:
                self.unprocessed_total += 1
            return True
        return False

    # Neither answer method raises, so the sends call them inside their `try`.

    def _local_answer(self, response: httpx.Response) -> httpx.Response:
        self._count(local=True)
        response.stream = WatchedStream(response.stream, self._release_local, self.dest.pool)
        return response

    def _remote_answer(self, response: httpx.Response) -> httpx.Response:
        response.stream = WatchedStream(response.stream, self._done, self.dest.pool)
        return response

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        if self._claim_local(ctx, asyncio.get_running_loop()):
            try:
                return self._local_answer(await self._inner_a(request, ctx))
            except BaseException as exc:
                if not self._local_failed(exc, request):
                    raise
        self._count(local=False)
        try:
            return self._remote_answer(await self.remote.asend(self.remote_name, request, ctx))
        except BaseException as exc:
            self._refused(exc)
            raise

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        if self._claim_local(ctx, SYNC_DRIVER):
            try:
                return self._local_answer(self._inner_s(request, ctx))
            except BaseException as exc:
                if not self._local_failed(exc, request):
                    raise
        self._count(local=False)
        try:
            return self._remote_answer(self.remote.send(self.remote_name, request, ctx))
        except BaseException as exc:
            self._refused(exc)
            raise

    def stats(self) -> OverflowStats:
        with self._lock:
            return OverflowStats(
                destination=self.dest.name,
                local_total=self.local_total,
                overflow_total=self.overflow_total,
                overflow_saturated_total=self.saturated_total,
                overflow_in_flight=self.in_flight,
                overflow_unprocessed_total=self.unprocessed_total,
            )


def _counts_streams(dest: DestinationPool) -> bool:
    """Whether `dest`'s slots are HTTP/2 stream permits (it offers h2 and the server has not
    picked http/1.1)."""
    h2 = dest.h2
    return h2 is not None and h2.protocol != "http/1.1"


def local_destinations(
    destinations: Iterable[Destination],
    overflow: object,
    local_max_connections: int | None,
    default_cap: int,
) -> list[Destination]:
    """The destinations of a hierarchical pool's local tier: each capped at
    `local_max_connections` (3 unless given), the rest of its traffic going to `overflow`."""
    if not isinstance(overflow, OverflowTier):
        raise ConfigError(
            "overflow must be a toolpool.RemotePool (the shared pool service); "
            "local_max_connections only applies with one"
            if overflow is None
            else f"overflow must be a toolpool.RemotePool, not {type(overflow).__name__}"
        )
    local = 3 if local_max_connections is None else local_max_connections
    if isinstance(local, bool) or not isinstance(local, int) or local < 1:
        raise ConfigError(f"local_max_connections must be a whole number >= 1, got {local!r}")
    if isinstance(destinations, Destination):
        destinations = [destinations]
    out = []
    for dest in destinations:
        if not isinstance(dest, Destination):
            raise ConfigError(
                f"destinations must be toolpool.Destination objects, got {type(dest).__name__}"
            )
        cap = min(dest.connection_cap(default_cap), local)
        out.append(replace(dest, max_connections=cap, documented_limit=None))
    return out
