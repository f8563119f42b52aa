"""The send chain of one destination: the layers around the drivers' pooled send, built in
one documented order.

A request of a destination goes through its layers from the outermost in, then to the
pooled send of the driver (asyncio or threads). The order, innermost first:

    pooled send        the driver: acquire a connection of the request's (destination,
                       auth context) key, exchange, release           (`_async` / `_sync`)
    1. auth            the context's credential in a header, one refresh-and-retry on 401,
                       or the mTLS check that a context is present         (`toolpool.auth`)
    2. policy          admission bookkeeping, retries with a budget, breaker, rate limits,
                       adaptive limit: sees requests that already carry credentials
                                                                           (`toolpool.resilience`)
    3. overflow        hierarchical pools: a request with no free local connection goes to
                       the pool service instead of the local queue        (`_overflow`)
    4. tenant_metrics  per-tenant counts and times of whole calls, retries included
                                                                           (`toolpool.metrics`)
    5. tracing         the OpenTelemetry client span around all of the above (`toolpool.otel`)

Each layer implements `SendLayer`: a `role` (its place above) and `wrap_async(inner)` /
`wrap_sync(inner)`, which return the layer's send around `inner`. `SendChain` keeps the
layers sorted by role and rebuilds both sends whenever one is added or removed (a layer
added after the pool was built, e.g. `toolpool.otel.instrument`, goes to its place, not
outside whatever happens to be there). Requests already under way finish on the chain they
started on. A layer never writes a destination's send itself.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Final, Protocol

import httpx

from toolpool._auth_context import AuthContext
from toolpool.errors import ConfigError

__all__ = ["ROLES", "AsyncSend", "MethodLayer", "SendChain", "SendLayer", "SyncSend"]

#: How a request is sent asynchronously: `await send(request, auth_context)`.
AsyncSend = Callable[[httpx.Request, AuthContext | None], Awaitable[httpx.Response]]
#: How a request is sent from a thread: `send(request, auth_context)`.
SyncSend = Callable[[httpx.Request, AuthContext | None], httpx.Response]

#: The layer roles, innermost first (see the module docstring for what each does).
ROLES: Final = ("auth", "policy", "overflow", "tenant_metrics", "tracing")
# Roles a destination has at most one layer of (one credential, one policy, one tier above).
_SINGLE: Final = {
    "auth": "an auth provider",
    "policy": "a resilience policy",
    "overflow": "an overflow tier",
}
_RANK: Final = {role: rank for rank, role in enumerate(ROLES)}


class SendLayer(Protocol):
    """One layer of a destination's send chain."""

    #: Where the layer goes in the chain: one of `ROLES`.
    @property
    def role(self) -> str: ...

    def wrap_async(self, inner: AsyncSend) -> AsyncSend:
        """The layer's async send, calling `inner` for what it passes on."""
        ...

    def wrap_sync(self, inner: SyncSend) -> SyncSend:
        """The layer's sync send, calling `inner` for what it passes on."""
        ...


class MethodLayer:
    """A layer whose sends are its methods `async_send` / `sync_send`, calling the layer
    inside it through `self._inner_a` / `self._inner_s` (set by `wrap_async` / `wrap_sync`;
    the drivers' pooled sends until the layer joins a chain)."""

    role: str
    _inner_a: AsyncSend
    _inner_s: SyncSend

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        raise NotImplementedError

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        raise NotImplementedError

    def wrap_async(self, inner: AsyncSend) -> AsyncSend:
        """`async_send`, around `inner`."""
        self._inner_a = inner
        return self.async_send

    def wrap_sync(self, inner: SyncSend) -> SyncSend:
        """`sync_send`, around `inner`."""
        self._inner_s = inner
        return self.sync_send


class SendChain:
    """A destination's layers, in `ROLES` order, and the two sends built from them.

    `async_send` / `sync_send` are plain attributes (read once per request, the hot path);
    only `add` and `remove` change them.
    """

    __slots__ = ("_lock", "async_send", "base_async", "base_sync", "layers", "sync_send")

    def __init__(self, base_async: AsyncSend, base_sync: SyncSend) -> None:
        #: The drivers' pooled sends, under every layer (token requests use them directly).
        self.base_async = base_async
        self.base_sync = base_sync
        #: The layers, innermost first.
        self.layers: tuple[SendLayer, ...] = ()
        self.async_send: AsyncSend = base_async
        self.sync_send: SyncSend = base_sync
        self._lock = threading.Lock()

    def find(self, role: str) -> SendLayer | None:
        """The (innermost) layer of `role`, or None."""
        for layer in self.layers:
            if layer.role == role:
                return layer
        return None

    def add(self, layer: SendLayer, destination: str) -> None:
        """Put `layer` in its place and rebuild the sends (a layer already in it stays)."""
        role = layer.role
        if role not in _RANK:
            raise ConfigError(
                f"a send layer's role must be one of {', '.join(ROLES)}, got {role!r}"
            )
        with self._lock:
            layers = self.layers
            if any(other is layer for other in layers):
                return
            if role in _SINGLE and any(other.role == role for other in layers):
                raise ConfigError(
                    f"destination {destination!r} already has {_SINGLE[role]}; "
                    f"remove_layer() the one it has first"
                )
            rank = _RANK[role]
            # After the layers of the same or an inner role: a later layer of a role goes
            # outside the earlier ones.
            at = sum(1 for other in layers if _RANK[other.role] <= rank)
            self._build((*layers[:at], layer, *layers[at:]))

    def remove(self, layer: SendLayer) -> None:
        """Take `layer` out of the chain and rebuild the sends (no-op if it is not in it)."""
        with self._lock:
            if any(other is layer for other in self.layers):
                self._build(tuple(other for other in self.layers if other is not layer))

    def _build(self, layers: tuple[SendLayer, ...]) -> None:
        async_send = self.base_async
        sync_send = self.base_sync
        for layer in layers:
            async_send = layer.wrap_async(async_send)
            sync_send = layer.wrap_sync(sync_send)
        self.layers = layers
        self.async_send = async_send
        self.sync_send = sync_send
