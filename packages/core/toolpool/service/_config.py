"""Loading `toolpool serve`'s TOML configuration: validation with the line of every mistake,
and secrets read from environment variables or files (never from the file itself).

The layout (`examples/toolpool.toml` documents every key):

    [service]            where to listen, limits on bodies, drain deadline, allowed Host names
    [pool]               pool-wide defaults (the `toolpool.Pool` keyword arguments)
    [limits]             how this replica's share of each destination's cap is found
    [destinations.NAME]  one allowlisted downstream: url, limits, timeouts, [.auth]
    [agents.NAME]        one agent: how it authenticates to the service, tenants it may act for

Every error names the file, the line and the key, and says what to write instead. A secret's
value never appears in an error, a repr or a log line: only where it came from.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import toolpool
from toolpool._auth_context import AuthContext
from toolpool.errors import ConfigError
from toolpool.service._limits import GlobalLimit, StaticShare

__all__ = [
    "AgentConfig",
    "AuthConfig",
    "DestinationConfig",
    "Secret",
    "ServiceConfig",
    "ServiceSettings",
    "load_config",
    "parse_config",
]

# Names that appear in URLs (/d/<name>/...) and metric labels: plain, bounded characters.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Tenants travel in a header and key connections: printable, no separators that could smuggle.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def forbidden_address(host: str, egress: toolpool.Egress | None = None) -> str | None:
    """Why `host` may never be a destination under `egress` (default: `toolpool.Egress()`,
    which refuses metadata, link-local, unspecified and multicast addresses and metadata host
    names, in any spelling), or None. Applied to every configured destination when the
    config is loaded; the same policy is applied again to the resolved address of every
    connect while the service runs."""
    return (egress if egress is not None else toolpool.Egress()).check_host(host)


class Secret:
    """A secret read from an environment variable or a file. `repr()` and `str()` show only
    where it came from; `reveal()` returns the value (for the auth provider, nothing else)."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str) -> None:
        self._value = value
        self.source = source

    def reveal(self) -> str:
        """The secret value."""
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__


# ---------------------------------------------------------------------------- line locator


_TABLE_LINE = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEY_LINE = re.compile(
    r"^\s*((?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'))*)\s*="
)


