"""The pool service seen from an agent process: `RemotePool` (a connection to `toolpool serve`)
and `RemoteTransport` (an httpx transport that maps ordinary URLs onto it). A `RemotePool` is
also the overflow tier of a hierarchical pool (`toolpool.Pool(overflow=...)`): the layer that
sends a local pool's excess requests to it is `_overflow`'s, below the pool.

A request for `https://crm.internal/contacts?q=1`, where the service lists destination `crm`
at that origin, becomes `GET <service>/d/crm/contacts?q=1` with the agent's token and
`X-Toolpool-Tenant: <tenant of the current toolpool.auth_context>`. The service applies the
downstream credentials; the agent never holds them. Errors the service answers itself
(`X-Toolpool-Error`) come back as the same exceptions an in-process pool raises
(`PoolSaturated`, `PoolTimeout`, `DestinationUnavailable`, `AuthError`, ...), so tool code and
the agent adapters treat both tiers alike.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx

from toolpool._auth_context import AuthContext, _current
from toolpool._config import Destination, Origin, origin_of, origin_text
from toolpool._overflow import OverflowLayer, OverflowStats
from toolpool.errors import (
    AuthError,
    ConfigError,
    DestinationUnavailable,
    PoolSaturated,
    PoolTimeout,
    UnknownDestination,
)

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["RemotePool", "RemoteTransport"]

monotonic = time.monotonic

_SERVICE_DESTINATION = "toolpool-service"
# Headers that describe the agent's hop, not the request: never sent on to the service.
_HOP = frozenset(
    {
        b"host",
        b"authorization",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"upgrade",
    }
)
# Service error codes that come back as responses (HTTP-level answers about the request
# itself); every other X-Toolpool-Error becomes the exception an in-process pool raises.
_AS_RESPONSE = frozenset(
    {
        "bad_path",
        "bad_target",
        "bad_request",
        "method_not_allowed",
        "not_found",
        "request_too_large",
        "response_too_large",
    }
)
_AUTH_CODES = frozenset(
    {"unauthenticated", "forbidden_tenant", "missing_tenant", "bad_tenant", "downstream_auth"}
)


class RemotePool:
    """A `toolpool serve` instance (sidecar or central) used from an agent process.

    ```python
    remote = toolpool.RemotePool("http://toolpool.internal:8780", token=os.environ["AGENT_TOKEN"])
    async with httpx.AsyncClient(transport=toolpool.RemoteTransport(remote)) as client:
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            r = await client.get("https://crm.internal/contacts")   # via the service
    ```

    Or as the overflow tier of an in-process pool (the seed's hierarchical pools):
    `toolpool.Pool([...], local_max_connections=3, overflow=remote)`.

    The connections to the service are themselves pooled (`max_connections`, shared by all
    tenants: the service keys downstream connections by tenant, not this hop). `destinations`
    maps destination names to their ordinary URLs; without it the list is fetched from the
    service on first use. `names` renames local destinations to the service's names for the
    overflow (default: the same name). `http2` (default: the pool default) offers HTTP/2 on
    an `https://` service: served by an HTTP/2 ASGI server (hypercorn), every tenant's
    requests share one multiplexed connection (`max_connections` then counts streams); a
    service that speaks only HTTP/1.1 (`toolpool serve`, uvicorn) is detected by ALPN on the
    first connect and used as such. The token never appears in a repr or an error.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        max_connections: int = 100,
        verify: Any = True,
        connect_timeout: float = 10.0,
        acquire_timeout: float = 30.0,
        destinations: Mapping[str, str] | None = None,
        names: Mapping[str, str] | None = None,
        tenant_header: str = "X-Toolpool-Tenant",
        http2: bool | None = None,
    ) -> None:
        if not isinstance(token, str) or not token or any(c in token for c in "\r\n\0 "):
            raise ConfigError(
                "RemotePool token must be the agent's token for the service (a non-empty "
                "string without spaces or line breaks)"
            )
        try:
            base = httpx.URL(url)
        except Exception as exc:
            raise ConfigError(f"RemotePool url {url!r} is not a valid URL ({exc})") from None
        if base.scheme not in ("http", "https") or not base.host:
            raise ConfigError(f"RemotePool url {url!r} must be an http:// or https:// URL")
        if base.query or base.fragment or base.userinfo:
            raise ConfigError(
                f"RemotePool url {url!r}: give the service's base URL (no query, fragment or "
                f"credentials; the token goes in token=)"
            )
        from toolpool._pool import Pool

        origin = origin_text(origin_of(base))
        self.url = origin + base.raw_path.rstrip(b"/").decode("ascii")
        self._prefix = base.raw_path.rstrip(b"/")
        self._base = httpx.URL(origin)
        # No resilience layer on this hop: the service runs its own per destination, and
        # retrying at both tiers would multiply attempts. The hop carries every tenant on the
        # same connections (no auth context): the service keys downstream ones by tenant.
        hop = Destination(
            _SERVICE_DESTINATION, origin, max_connections=max_connections, warmup=0, http2=http2
        )
        self._pool = Pool(
            [hop],
            unknown_destinations="reject",
            verify=verify,
            connect_timeout=connect_timeout,
            acquire_timeout=acquire_timeout,
            policy=None,
        )
        self._dest: DestinationPool = self._pool.destination(_SERVICE_DESTINATION)
        self._auth = (b"authorization", b"Bearer " + token.encode("ascii"))
        self._tenant_header = tenant_header.encode("ascii")
        self._tenant_lower = self._tenant_header.lower()
        self._names = dict(names or {})
        self._lock = threading.Lock()
        self._routes: dict[Origin, str] | None = None
        if destinations is not None:
            self._routes = {origin_of(u): n for n, u in destinations.items()}
        self._overflows: dict[str, OverflowLayer] = {}

    def __repr__(self) -> str:
        return f"<toolpool.RemotePool {self.url} token=<redacted>>"

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> RemotePool:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __enter__(self) -> RemotePool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def aclose(self) -> None:
        """Close the connections to the service."""
        await self._pool.aclose()

    def close(self) -> None:
        """Close the connections to the service (from sync code)."""
        self._pool.close()

    @property
    def closed(self) -> bool:
        """True once closed."""
        return self._pool.closed

    # ------------------------------------------------------------------ clients

    def transport(self) -> RemoteTransport:
        """An httpx transport (sync and async) over this service."""
        return RemoteTransport(self)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` whose requests go through the service."""
        kwargs.setdefault("timeout", httpx.Timeout(60.0, pool=None))
        return httpx.AsyncClient(transport=RemoteTransport(self), **kwargs)

    def sync_client(self, **kwargs: Any) -> httpx.Client:
        """An `httpx.Client` whose requests go through the service (thread-safe)."""
        kwargs.setdefault("timeout", httpx.Timeout(60.0, pool=None))
        return httpx.Client(transport=RemoteTransport(self), **kwargs)

    # ------------------------------------------------------------------ routes

    def _hop(self) -> DestinationPool:
        """The pooled connections to the service, started on first use (like a pool's
        destinations: maintenance thread for idle TTL and health checks)."""
        pool = self._pool
        if not pool._started or pool.closed:
            pool._ensure_started()  # raises PoolClosed once closed
        return self._dest

    def _listing_request(self) -> httpx.Request:
        url = self._base.copy_with(raw_path=self._prefix + b"/_toolpool/destinations")
        headers = [(b"host", self._base.netloc), self._auth, (b"accept", b"application/json")]
        return httpx.Request("GET", url, headers=headers)

    def _learn(self, response: httpx.Response) -> dict[Origin, str]:
        if response.status_code != 200:
            self._raise_service_error("(listing)", response, None)
            raise httpx.ProxyError(
                f"the pool service answered {response.status_code} to the destination listing"
            )
        listed = response.json()["destinations"]
        routes = {origin_of(d["url"]): d["name"] for d in listed}
        with self._lock:
            self._routes = routes
        return routes

    async def aroutes(self) -> dict[Origin, str]:
        """Origin -> destination name, fetched from the service once (async)."""
        routes = self._routes
        if routes is None:
            response = await self._hop().async_send(self._listing_request(), None)
            await response.aread()
            routes = self._learn(response)
        return routes

    def routes(self) -> dict[Origin, str]:
        """Origin -> destination name, fetched from the service once (sync)."""
        routes = self._routes
        if routes is None:
            response = self._hop().sync_send(self._listing_request(), None)
            response.read()
            routes = self._learn(response)
        return routes

    def _name_for(self, routes: Mapping[Origin, str], url: httpx.URL) -> str:
        origin = origin_of(url)
        name = routes.get(origin)
        if name is None:
            raise UnknownDestination(
                origin_text(origin), [f"{n} ({origin_text(o)})" for o, n in routes.items()]
            )
        return name

    # ------------------------------------------------------------------ sending

    def _service_request(
        self, name: str, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Request:
        raw = self._prefix + b"/d/" + name.encode("ascii") + request.url.raw_path
        # httpx adds Host only when it builds the body itself; this request reuses a stream.
        headers = [(b"host", self._base.netloc)]
        headers += [
            (k, v)
            for k, v in request.headers.raw
            if k.lower() not in _HOP and k.lower() != self._tenant_lower
        ]
        headers.append(self._auth)
        if ctx is not None and ctx.tenant is not None:
            headers.append((self._tenant_header, ctx.tenant.encode("ascii")))
        return httpx.Request(
            request.method,
            self._base.copy_with(raw_path=raw),
            headers=headers,
            stream=request.stream,
            extensions=request.extensions,
        )

    async def asend(
        self, destination: str, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """Send `request` to the service's `destination` acting for `ctx` (async)."""
        response = await self._hop().async_send(
            self._service_request(destination, request, ctx), None
        )
        if "x-toolpool-error" in response.headers:
            await response.aread()
            self._raise_service_error(destination, response, ctx)
        return _as_downstream(destination, response, request)

    def send(
        self, destination: str, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        """Send `request` to the service's `destination` acting for `ctx` (sync)."""
        response = self._hop().sync_send(self._service_request(destination, request, ctx), None)
        if "x-toolpool-error" in response.headers:
            response.read()
            self._raise_service_error(destination, response, ctx)
        return _as_downstream(destination, response, request)

    def _raise_service_error(
        self, destination: str, response: httpx.Response, ctx: AuthContext | None
    ) -> None:
        """Raise what an in-process pool would raise for the service's own error answer;
        return for the codes that stay responses."""
        code = response.headers.get("x-toolpool-error", "")
        if code in _AS_RESPONSE:
            return
        try:
            data = response.json()
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        detail = str(data.get("detail", f"the pool service answered {response.status_code}"))
        retry_after = _number(data.get("retry_after"), 1.0)
        where = f"destination {destination!r} via the pool service"
        if code == "saturated":
            raise PoolSaturated(
                destination,
                in_use=int(_number(data.get("in_use"), 0)),
                waiting=int(_number(data.get("waiting"), 0)),
                max_connections=int(_number(data.get("max_connections"), 0)),
                queue_limit=int(_number(data.get("queue_limit"), 0)),
                retry_after=retry_after,
                reason=str(data.get("reason", "queue_full")),
                opening=int(_number(data.get("opening"), 0)),
                closing=int(_number(data.get("closing"), 0)),
            )
        if code == "pool_timeout":
            raise PoolTimeout(destination, _number(data.get("timeout"), 0.0), in_use=0, waiting=0)
        if code in ("unavailable", "shutting_down", "not_ready"):
            reason = str(data.get("reason") or code.replace("_", " "))
            raise DestinationUnavailable(destination, retry_after, f"pool service: {reason}")
        if code in _AUTH_CODES:
            tenant = ctx.tenant if ctx is not None else None
            raise AuthError(destination, tenant, f"the pool service refused: {detail}")
        if code == "unknown_destination":
            raise UnknownDestination(f"{destination} (at the pool service)", [])
        if code == "upstream_connect":
            raise httpx.ConnectError(f"{where}: {detail}")
        if code == "upstream_timeout":
            raise httpx.ReadTimeout(f"{where}: {detail}")
        raise httpx.ProxyError(f"{where}: {detail} ({code or response.status_code})")

    # ------------------------------------------------------------------ overflow

    def overflow_layer(self, dest: DestinationPool) -> OverflowLayer:
        """The overflow layer of a local destination (called by `toolpool.Pool` for each
        listed destination when built with `overflow=`; it adds the layer to the
        destination's send chain)."""
        name = self._names.get(dest.name, dest.name)
        layer = OverflowLayer(self, dest, name)
        dest.pool.on_close(self._close_soon)  # once per local pool
        self._overflows[dest.name] = layer
        return layer

    def _close_soon(self) -> None:
        """The local pool is closing: close the connections to the service with it (their
        graceful closes finish on their event loops)."""
        self._pool._begin_close()
        self._pool._stop_maintenance()

    def overflow_stats(self) -> dict[str, OverflowStats]:
        """How many requests each local destination served itself and sent to the service."""
        return {name: o.stats() for name, o in self._overflows.items()}


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value)
    return default


def _as_downstream(
    destination: str, response: httpx.Response, request: httpx.Request
) -> httpx.Response:
    """Present the service's answer as the downstream's: X-Toolpool-* headers move into
    `response.extensions["toolpool"]`, which tells the tier ("service") like a local one."""
    headers = response.headers
    wait = _number(_float(headers.get("x-toolpool-wait-seconds")), 0.0)
    reused = headers.get("x-toolpool-reused") == "1"
    for key in [k for k in headers if k.lower().startswith("x-toolpool-")]:
        del headers[key]
    response.extensions["toolpool"] = {
        "destination": destination,
        "connection_id": None,
        "reused": reused,
        "wait_seconds": wait,
        "tier": "service",
    }
    response.request = request
    return response


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


class RemoteTransport(httpx.AsyncBaseTransport, httpx.BaseTransport):
    """An httpx transport (sync and async) that sends requests for the service's destinations
    through the pool service, acting for the current `toolpool.auth_context`'s tenant.

    ```python
    transport = toolpool.RemoteTransport("http://127.0.0.1:8780", token=agent_token)
    client = httpx.AsyncClient(transport=transport)   # or httpx.Client(transport=transport)
    ```

    Requests keep their ordinary URLs (`https://crm.internal/...`); a URL whose origin is not
    one of the service's destinations raises `toolpool.UnknownDestination`. Given a URL, the
    transport owns its `RemotePool` and closes it with the client; given a `RemotePool`, it
    leaves closing to the pool's owner.
    """

    def __init__(
        self, remote: RemotePool | str, *, token: str | None = None, **kwargs: Any
    ) -> None:
        if isinstance(remote, RemotePool):
            if token is not None or kwargs:
                raise ConfigError("pass token and options to RemotePool, not to its transport")
            self.remote = remote
            self._owns = False
        else:
            if token is None:
                raise ConfigError("RemoteTransport(url, token=...) needs the agent's token")
            self.remote = RemotePool(remote, token=token, **kwargs)
            self._owns = True

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        remote = self.remote
        name = remote._name_for(await remote.aroutes(), request.url)
        return await remote.asend(name, request, _current.get())

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        remote = self.remote
        name = remote._name_for(remote.routes(), request.url)
        return remote.send(name, request, _current.get())

    async def aclose(self) -> None:
        """Close the RemotePool if this transport created it."""
        if self._owns:
            await self.remote.aclose()

    def close(self) -> None:
        """Close the RemotePool if this transport created it."""
        if self._owns:
            self.remote.close()
