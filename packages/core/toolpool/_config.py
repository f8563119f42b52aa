"""Configuration: `Destination` and the pool-wide defaults, validated at construction.

Every default lives in `PoolDefaults`, each with its reason. A `Destination` leaves a field at
None to inherit the pool's value; `resolve()` merges the two into the numbers the pool runs on.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from toolpool._auth_context import AuthContext
from toolpool._egress import Egress
from toolpool.errors import ConfigError

__all__ = [
    "DEFAULT_POLICY_MARK",
    "Destination",
    "DestinationSettings",
    "Origin",
    "PoolDefaults",
    "origin_of",
]

Origin = tuple[str, str, int]  # (scheme, host, port), host lower-case, IPv6 without brackets

_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str | httpx.URL) -> Origin:
    """The (scheme, host, port) a URL points at."""
    u = url if isinstance(url, httpx.URL) else httpx.URL(url)
    scheme = u.scheme
    port = u.port if u.port is not None else _DEFAULT_PORTS.get(scheme, 0)
    return (scheme, u.host.lower(), port)


def origin_text(origin: Origin) -> str:
    scheme, host, port = origin
    shown = f"[{host}]" if ":" in host else host
    return (
        f"{scheme}://{shown}"
        if _DEFAULT_PORTS.get(scheme) == port
        else f"{scheme}://{shown}:{port}"
    )


class _DefaultPolicyMark:
    """`PoolDefaults.policy` when none was given: `toolpool.Pool` applies
    `toolpool.resilience.DEFAULT_POLICY` in its place."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "toolpool.resilience.DEFAULT_POLICY"


DEFAULT_POLICY_MARK: Final = _DefaultPolicyMark()


@dataclass(frozen=True)
class PoolDefaults:
    """Pool-wide defaults; every `Destination` field left at None inherits from here."""

    # The seed's starting point when a downstream documents no limit.
    max_connections: int = 50
    # 30-60 s: longer wastes sockets on connections that are not reused, shorter loses reuse.
    idle_ttl: float = 45.0
    # Connections are renewed every 10 min (minus up to 10 % jitter) so DNS and server
    # rotations are picked up and connections opened together do not expire together.
    max_lifetime: float = 600.0
    # Dead connections in the pool are worse than none: probe idle ones every 10 s.
    health_check_interval: float = 10.0
    # Queue up to 2x the pool size before rejecting; beyond that the queue masks a
    # capacity problem and PoolSaturated tells the caller to back off.
    queue_factor: float = 2.0
    # Pre-open 25 % of max connections at start: a cold pool under burst is a storm.
    warmup: float = 0.25
    # Never an unbounded wait for a connection.
    acquire_timeout: float = 30.0
    # A connect that has not finished in 10 s will not; fail and let the caller decide.
    connect_timeout: float = 10.0
    # TLS certificate verification: True (certifi's CAs), False, a CA bundle path, or an
    # ssl.SSLContext.
    verify: bool | str | ssl.SSLContext = True
    # "pool": any origin gets a pool with these defaults; "reject": only listed ones.
    unknown_destinations: Literal["pool", "reject"] = "pool"
    # Resilience for destinations that name no policy: toolpool.resilience.Policy() (retry
    # budget, breaker, adaptive limit) so a pool resists storms out of the box; None: none.
    # Left out, it is DEFAULT_POLICY_MARK, which the pool replaces with
    # toolpool.resilience.DEFAULT_POLICY (a configuration module imports no resilience code).
    policy: Any = field(default_factory=lambda: DEFAULT_POLICY_MARK)
    # Checked on the resolved address of every connect: cloud metadata, link-local,
    # unspecified and multicast addresses are refused unless allowed by address
    # (toolpool.Egress; tools build URLs from model output, so any URL can arrive).
    egress: Egress = field(default_factory=Egress)
    # HTTP/2 where the server offers it (ALPN on TLS: h2 and http/1.1 offered, the server
    # picks): one multiplexed connection per (destination, tenant) instead of one connection
    # per request in flight, and the cap counts concurrent requests. Plain http:// is always
    # HTTP/1.1; False: HTTP/1.1 only.
    http2: bool = True

    def __post_init__(self) -> None:
        _check_positive_int("max_connections", self.max_connections)
        for name in ("idle_ttl", "max_lifetime", "health_check_interval", "acquire_timeout"):
            _check_positive(name, getattr(self, name))
        _check_positive("connect_timeout", self.connect_timeout)
        _check_non_negative("queue_factor", self.queue_factor)
        _check_fraction("warmup", self.warmup)
        _check_verify(self.verify)
        if not isinstance(self.http2, bool):
            raise ConfigError(f"http2 must be True or False, got {self.http2!r}")
        if self.unknown_destinations not in ("pool", "reject"):
            raise ConfigError(
                "unknown_destinations must be 'pool' or 'reject', "
                f"not {self.unknown_destinations!r}"
            )
        if not isinstance(self.egress, Egress):
            raise ConfigError(
                f"egress must be a toolpool.Egress (the default refuses cloud metadata and "
                f"link-local addresses), got {type(self.egress).__name__}"
            )