def _split_key(text: str) -> tuple[str, ...]:
    parts = re.findall(r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


class _Lines:
    """Where each table and key of a TOML document is written (1-based line numbers)."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), 1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            m = _TABLE_LINE.match(line)
            if m and not _KEY_LINE.match(line):
                table = _split_key(m.group(1))
                self.where.setdefault(table, number)
                continue
            k = _KEY_LINE.match(line)
            if k:
                self.where.setdefault(table + _split_key(k.group(1)), number)
                rest = line[k.end() :]
                for quote in ('"""', "'''"):
                    if rest.count(quote) % 2 == 1:
                        in_multiline = quote

    def line(self, path: tuple[str, ...]) -> int | None:
        """The line of `path`, else of its nearest written ancestor."""
        while path:
            found = self.where.get(path)
            if found is not None:
                return found
            path = path[:-1]
        return None


# ---------------------------------------------------------------------------- reader


class _Doc:
    def __init__(self, source: str, text: str, env: Mapping[str, str], base: Path) -> None:
        self.source = source
        self.lines = _Lines(text)
        self.env = env
        self.base = base

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        line = self.lines.line(path)
        where = f"{self.source}, line {line}" if line is not None else self.source
        key = ".".join(path)
        return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")


_UNSET: Any = object()


class _Table:
    """One TOML table being read: typed getters that know their line, and a check that
    every key was understood."""

    def __init__(self, doc: _Doc, path: tuple[str, ...], data: Mapping[str, Any]) -> None:
        self.doc = doc
        self.path = path
        self.data = data
        self.used: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        return self.doc.error(self.path + ((key,) if key else ()), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        self.used.add(key)
        return self.data.get(key, _UNSET)

    def str_(self, key: str, default: Any = _UNSET) -> Any:
        value = self.raw(key)
        if value is _UNSET:
            if default is _UNSET:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, got {_shown(value)}")
        return value

    def int_(self, key: str, default: Any = _UNSET, minimum: int = 1) -> Any:
        value = self.raw(key)
        if value is _UNSET:
            if default is _UNSET:
                raise self.error(key, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, f"must be a whole number >= {minimum}, got {_shown(value)}")
        return value

    def float_(self, key: str, default: Any = _UNSET, *, positive: bool = True) -> Any:
        value = self.raw(key)
        if value is _UNSET:
            if default is _UNSET:
                raise self.error(key, "is required")
            return default
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if (
            not ok
            or math.isnan(value)
            or math.isinf(value)
            or value < 0
            or (positive and not value)
        ):
            bound = "> 0" if positive else ">= 0"
            raise self.error(key, f"must be a finite number {bound}, got {_shown(value)}")
        return float(value)

    def bool_(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is _UNSET:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_shown(value)}")
        return value

    def str_list(self, key: str, default: Any = _UNSET) -> Any:
        value = self.raw(key)
        if value is _UNSET:
            if default is _UNSET:
                raise self.error(key, "is required")
            return default
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.error(key, f"must be a list of non-empty strings, got {_shown(value)}")
        return list(value)

    def table(self, key: str, required: bool = False) -> _Table | None:
        value = self.raw(key)
        if value is _UNSET:
            if required:
                raise self.error(key, "is required (a table)")
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"must be a table ([{'.'.join((*self.path, key))}])")
        return _Table(self.doc, (*self.path, key), value)

    def tables(self) -> Iterator[tuple[str, _Table]]:
        for key in list(self.data):
            sub = self.table(key)
            assert sub is not None
            yield key, sub

    def secret(self, base: str, *, required: bool) -> Secret | None:
        """`{base}_env` or `{base}_file`; an inline `{base}` is refused without echoing it."""
        if base in self.data:
            self.used.add(base)
            raise self.error(
                base,
                f"secrets are never written in the config file (it ends up in repositories "
                f'and logs); write {base}_env = "VARIABLE" (an environment variable) or '
                f'{base}_file = "/run/secrets/..." (a file holding only the secret)',
            )
        env_name = self.raw(f"{base}_env")
        file_name = self.raw(f"{base}_file")
        if env_name is not _UNSET and file_name is not _UNSET:
            raise self.error(f"{base}_env", f"give {base}_env or {base}_file, not both")
        if env_name is not _UNSET:
            if not isinstance(env_name, str) or not env_name:
                raise self.error(f"{base}_env", "must name an environment variable")
            value = self.doc.env.get(env_name)
            if not value:
                raise self.error(
                    f"{base}_env",
                    f"environment variable {env_name} is not set (or empty); export it before "
                    f"starting the service",
                )
            return Secret(value, f"${env_name}")
        if file_name is not _UNSET:
            if not isinstance(file_name, str) or not file_name:
                raise self.error(f"{base}_file", "must be a file path")
            path = Path(file_name)
            if not path.is_absolute():
                path = self.doc.base / path
            try:
                value = path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise self.error(
                    f"{base}_file", f"cannot read {path} ({exc.strerror or exc}); fix the path"
                ) from None
            if not value:
                raise self.error(f"{base}_file", f"{path} is empty; it must hold the secret")
            return Secret(value, str(path))
        if required:
            raise self.error(None, f'needs {base}_env = "VARIABLE" or {base}_file = "PATH"')
        return None

    def finish(self, allowed: set[str] | None = None) -> None:
        """Refuse keys nobody read (typos), suggesting the closest known key."""
        known = self.used if allowed is None else allowed | self.used
        for key in self.data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise self.error(key, f"unknown key{hint} (known here: {', '.join(sorted(known))})")


def _shown(value: object) -> str:
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return repr(value)
    return type(value).__name__


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServiceSettings:
    """`[service]`: how the service listens and what it accepts."""

    # Loopback by default: a sidecar is reached only from its own host; bind 0.0.0.0
    # deliberately for a central service.
    host: str = "127.0.0.1"
    # An unassigned port near the metrics port family; 0 picks a free one.
    port: int = 8780
    # In-flight requests get this long to finish after SIGTERM (Kubernetes' default grace
    # period is 30 s; leave a few seconds for the pool to close).
    drain_timeout: float = 25.0
    # Tool payloads are small; 10 MiB stops accidental uploads without hurting real ones.
    max_request_body: int = 10 * 1024 * 1024
    # Downloads through a tool rarely exceed this; larger answers fail as 502.
    max_response_body: int = 100 * 1024 * 1024
    # Host header values the service answers to; empty: any (it never routes by Host).
    allowed_hosts: tuple[str, ...] = ()
    # The header in which an agent names the tenant it acts for.
    tenant_header: str = "X-Toolpool-Tenant"
    # One JSON line per request on logger toolpool.service.access (no secrets, no query).
    access_log: bool = True
    # Serve /metrics (Prometheus exposition of the pool and the service).
    metrics: bool = True
    # The service is ready (/readyz) when warm-up finished or after this long, whichever
    # comes first: a downstream that is down must not keep the others from being served.
    warmup_timeout: float = 10.0
    # HTTPS for agents (certificate and key PEM paths); plain HTTP when unset, which is right
    # for a loopback sidecar only: agent tokens must not cross a network in clear text.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # `[service.egress]`: checked on the resolved address of every connect (the default
    # refuses cloud metadata, link-local, unspecified and multicast addresses).
    egress: toolpool.Egress = field(default_factory=toolpool.Egress)
    # The header in which an agent passes the user's token for token-exchange destinations
    # (never forwarded downstream).
    subject_token_header: str = "X-Toolpool-Subject-Token"


@dataclass(frozen=True)
class AgentConfig:
    """`[agents.NAME]`: one agent's credential (kept as a SHA-256 digest) and its tenants."""

    name: str
    token_sha256: bytes = field(repr=False)
    # None: any tenant ("*").
    tenants: frozenset[str] | None

    def may_act_for(self, tenant: str) -> bool:
        """True if this agent may send requests on behalf of `tenant`."""
        return self.tenants is None or tenant in self.tenants

    @property
    def default_tenant(self) -> str | None:
        """The tenant used when a request names none: the agent's only tenant, if it has one."""
        if self.tenants is not None and len(self.tenants) == 1:
            return next(iter(self.tenants))
        return None


@dataclass(frozen=True)
class AuthConfig:
    """`[destinations.NAME.auth]`: the downstream credentials the service applies per tenant.

    `make()` builds a fresh `toolpool.auth` provider (one per pool, as providers require)."""

    kind: str
    make: Callable[[], Any] = field(repr=False)
    # Tenants with credentials of their own; None when one shared credential serves all.
    tenants: frozenset[str] | None
    shared: bool

    def serves(self, tenant: str) -> bool:
        """True if requests of `tenant` can get credentials for this destination."""
        return self.shared or (self.tenants is not None and tenant in self.tenants)


@dataclass(frozen=True)
class DestinationConfig:
    """`[destinations.NAME]`: one allowlisted downstream and how requests to it are sent."""

    name: str
    url: str
    # The keyword arguments of toolpool.Destination other than name, url and auth; the cap
    # is the fleet-wide number (the replica's share is found by the GlobalLimit).
    options: Mapping[str, Any]
    fleet_cap: int | None
    auth: AuthConfig | None
    # A read timeout per response chunk: downstream tools can be slow, not silent forever.
    read_timeout: float = 60.0
    write_timeout: float = 30.0
    # Header in which the downstream is told the tenant (the agent's own is replaced).
    forward_tenant_as: str | None = None
    policy: Any = None

    def destination(self, limit: GlobalLimit, default_cap: int) -> toolpool.Destination:
        """A fresh `toolpool.Destination` for one pool, capped at this replica's share."""
        fleet = self.fleet_cap if self.fleet_cap is not None else default_cap
        share = limit.replica_cap(self.name, fleet)
        if isinstance(share, bool) or not isinstance(share, int) or share < 1:
            raise ConfigError(
                f"the global limit gave destination {self.name!r} a cap of {share!r}; "
                f"replica_cap() must return a whole number >= 1"
            )
        return toolpool.Destination(
            self.name,
            self.url,
            max_connections=share,
            auth=self.auth.make() if self.auth is not None else None,
            policy=self.policy,
            **self.options,
        )


@dataclass(frozen=True)
class ServiceConfig:
    """A validated `toolpool serve` configuration (`load_config(path)`)."""

    source: str
    service: ServiceSettings
    pool: Mapping[str, Any]
    destinations: Mapping[str, DestinationConfig]
    agents: Mapping[str, AgentConfig]
    limit: GlobalLimit

    def pool_defaults(self) -> dict[str, Any]:
        """Keyword arguments for `toolpool.Pool` (only listed destinations are reachable)."""
        return {**self.pool, "unknown_destinations": "reject"}

    def build_pool(self) -> toolpool.Pool:
        """A new pool over the configured destinations, each at this replica's share."""
        kwargs = self.pool_defaults()
        default_cap = int(kwargs.pop("max_connections", 50))
        dests = [d.destination(self.limit, default_cap) for d in self.destinations.values()]
        return toolpool.Pool(
            dests, max_connections=default_cap, egress=self.service.egress, **kwargs
        )


# ---------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Read and validate a TOML config file; `ConfigError` says the line and what to fix.

    Secrets (`*_env`, `*_file`) are read now from `env` (default: the process environment),
    so a missing one stops the service at start, not at its first request.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror or exc}") from None
    return parse_config(text, source=str(p), env=env, base=p.parent)


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> ServiceConfig:
    """Validate TOML text (see `load_config`)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    doc = _Doc(source, text, os.environ if env is None else env, base or Path.cwd())
    root = _Table(doc, (), data)
    service = _service(root.table("service") or _Table(doc, ("service",), {}))
    pool = _pool(root.table("pool") or _Table(doc, ("pool",), {}))
    limit = _limit(root.table("limits") or _Table(doc, ("limits",), {}))
    dest_table = root.table("destinations", required=True)
    assert dest_table is not None
    destinations = {name: _destination(name, t, service.egress) for name, t in dest_table.tables()}
    if not destinations:
        raise dest_table.error(None, "lists no destination; add [destinations.NAME] url = ...")
    agent_table = root.table("agents", required=True)
    assert agent_table is not None
    agents = {name: _agent(name, t) for name, t in agent_table.tables()}
    if not agents:
        raise agent_table.error(None, "lists no agent; add [agents.NAME] token_env = ...")
    seen: dict[bytes, str] = {}
    for agent in agents.values():
        other = seen.setdefault(agent.token_sha256, agent.name)
        if other != agent.name:
            raise doc.error(
                ("agents", agent.name),
                f"has the same token as agent {other!r}; give each agent its own token",
            )
    root.finish()
    return ServiceConfig(
        source=source,
        service=service,
        pool=pool,
        destinations=destinations,
        agents=agents,
        limit=limit,
    )


def _service(t: _Table) -> ServiceSettings:
    d = ServiceSettings()
    host = t.str_("host", d.host)
    port = t.int_("port", d.port, minimum=0)
    if port > 65535:
        raise t.error("port", f"must be a TCP port 0..65535, got {port}")
    header = t.str_("tenant_header", d.tenant_header)
    if not _HEADER_NAME.match(header):
        raise t.error("tenant_header", f"{header!r} is not a valid HTTP header name")
    hosts = t.str_list("allowed_hosts", list(d.allowed_hosts))
    subject = t.str_("subject_token_header", d.subject_token_header)
    if not _HEADER_NAME.match(subject):
        raise t.error("subject_token_header", f"{subject!r} is not a valid HTTP header name")
    if subject.lower() == header.lower():
        raise t.error("subject_token_header", "must differ from tenant_header")
    settings = ServiceSettings(
        host=host,
        port=port,
        drain_timeout=t.float_("drain_timeout", d.drain_timeout),
        max_request_body=t.int_("max_request_body", d.max_request_body, minimum=0),
        max_response_body=t.int_("max_response_body", d.max_response_body, minimum=0),
        allowed_hosts=tuple(h.lower() for h in hosts),
        tenant_header=header,
        access_log=t.bool_("access_log", d.access_log),
        metrics=t.bool_("metrics", d.metrics),
        warmup_timeout=t.float_("warmup_timeout", d.warmup_timeout, positive=False),
        tls_cert_file=_file(t, "tls_cert_file"),
        tls_key_file=_file(t, "tls_key_file"),
        egress=_egress(t),
        subject_token_header=subject,
    )
    if (settings.tls_cert_file is None) != (settings.tls_key_file is None):
        raise t.error("tls_cert_file", "give tls_cert_file and tls_key_file together")
    t.finish()
    return settings


def _egress(service: _Table) -> toolpool.Egress:
    """`[service.egress]`: `deny` and `allow` lists of networks and host names."""
    t = service.table("egress")
    if t is None:
        return toolpool.Egress()
    if t.has("deny_unknown"):
        t.raw("deny_unknown")
        raise t.error(
            "deny_unknown",
            "every destination of the service is listed, so deny_unknown would never apply; "
            "use deny (and allow for the exceptions)",
        )
    lists = {key: t.str_list(key, []) for key in ("deny", "allow")}
    t.finish()
    for key, entries in lists.items():
        try:
            toolpool.Egress(**{key: entries})
        except ConfigError as exc:
            raise t.error(key, str(exc).split(": ", 1)[-1]) from None
    return toolpool.Egress(**lists)


def _file(t: _Table, key: str) -> str | None:
    value = t.str_(key, None)
    if value is None:
        return None
    path = Path(value) if Path(value).is_absolute() else t.doc.base / value
    if not path.is_file():
        raise t.error(key, f"{path} is not a file; fix the path")
    return str(path)


_POOL_FLOATS = (
    "idle_ttl",
    "max_lifetime",
    "health_check_interval",
    "acquire_timeout",
    "connect_timeout",
)


def _pool(t: _Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if t.has("max_connections"):
        out["max_connections"] = t.int_("max_connections")
    for key in _POOL_FLOATS:
        if t.has(key):
            out[key] = t.float_(key)
    if t.has("queue_factor"):
        out["queue_factor"] = t.float_("queue_factor", positive=False)
    if t.has("warmup"):
        out["warmup"] = _fraction(t, "warmup")
    if t.has("verify"):
        out["verify"] = _verify(t)
    if t.has("policy"):
        out["policy"] = _policy(t)
    if t.has("unknown_destinations"):
        t.raw("unknown_destinations")
        raise t.error(
            "unknown_destinations",
            "the service only ever reaches listed destinations (an open proxy is refused); "
            "remove this key",
        )
    t.finish({"max_connections", *_POOL_FLOATS, "queue_factor", "warmup", "verify", "policy"})
    try:
        toolpool.PoolDefaults(**{k: v for k, v in out.items() if k != "policy"})
    except ConfigError as exc:
        raise t.error(None, str(exc)) from None
    return out


def _fraction(t: _Table, key: str) -> float:
    value: float = t.float_(key, positive=False)
    if value > 1:
        raise t.error(key, f"must be a fraction between 0 and 1, got {value!r}")
    return value


def _verify(t: _Table) -> bool | str:
    value = t.raw("verify")
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value:
        path = Path(value)
        if not path.is_absolute():
            path = t.doc.base / path
        if not path.exists():
            raise t.error("verify", f"CA bundle {path} does not exist; fix the path")
        return str(path)
    raise t.error("verify", f"must be true, false or a CA bundle path, got {_shown(value)}")


def _policy(t: _Table) -> Any:
    """`policy = "default"` (toolpool.resilience's default policy), `"off"` (no retries,
    breaker, rate or adaptive limit; admission kept) or `"none"` (no resilience layer)."""
    value = t.raw("policy")
    choices = ("default", "off", "none")
    if value not in choices:
        raise t.error(
            "policy", f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}"
        )
    if value == "none":
        return None
    from toolpool import resilience

    return resilience.Policy() if value == "default" else resilience.Policy.off()


def _limit(t: _Table) -> GlobalLimit:
    provider = t.raw("provider")
    if provider is _UNSET:
        replicas = t.int_("replicas", 1)
        t.finish()
        return StaticShare(replicas)
    if provider == "redis":
        provider = "toolpool.fleet:RedisFleet"
    if not isinstance(provider, str) or ":" not in provider:
        raise t.error("provider", "must be 'redis' or 'package.module:factory'")
    module_name, _, attr = provider.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise t.error("provider", f"cannot import {provider!r}: {exc}") from None
    options = {k: v for k, v in t.data.items() if k != "provider"}
    t.used.update(options)
    if provider == "toolpool.fleet:RedisFleet":
        options["env"] = t.doc.env  # the URL and fleet key are read from the config's env
    try:
        limit = factory(**options)
    except ConfigError as exc:
        raise t.error("provider", str(exc)) from None
    except Exception as exc:
        raise t.error("provider", f"{provider}(**options) failed: {exc}") from None
    for method in ("replica_cap", "hold"):
        if not callable(getattr(limit, method, None)):
            raise t.error("provider", f"{provider} returned an object without {method}()")
    return limit  # type: ignore[no-any-return]


_DEST_FLOATS = (
    "idle_ttl",
    "max_lifetime",
    "health_check_interval",
    "acquire_timeout",
    "connect_timeout",
)


_DEST_KEYS = {
    "url",
    "documented_limit",
    "max_connections",
    *_DEST_FLOATS,
    "queue_factor",
    "warmup",
    "verify",
    "cert",
    "read_timeout",
    "write_timeout",
    "forward_tenant_as",
    "policy",
    "auth",
}


def _destination(name: str, t: _Table, egress: toolpool.Egress) -> DestinationConfig:
    if not _NAME.match(name):
        raise t.error(None, f"destination names use letters, digits, '_', '.', '-' (got {name!r})")
    url = t.str_("url")
    try:
        probe = toolpool.Destination(name, url)
    except ConfigError as exc:
        raise t.error("url", str(exc)) from None
    why = forbidden_address(probe.origin[1], egress)
    if why is not None:
        raise t.error(
            "url",
            f"{url!r} is refused by the egress policy: {why}; the service never proxies there "
            f"(a range you run services in can be allowed by address in [service.egress] allow)",
        )
    options: dict[str, Any] = {}
    fleet_cap: int | None = None
    if t.has("documented_limit") and t.has("max_connections"):
        raise t.error("max_connections", "give documented_limit or max_connections, not both")
    if t.has("documented_limit"):
        documented = t.int_("documented_limit")
        fleet_cap = math.floor(documented * 0.7)
        if fleet_cap < 1:
            raise t.error("documented_limit", "leaves no connection after 30 % headroom")
    if t.has("max_connections"):
        fleet_cap = t.int_("max_connections")
    for key in _DEST_FLOATS:
        if t.has(key):
            options[key] = t.float_(key)
    if t.has("queue_factor"):
        options["queue_factor"] = t.float_("queue_factor", positive=False)
    if t.has("warmup"):
        options["warmup"] = _fraction(t, "warmup")
    if t.has("verify"):
        options["verify"] = _verify(t)
    if t.has("cert"):
        options["cert"] = _cert_paths(t, "cert")
    read_timeout = t.float_("read_timeout", 60.0)
    write_timeout = t.float_("write_timeout", 30.0)
    forward = t.raw("forward_tenant_as")
    if forward is not _UNSET and (not isinstance(forward, str) or not _HEADER_NAME.match(forward)):
        raise t.error("forward_tenant_as", f"must be an HTTP header name, got {_shown(forward)}")
    policy = _policy(t) if t.has("policy") else None
    auth_table = t.table("auth")
    auth = _auth(name, auth_table, options.get("verify")) if auth_table is not None else None
    t.finish(_DEST_KEYS)
    try:
        toolpool.Destination(name, url, max_connections=fleet_cap, **options)
    except ConfigError as exc:
        raise t.error(None, str(exc)) from None
    return DestinationConfig(
        name=name,
        url=url,
        options=options,
        fleet_cap=fleet_cap,
        auth=auth,
        read_timeout=read_timeout,
        write_timeout=write_timeout,
        forward_tenant_as=None if forward is _UNSET else forward,
        policy=policy,
    )


def _cert_paths(t: _Table, key: str) -> str | tuple[str, str]:
    value = t.raw(key)
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not 1 <= len(paths) <= 2:
        raise t.error(key, "must be a PEM path or [cert_path, key_path]")
    resolved = []
    for p in paths:
        if not isinstance(p, str) or not p:
            raise t.error(key, "must be a PEM path or [cert_path, key_path]")
        path = Path(p) if Path(p).is_absolute() else t.doc.base / p
        if not path.exists():
            raise t.error(key, f"{path} does not exist; fix the path")
        resolved.append(str(path))
    return resolved[0] if len(resolved) == 1 else (resolved[0], resolved[1])


_AUTH_KINDS = ("bearer", "api_key", "oauth2_client_credentials", "token_exchange", "mtls")


def _auth(dest: str, t: _Table, verify: Any) -> AuthConfig:
    kind = t.str_("type")
    if kind not in _AUTH_KINDS:
        close = difflib.get_close_matches(str(kind), _AUTH_KINDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise t.error("type", f"unknown auth type {kind!r}{hint} (one of {', '.join(_AUTH_KINDS)})")
    tenants_table = t.table("tenants")
    per_tenant: dict[str, _Table] = {}
    if tenants_table is not None:
        for tenant, sub in tenants_table.tables():
            if not TENANT_PATTERN.match(tenant):
                raise sub.error(None, f"{tenant!r} is not a valid tenant name")
            per_tenant[tenant] = sub
    if kind in ("bearer", "api_key"):
        base = "token" if kind == "bearer" else "key"
        shared = t.secret(base, required=False)
        secrets = {tenant: sub.secret(base, required=True) for tenant, sub in per_tenant.items()}
        for sub in per_tenant.values():
            sub.finish()
        header = t.str_("header", "X-API-Key") if kind == "api_key" else None
        scheme = t.str_("scheme", "") if kind == "api_key" else None
        if header is not None and not _HEADER_NAME.match(header):
            raise t.error("header", f"{header!r} is not a valid HTTP header name")
        _need_some(t, shared, secrets, base)
        lookup = _lookup(dest, shared, secrets)

        def make() -> Any:
            if kind == "bearer":
                return toolpool.auth.Bearer(lambda ctx: lookup(ctx).reveal())
            return toolpool.auth.ApiKey(
                lambda ctx: lookup(ctx).reveal(),
                header=header or "X-API-Key",
                scheme=scheme or None,
            )

    elif kind == "oauth2_client_credentials":
        token_url = t.str_("token_url")
        scope = t.str_("scope", None)
        method, shared_secret, clients, client_of = _client_credentials(dest, t, per_tenant)
        if shared_secret is None and not clients:
            raise t.error(
                None, "needs client_id + client_secret_env/_file, or [.tenants.NAME] tables"
            )
        try:
            toolpool.auth.OAuth2ClientCredentials(token_url, ("probe", "probe"))
        except ConfigError as exc:
            raise t.error("token_url", str(exc)) from None

        def make() -> Any:
            return toolpool.auth.OAuth2ClientCredentials(
                token_url, client_of, scope=scope, auth_method=method
            )

        shared = shared_secret
        secrets = {tenant: c[1] for tenant, c in clients.items()}
    elif kind == "token_exchange":
        make, shared, secrets = _token_exchange(dest, t, per_tenant)
    else:  # mtls
        shared_files = _cert_paths(t, "cert") if t.has("cert") else None
        files: dict[str, str | tuple[str, str]] = {}
        for tenant, sub in per_tenant.items():
            files[tenant] = _cert_paths(sub, "cert")
            sub.finish()
        if shared_files is None and not files:
            raise t.error(None, "needs cert = [cert, key] or [.tenants.NAME] cert = [...]")
        mtls_verify = verify if isinstance(verify, bool | str) else None

        def cert_of(ctx: AuthContext | None) -> Any:
            tenant = ctx.tenant if ctx is not None else None
            found = files.get(tenant) if tenant is not None else None
            found = found if found is not None else shared_files
            if found is None:
                raise TypeError(f"no client certificate is configured for this tenant at {dest!r}")
            return found

        def make() -> Any:
            return toolpool.auth.MutualTLS(cert_of, verify=mtls_verify)

        shared = shared_files  # type: ignore[assignment]
        secrets = files  # type: ignore[assignment]
    if tenants_table is not None:
        tenants_table.finish()
    t.finish()
    return AuthConfig(
        kind=kind,
        make=make,
        tenants=frozenset(secrets) if secrets else None,
        shared=shared is not None,
    )


_TOKEN_EXCHANGE_OPTIONS = (
    "audience",
    "resource",
    "scope",
    "requested_token_type",
    "subject_token_type",
)


def _token_exchange(
    dest: str, t: _Table, per_tenant: Mapping[str, _Table]
) -> tuple[Callable[[], Any], Any, dict[str, Any]]:
    """`type = "token_exchange"` (RFC 8693): the user's token, sent by the agent in the
    `[service] subject_token_header` header, exchanged at `token_url` for a token for this
    destination; the service authenticates to the token endpoint with `client_id` +
    `client_secret_env/_file` (shared or per tenant), or not at all when neither is given."""
    token_url = t.str_("token_url")
    options = {key: t.str_(key, None) for key in _TOKEN_EXCHANGE_OPTIONS}
    method, shared_secret, clients, client_of = _client_credentials(dest, t, per_tenant)
    anonymous = shared_secret is None and not clients
    try:
        toolpool.auth.TokenExchange(token_url, **{k: v for k, v in options.items() if v})
    except ConfigError as exc:
        raise t.error("token_url", str(exc)) from None

    def make() -> Any:
        return toolpool.auth.TokenExchange(
            token_url,
            client_credentials=None if anonymous else client_of,
            auth_method=method,
            **{k: v for k, v in options.items() if v},
        )

    # Without client credentials every tenant is served (the subject token is the identity).
    shared: Any = shared_secret if not anonymous else True
    return make, shared, {tenant: c[1] for tenant, c in clients.items()}


def _client_credentials(
    dest: str, t: _Table, per_tenant: Mapping[str, _Table]
) -> tuple[
    Literal["client_secret_basic", "client_secret_post"],
    Secret | None,
    dict[str, tuple[str, Secret]],
    Callable[[AuthContext | None], tuple[str, str]],
]:
    """The client authentication to a token endpoint, shared by `oauth2_client_credentials` and
    `token_exchange`: `auth_method`, a shared `client_id` + `client_secret_env/_file` and the
    per-tenant ones. Returns the method, the shared secret (None when there is no shared
    client), the per-tenant clients and `client_of(ctx)`, which picks the tenant's client, else
    the shared one, and raises TokenFailure when there is neither."""
    method = t.str_("auth_method", "client_secret_basic")
    if method not in ("client_secret_basic", "client_secret_post"):
        raise t.error("auth_method", "must be 'client_secret_basic' or 'client_secret_post'")
    shared_id = t.str_("client_id", None)
    shared_secret = t.secret("client_secret", required=shared_id is not None)
    if shared_secret is not None and shared_id is None:
        raise t.error("client_id", "is required next to client_secret_env/_file")
    clients: dict[str, tuple[str, Secret]] = {}
    for tenant, sub in per_tenant.items():
        cid = sub.str_("client_id")
        secret = sub.secret("client_secret", required=True)
        assert secret is not None
        clients[tenant] = (cid, secret)
        sub.finish()
    shared_client = (shared_id, shared_secret) if shared_id is not None else None

    def client_of(ctx: AuthContext | None) -> tuple[str, str]:
        tenant = ctx.tenant if ctx is not None else None
        found = clients.get(tenant) if tenant is not None else None
        if found is None and shared_client is not None:
            found = shared_client  # type: ignore[assignment]
        if found is None or found[1] is None:
            raise toolpool.auth.TokenFailure(
                f"no client credentials are configured for this tenant at {dest!r}"
            )
        return found[0], found[1].reveal()

    return method, shared_secret, clients, client_of


def _need_some(t: _Table, shared: Secret | None, per: Mapping[str, Any], base: str) -> None:
    if shared is None and not per:
        raise t.error(
            None,
            f"needs {base}_env / {base}_file (one credential for all tenants) or "
            f"[.tenants.NAME] tables with {base}_env / {base}_file",
        )


def _lookup(
    dest: str, shared: Secret | None, per: Mapping[str, Secret | None]
) -> Callable[[AuthContext | None], Secret]:
    def lookup(ctx: AuthContext | None) -> Secret:
        tenant = ctx.tenant if ctx is not None else None
        found = per.get(tenant) if tenant is not None else None
        if found is None:
            found = shared
        if found is None:
            raise toolpool.auth.TokenFailure(
                f"no credential is configured for this tenant at {dest!r}"
            )
        return found

    return lookup


def _agent(name: str, t: _Table) -> AgentConfig:
    if not _NAME.match(name):
        raise t.error(None, f"agent names use letters, digits, '_', '.', '-' (got {name!r})")
    digest_hex = t.raw("token_sha256")
    if digest_hex is not _UNSET:
        if t.has("token_env") or t.has("token_file"):
            raise t.error("token_sha256", "give token_sha256 or token_env/token_file, not both")
        if not isinstance(digest_hex, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest_hex):
            raise t.error("token_sha256", "must be 64 hex digits (sha256sum of the token)")
        digest = bytes.fromhex(digest_hex)
    else:
        secret = t.secret("token", required=True)
        assert secret is not None
        if len(secret.reveal()) < 16:
            raise t.error(
                "token_env" if t.has("token_env") else "token_file",
                "the agent token is shorter than 16 characters; use a random one "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            )
        digest = hashlib.sha256(secret.reveal().encode()).digest()
    tenants = t.str_list("tenants")
    if not tenants:
        raise t.error("tenants", 'lists no tenant; list the tenants this agent acts for, or ["*"]')
    for tenant in tenants:
        if tenant != "*" and not TENANT_PATTERN.match(tenant):
            raise t.error("tenants", f"{tenant!r} is not a valid tenant name")
    t.finish()
    return AgentConfig(
        name=name,
        token_sha256=digest,
        tenants=None if "*" in tenants else frozenset(tenants),
    )