@dataclass(frozen=True)
class Destination:
    """A downstream service the pool manages connections to, with its own limits.

    `url` is the service's origin (`https://crm.internal`, `http://127.0.0.1:8080`); any
    request to that scheme, host and port uses this destination's pool. Give either
    `documented_limit` (the downstream's concurrent-connection limit; the pool keeps 30 %
    headroom for other clients and uses `floor(documented_limit * 0.7)`) or
    `max_connections`, not both. Fields left at None inherit the pool's defaults.

    >>> Destination("crm", "https://crm.internal", documented_limit=100).connection_cap(50)
    70
    """

    name: str
    url: str
    documented_limit: int | None = None
    max_connections: int | None = None
    idle_ttl: float | None = None
    max_lifetime: float | None = None
    health_check_interval: float | None = None
    queue_factor: float | None = None
    warmup: float | None = None
    acquire_timeout: float | None = None
    connect_timeout: float | None = None
    verify: bool | str | ssl.SSLContext | None = None
    # A client certificate for every connection of this destination: a PEM path holding
    # cert and key, or (cert_path, key_path). Per-tenant certificates: toolpool.auth.MutualTLS.
    cert: str | tuple[str, str] | None = None
    # Identities to warm connections for when connections carry identity from the
    # handshake (mTLS); other destinations warm unbound connections.
    warmup_contexts: Sequence[AuthContext] = ()
    # An auth provider from toolpool.auth (or any object implementing its protocol).
    auth: Any = None
    # A toolpool.resilience.Policy for this destination; None inherits the pool's.
    policy: Any = None
    #: Offer HTTP/2 by ALPN on https:// (None: the pool's default, True; False: HTTP/1.1
    #: only). On HTTP/2, `max_connections` bounds concurrent requests (streams) across tenants.
    http2: bool | None = None
    origin: Origin = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigError(f"Destination name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "origin", _parse_origin(self.name, self.url))
        if self.documented_limit is not None and self.max_connections is not None:
            raise ConfigError(
                f"destination {self.name!r}: give documented_limit or max_connections, not both "
                f"(documented_limit={self.documented_limit} would mean "
                f"{math.floor(self.documented_limit * 0.7)} connections)"
            )
        if self.documented_limit is not None:
            _check_positive_int("documented_limit", self.documented_limit, self.name)
            if math.floor(self.documented_limit * 0.7) < 1:
                raise ConfigError(
                    f"destination {self.name!r}: documented_limit={self.documented_limit} leaves "
                    f"no connection after 30 % headroom; give max_connections=1 instead"
                )
        if self.max_connections is not None:
            _check_positive_int("max_connections", self.max_connections, self.name)
        if self.http2 is not None and not isinstance(self.http2, bool):
            raise ConfigError(
                f"destination {self.name!r}: http2 must be True, False or None, got {self.http2!r}"
            )
        for name in (
            "idle_ttl",
            "max_lifetime",
            "health_check_interval",
            "acquire_timeout",
            "connect_timeout",
        ):
            value = getattr(self, name)
            if value is not None:
                _check_positive(name, value, self.name)
        if self.queue_factor is not None:
            _check_non_negative("queue_factor", self.queue_factor, self.name)
        if self.warmup is not None:
            _check_fraction("warmup", self.warmup, self.name)
        if self.verify is not None:
            _check_verify(self.verify, self.name)
        object.__setattr__(self, "warmup_contexts", tuple(self.warmup_contexts))
        for ctx in self.warmup_contexts:
            if not isinstance(ctx, AuthContext):
                raise ConfigError(
                    f"destination {self.name!r}: warmup_contexts must hold toolpool.AuthContext "
                    f"objects, got {type(ctx).__name__}"
                )

    def connection_cap(self, default: int) -> int:
        """The connection limit this destination runs with, given the pool's default."""
        if self.max_connections is not None:
            return self.max_connections
        if self.documented_limit is not None:
            return math.floor(self.documented_limit * 0.7)
        return default


@dataclass(frozen=True)
class DestinationSettings:
    """The merged numbers one destination runs on."""

    name: str
    origin: Origin
    max_connections: int
    queue_limit: int
    idle_ttl: float
    max_lifetime: float
    health_check_interval: float
    warmup_count: int
    acquire_timeout: float
    connect_timeout: float
    verify: bool | str | ssl.SSLContext
    cert: str | tuple[str, str] | None
    warmup_contexts: tuple[AuthContext, ...]
    auth: Any
    policy: Any
    listed: bool
    #: HTTP/2 is offered (https:// with http2 on).
    http2: bool = False

    @property
    def url(self) -> str:
        return origin_text(self.origin)


def resolve(dest: Destination, defaults: PoolDefaults, listed: bool = True) -> DestinationSettings:
    """Merge a destination's overrides with the pool's defaults."""

    def pick(name: str) -> Any:
        value = getattr(dest, name)
        return getattr(defaults, name) if value is None else value

    cap = dest.connection_cap(defaults.max_connections)
    # mTLS per context included: an HTTP/2 connection presents its context's certificate
    # (toolpool._h2pool.H2Connections.ssl_context).
    http2 = bool(pick("http2")) and dest.origin[0] == "https"
    return DestinationSettings(
        name=dest.name,
        origin=dest.origin,
        max_connections=cap,
        queue_limit=math.floor(pick("queue_factor") * cap),
        idle_ttl=pick("idle_ttl"),
        max_lifetime=pick("max_lifetime"),
        health_check_interval=pick("health_check_interval"),
        # On HTTP/2 warm-up opens one connection per warm-up context instead (any non-zero
        # count turns it on; toolpool._async.h2.warm).
        warmup_count=math.ceil(pick("warmup") * cap),
        acquire_timeout=pick("acquire_timeout"),
        connect_timeout=pick("connect_timeout"),
        verify=pick("verify"),
        cert=dest.cert,
        warmup_contexts=tuple(dest.warmup_contexts),
        auth=dest.auth,
        policy=dest.policy if dest.policy is not None else defaults.policy,
        listed=listed,
        http2=http2,
    )


def _parse_origin(name: str, url: str) -> Origin:
    if not isinstance(url, str):
        raise ConfigError(f"destination {name!r}: url must be a string like 'https://crm.internal'")
    try:
        u = httpx.URL(url)
    except Exception as exc:
        raise ConfigError(f"destination {name!r}: {url!r} is not a valid URL ({exc})") from None
    if u.scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"destination {name!r}: url {url!r} must start with http:// or https://")
    if not u.host:
        raise ConfigError(f"destination {name!r}: url {url!r} has no host")
    if u.userinfo:
        raise ConfigError(f"destination {name!r}: put credentials in auth=..., not in the url")
    if u.raw_path not in (b"", b"/") or u.fragment:
        raise ConfigError(
            f"destination {name!r}: give the origin only (e.g. "
            f"{origin_text(origin_of(u))!r}), without path, query or fragment"
        )
    return origin_of(u)


def _where(dest: str | None) -> str:
    return f"destination {dest!r}: " if dest else ""


def _check_positive_int(name: str, value: object, dest: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{_where(dest)}{name} must be a whole number >= 1, got {value!r}")


def _check_positive(name: str, value: object, dest: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{_where(dest)}{name} must be a number of seconds > 0, got {value!r}")
    if math.isinf(value):
        raise ConfigError(f"{_where(dest)}{name} must be finite, got {value!r}")


def _check_non_negative(name: str, value: object, dest: str | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and value >= 0
    if not ok or math.isinf(value):  # type: ignore[arg-type]
        raise ConfigError(f"{_where(dest)}{name} must be a finite number >= 0, got {value!r}")


def _check_fraction(name: str, value: object, dest: str | None = None) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and 0 <= value <= 1
    if not ok:
        raise ConfigError(
            f"{_where(dest)}{name} must be a fraction of max_connections between 0 and 1, "
            f"got {value!r}"
        )


def _check_verify(value: object, dest: str | None = None) -> None:
    if not isinstance(value, bool | str | ssl.SSLContext):
        raise ConfigError(
            f"{_where(dest)}verify must be True, False, a CA bundle path or an ssl.SSLContext, "
            f"got {type(value).__name__}"
        )
