"""Loading `toolpool serve`'s TOML configuration: validation with the line of every mistake,
and secrets read from environment variables or files (never from the file itself).

The layout (`examples/toolpool.toml` documents every key):

    [service]            where to listen, limits on bodies, drain deadline, allowed Host names
    [pool]               pool-wide defaults (the `toolpool.Pool` keyword arguments)
    [limits]             how this replica's share of each destination's cap is found
    [destinations.NAME]  one allowlisted downstream: url, limits, timeouts, [.auth]
    [agents.NAME]        one agent: how it authenticates to the service, tenants it may act for

Pydantic reads the document (tables, known keys, types of the service's own settings, secrets,
files); the values toolpool already checks go unchanged to `toolpool.Destination`,
`toolpool.PoolDefaults`, `toolpool.Egress`, the auth providers and the limit, whose
`ConfigError` is the only check of them. Every error names the file, the line and the key, and
says what to write instead. A secret's value never appears in an error, a repr or a log line:
only where it came from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import importlib
import math
import os
import re
import tomllib
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

import toolpool
from toolpool import resilience
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
_T = TypeVar("_T")


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


# ---------------------------------------------------------------------------- where, and why


_TABLE_LINE = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")
_KEY = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_KEY_LINE = re.compile(rf"^\s*({_KEY}(?:\s*\.\s*{_KEY})*)\s*=")


def _split_key(text: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in re.findall(_KEY, text))


class _Lines:
    """Where each table and key of a TOML document is written (1-based line numbers); tomllib
    keeps no positions."""

    def __init__(self, text: str) -> None:
        self.where: dict[tuple[str, ...], int] = {}
        table: tuple[str, ...] = ()
        in_multiline: str | None = None
        for number, line in enumerate(text.splitlines(), 1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            key = _KEY_LINE.match(line)
            header = None if key else _TABLE_LINE.match(line)
            if header:
                table = _split_key(header.group(1))
                self.where.setdefault(table, number)
            elif key:
                self.where.setdefault(table + _split_key(key.group(1)), number)
                rest = line[key.end() :]
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


@dataclass
class _Doc:
    """The document being read: the validation context of every validator below."""

    source: str
    lines: _Lines
    env: Mapping[str, str]
    base: Path  # relative paths in the file are relative to it

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        line = self.lines.line(path)
        where = f"{self.source}, line {line}" if line is not None else self.source
        key = ".".join(path)
        return ConfigError(f"{where}: {key}: {message}" if key else f"{where}: {message}")

    def blame(
        self, path: tuple[str, ...], message: str, keys: Collection[str], other: str = ""
    ) -> ConfigError:
        """A toolpool constructor's `ConfigError` about some of `keys` (those of the table at
        `path`), placed at the key it starts with, else at the last one it names ("give A or
        B, not both": B), else at `other` (or the table)."""
        named = [(m.start(), k) for k in keys if (m := re.search(rf"\b{re.escape(k)}\b", message))]
        message = re.sub(r"^(destination '[^']*'|[A-Z]\w*(\(\w+=\.\.\.\))?): ", "", message)
        lead = re.split(r"[ =]", message, maxsplit=1)[0]
        key = lead if lead in keys else max(named)[1] if named else other
        return self.error((*path, key) if key else path, message.removeprefix(f"{key} "))

    @contextlib.contextmanager
    def checking(
        self, path: tuple[str, ...], keys: Collection[str], other: str = ""
    ) -> Iterator[None]:
        """Run a toolpool constructor given the values of `keys`; its error, blamed."""
        try:
            yield
        except ConfigError as exc:
            raise self.blame(path, str(exc), keys, other) from None

    def path(self, value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def located(self, data: Mapping[str, Any], exc: ValidationError) -> ConfigError:
        """The first (by line) of pydantic's errors, named the way this module names them."""
        found = []
        for err in exc.errors(include_url=False, include_input=False):
            path: tuple[str, ...] = ()
            node: Any = data
            for seg in err["loc"]:  # union tags and "[key]" are not in the document
                if isinstance(node, dict) and seg in node:
                    path, node = (*path, str(seg)), node[seg]
                elif isinstance(node, list) and isinstance(seg, int) and seg < len(node):
                    node = node[seg]
            kind, ctx = err["type"], err.get("ctx", {})
            if kind == "value_error":
                error = self.blame(path, str(ctx["error"]), node if isinstance(node, dict) else ())
            elif kind == "toolpool":
                error = self.error((*path, *ctx["path"]), ctx["message"])
            elif kind == "union_tag_invalid":
                close = difflib.get_close_matches(ctx["tag"], _AUTH_KINDS, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                kinds = ", ".join(_AUTH_KINDS)
                error = self.error(
                    (*path, "type"), f"unknown auth type {ctx['tag']!r}{hint} (one of {kinds})"
                )
            elif kind in ("missing", "union_tag_not_found"):
                last = "type" if kind == "union_tag_not_found" else str(err["loc"][-1])
                error = self.error((*path, last), "is required")
            elif kind.endswith("_type"):
                error = self.error(path, f"must be a table ([{'.'.join(path)}])")
            else:
                error = self.error(path, err["msg"])
            found.append((self.lines.line(path) or 0, error))
        return min(found, key=lambda f: f[0])[1]


def _fault(message: str, *path: str) -> PydanticCustomError:
    """A validation error about the key `path` below the value being validated."""
    return PydanticCustomError("toolpool", "{message}", {"message": message, "path": path})


def _unknown_key(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (known here: {', '.join(sorted(known))})"


def _unknown(key: str, known: Collection[str]) -> PydanticCustomError:
    return _fault(_unknown_key(key, known), key)


def _shown(value: object) -> str:
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return repr(value)
    return type(value).__name__


# ---------------------------------------------------------------------------- value types


def _must(kind: str, ok: Callable[[Any], bool], convert: Callable[[Any], Any] | None = None) -> Any:
    def check(value: Any) -> Any:
        if not ok(value):
            raise ConfigError(f"must be {kind}, got {_shown(value)}")
        return convert(value) if convert is not None else value

    return PlainValidator(check)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header(value: Any) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ConfigError(f"{_shown(value)} is not a valid HTTP header name")
    return value


def _tenant(value: Any) -> str:
    if not TENANT_PATTERN.match(value):
        raise ConfigError(f"{value!r} is not a valid tenant name")
    return str(value)


def _file(value: Any, info: ValidationInfo) -> str:
    path = info.context.path(_text_check(value))
    if not path.is_file():
        raise ConfigError(f"{path} is not a file; fix the path")
    return str(path)


def _verify(value: Any, info: ValidationInfo) -> bool | str:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be true, false or a CA bundle path, got {_shown(value)}")
    path = info.context.path(value)
    if not path.exists():
        raise ConfigError(f"CA bundle {path} does not exist; fix the path")
    return str(path)


def _cert(value: Any, info: ValidationInfo) -> str | tuple[str, str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not 1 <= len(paths) <= 2 or not all(paths):
        raise ConfigError("must be a PEM path or [cert_path, key_path]")
    resolved = [
        info.context.path(_text_check(p, "a PEM path or [cert_path, key_path]")) for p in paths
    ]
    for path in resolved:
        if not path.exists():
            raise ConfigError(f"{path} does not exist; fix the path")
    return str(resolved[0]) if len(resolved) == 1 else (str(resolved[0]), str(resolved[1]))


def _policy(value: Any) -> Any:
    """`"default"` (toolpool.resilience's default policy), `"off"` (no retries, breaker, rate
    or adaptive limit; admission kept) or `"none"` (no resilience layer)."""
    choices = {"default": resilience.Policy, "off": resilience.Policy.off, "none": lambda: None}
    if value not in choices:
        shown = ", ".join(map(repr, choices))
        raise ConfigError(f"must be one of {shown}, got {_shown(value)}")
    return choices[value]()


def _refused(message: str) -> Any:
    def refuse(value: Any) -> Any:
        raise ConfigError(message)

    return PlainValidator(refuse)


def _text_check(value: Any, kind: str = "a non-empty string") -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be {kind}, got {_shown(value)}")
    return value


_Text = Annotated[str, PlainValidator(_text_check)]
_Texts = Annotated[
    tuple[str, ...],
    _must(
        "a list of non-empty strings",
        lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
        tuple,
    ),
]
_Flag = Annotated[bool, _must("true or false", lambda v: isinstance(v, bool))]
_Seconds = Annotated[float, _must("a finite number > 0", lambda v: _number(v) and v > 0, float)]
_Header = Annotated[str, PlainValidator(_header)]
_File = Annotated[str | None, PlainValidator(_file)]
_Verify = Annotated[bool | str, PlainValidator(_verify)]
_Cert = Annotated[str | tuple[str, str], PlainValidator(_cert)]
_Policy = Annotated[Any, PlainValidator(_policy)]
_Tenant = Annotated[str, PlainValidator(_tenant)]


def _egress(value: Any) -> toolpool.Egress:
    """`[service.egress]`: `deny` and `allow` lists of networks and host names."""
    if not isinstance(value, dict):
        raise ConfigError("must be a table ([service.egress])")
    if "deny_unknown" in value:
        raise _fault(
            "every destination of the service is listed, so deny_unknown would never apply; "
            "use deny (and allow for the exceptions)",
            "deny_unknown",
        )
    for key, entries in value.items():
        if key not in ("deny", "allow"):
            raise _unknown(key, ("allow", "deny"))
        if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
            raise _fault(f"must be a list of non-empty strings, got {_shown(entries)}", key)
    return toolpool.Egress(**value)  # its ConfigError names the list, which is blamed


# ---------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServiceSettings:
    """`[service]`: how the service listens and what it accepts."""

    # Loopback by default: a sidecar is reached only from its own host; bind 0.0.0.0
    # deliberately for a central service.
    host: _Text = "127.0.0.1"
    # An unassigned port near the metrics port family; 0 picks a free one.
    port: Annotated[int, _must("a TCP port 0..65535", lambda v: _whole(v) and 0 <= v <= 65535)] = (
        8780
    )
    # In-flight requests get this long to finish after SIGTERM (Kubernetes' default grace
    # period is 30 s; leave a few seconds for the pool to close).
    drain_timeout: _Seconds = 25.0
    # Tool payloads are small; 10 MiB stops accidental uploads without hurting real ones.
    max_request_body: Annotated[
        int, _must("a whole number >= 0", lambda v: _whole(v) and v >= 0)
    ] = 10 * 1024 * 1024
    # Downloads through a tool rarely exceed this; larger answers fail as 502.
    max_response_body: Annotated[
        int, _must("a whole number >= 0", lambda v: _whole(v) and v >= 0)
    ] = 100 * 1024 * 1024
    # Host header values the service answers to; empty: any (it never routes by Host).
    allowed_hosts: Annotated[
        tuple[str, ...],
        _must(
            "a list of non-empty strings",
            lambda v: isinstance(v, list) and all(isinstance(s, str) and s for s in v),
            lambda v: tuple(s.lower() for s in v),
        ),
    ] = ()
    # The header in which an agent names the tenant it acts for.
    tenant_header: _Header = "X-Toolpool-Tenant"
    # One JSON line per request on logger toolpool.service.access (no secrets, no query).
    access_log: _Flag = True
    # Serve /metrics (Prometheus exposition of the pool and the service).
    metrics: _Flag = True
    # The service is ready (/readyz) when warm-up finished or after this long, whichever
    # comes first: a downstream that is down must not keep the others from being served.
    warmup_timeout: Annotated[
        float, _must("a finite number >= 0", lambda v: _number(v) and v >= 0, float)
    ] = 10.0
    # HTTPS for agents (certificate and key PEM paths); plain HTTP when unset, which is right
    # for a loopback sidecar only: agent tokens must not cross a network in clear text.
    tls_cert_file: _File = None
    tls_key_file: _File = None
    # `[service.egress]`: checked on the resolved address of every connect (the default
    # refuses cloud metadata, link-local, unspecified and multicast addresses).
    egress: Annotated[toolpool.Egress, PlainValidator(_egress)] = field(
        default_factory=toolpool.Egress
    )
    # The header in which an agent passes the user's token for token-exchange destinations
    # (never forwarded downstream).
    subject_token_header: _Header = "X-Toolpool-Subject-Token"


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

    # The validated destination without auth; its cap is the fleet-wide one (the replica's
    # share is found by the GlobalLimit when a pool is built).
    spec: toolpool.Destination
    auth: AuthConfig | None
    # A read timeout per response chunk: downstream tools can be slow, not silent forever.
    read_timeout: float = 60.0
    write_timeout: float = 30.0
    # Header in which the downstream is told the tenant (the agent's own is replaced).
    forward_tenant_as: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def fleet_cap(self) -> int | None:
        """The fleet-wide cap (max_connections, or 70 % of documented_limit); None: the
        pool's default."""
        given = self.spec.max_connections is not None or self.spec.documented_limit is not None
        return self.spec.connection_cap(0) if given else None

    def destination(self, limit: GlobalLimit, default_cap: int) -> toolpool.Destination:
        """A fresh `toolpool.Destination` for one pool, capped at this replica's share."""
        share = limit.replica_cap(self.name, self.spec.connection_cap(default_cap))
        if isinstance(share, bool) or not isinstance(share, int) or share < 1:
            raise ConfigError(
                f"the global limit gave destination {self.name!r} a cap of {share!r}; "
                f"replica_cap() must return a whole number >= 1"
            )
        auth = self.auth.make() if self.auth is not None else None
        return dataclasses.replace(
            self.spec, documented_limit=None, max_connections=share, auth=auth
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


# ---------------------------------------------------------------------------- tables


class _Table(BaseModel):
    """One TOML table: unknown keys are refused naming the closest known one, and the secret
    `secret_name`, if the table has one, is read from `<name>_env` or `<name>_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    secret_name: ClassVar[str] = ""
    secret_required: ClassVar[bool] = True

    @model_validator(mode="before")
    @classmethod
    def _keys_and_secret(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        base = cls.secret_name
        files = (f"{base}_env", f"{base}_file") if base else ()
        known = {*cls.model_fields, *files} - {"secret"}
        for key in data:
            if base and key == base:
                raise _fault(
                    f"secrets are never written in the config file (it ends up in repositories "
                    f'and logs); write {base}_env = "VARIABLE" (an environment variable) or '
                    f'{base}_file = "/run/secrets/..." (a file holding only the secret)',
                    key,
                )
            if key not in known:
                raise _unknown(key, known)
        if not base:
            return data
        rest = {k: v for k, v in data.items() if k not in files}
        return {**rest, "secret": _read_secret(info.context, data, base, cls.secret_required)}


def _read_secret(doc: _Doc, data: Mapping[str, Any], base: str, required: bool) -> Secret | None:
    env_key, file_key = f"{base}_env", f"{base}_file"
    if env_key in data and file_key in data:
        raise _fault(f"give {env_key} or {file_key}, not both", env_key)
    if env_key in data:
        name = data[env_key]
        if not isinstance(name, str) or not name:
            raise _fault("must name an environment variable", env_key)
        if not doc.env.get(name):
            raise _fault(
                f"environment variable {name} is not set (or empty); export it before "
                f"starting the service",
                env_key,
            )
        return Secret(doc.env[name], f"${name}")
    if file_key in data:
        if not isinstance(data[file_key], str) or not data[file_key]:
            raise _fault("must be a file path", file_key)
        path = doc.path(data[file_key])
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise _fault(
                f"cannot read {path} ({exc.strerror or exc}); fix the path", file_key
            ) from None
        if not value:
            raise _fault(f"{path} is empty; it must hold the secret", file_key)
        return Secret(value, str(path))
    if required:
        raise _fault(f'needs {env_key} = "VARIABLE" or {file_key} = "PATH"')
    return None


def _pick(
    dest: str, per: Mapping[str, _T | None], shared: _T | None, what: str, error: Any = None
) -> Callable[[toolpool.AuthContext | None], _T]:
    """The tenant's own credential, else the shared one, else `error` (TokenFailure)."""

    def pick(ctx: toolpool.AuthContext | None) -> _T:
        found = per.get(ctx.tenant) if ctx is not None and ctx.tenant is not None else None
        found = found if found is not None else shared
        if found is None:
            raise (error or toolpool.auth.TokenFailure)(
                f"no {what} configured for this tenant at {dest!r}"
            )
        return found

    return pick


class _Secrets(_Table):
    secret: Secret | None = None

    def _config(
        self, kind: str, dest: str, tenants: Mapping[str, _Secrets], make: Any
    ) -> AuthConfig:
        if self.secret is None and not tenants:
            base = self.secret_name
            raise ConfigError(
                f"needs {base}_env / {base}_file (one credential for all tenants) or "
                f"[.tenants.NAME] tables with {base}_env / {base}_file"
            )
        per = {tenant: t.secret for tenant, t in tenants.items()}
        pick = _pick(dest, per, self.secret, "credential is")
        return AuthConfig(
            kind, lambda: make(lambda ctx: pick(ctx).reveal()), _keys(per), self.secret is not None
        )


class _Token(_Secrets):
    secret_name = "token"


class _Key(_Secrets):
    secret_name = "key"


class _Bearer(_Token):
    secret_required = False
    type: Literal["bearer"]
    tenants: dict[_Tenant, _Token] = {}

    def config(self, dest: str, verify: Any) -> AuthConfig:
        return self._config("bearer", dest, self.tenants, toolpool.auth.Bearer)


class _ApiKey(_Key):
    secret_required = False
    type: Literal["api_key"]
    header: _Header = "X-API-Key"
    scheme: _Text | None = None
    tenants: dict[_Tenant, _Key] = {}

    def config(self, dest: str, verify: Any) -> AuthConfig:
        def make(key: Any) -> Any:
            return toolpool.auth.ApiKey(key, header=self.header, scheme=self.scheme)

        return self._config("api_key", dest, self.tenants, make)


class _Client(_Table):
    secret_name = "client_secret"
    client_id: _Text
    secret: Secret | None = None


class _TokenEndpoint(_Table):
    """What `oauth2_client_credentials` and `token_exchange` share: the token endpoint and the
    client authentication to it (a shared client and per-tenant ones)."""

    secret_name = "client_secret"
    secret_required = False
    token_url: _Text
    scope: _Text | None = None
    auth_method: Annotated[
        Literal["client_secret_basic", "client_secret_post"],
        _must("'client_secret_basic' or 'client_secret_post'", lambda v: v in _AUTH_METHODS),
    ] = "client_secret_basic"
    client_id: _Text | None = None
    secret: Secret | None = None
    tenants: dict[_Tenant, _Client] = {}

    @model_validator(mode="after")
    def _shared_client(self) -> _TokenEndpoint:
        if self.secret is not None and self.client_id is None:
            raise _fault("is required next to client_secret_env/_file", "client_id")
        if self.secret is None and self.client_id is not None:
            raise _fault('needs client_secret_env = "VARIABLE" or client_secret_file = "PATH"')
        self.provider(lambda ctx: ("probe", "probe"))  # the provider checks token_url
        return self

    def provider(self, client: Any) -> Any:
        raise NotImplementedError

    def config(self, dest: str, verify: Any) -> AuthConfig:
        per = {tenant: (c.client_id, c.secret) for tenant, c in self.tenants.items()}
        shared = (self.client_id, self.secret) if self.client_id and self.secret else None
        pick = _pick(dest, per, shared, "client credentials are")

        def client_of(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
            client_id, secret = pick(ctx)
            assert secret is not None
            return client_id, secret.reveal()

        anonymous = shared is None and not per  # token_exchange only: the subject is enough
        make = lambda: self.provider(None if anonymous else client_of)  # noqa: E731
        return AuthConfig(self.type, make, _keys(per), shared is not None or anonymous)  # type: ignore[attr-defined]


class _OAuth2ClientCredentials(_TokenEndpoint):
    type: Literal["oauth2_client_credentials"]

    @model_validator(mode="after")
    def _some_client(self) -> _OAuth2ClientCredentials:
        if self.secret is None and not self.tenants:
            raise ConfigError(
                "needs client_id + client_secret_env/_file, or [.tenants.NAME] tables"
            )
        return self

    def provider(self, client: Any) -> Any:
        return toolpool.auth.OAuth2ClientCredentials(
            self.token_url, client, scope=self.scope, auth_method=self.auth_method
        )


class _TokenExchange(_TokenEndpoint):
    """`type = "token_exchange"` (RFC 8693): the user's token, sent by the agent in the
    `[service] subject_token_header` header, exchanged at `token_url` for a token for this
    destination; the service authenticates to the token endpoint with `client_id` +
    `client_secret_env/_file` (shared or per tenant), or not at all when neither is given."""

    type: Literal["token_exchange"]
    audience: _Text | None = None
    resource: _Text | None = None
    requested_token_type: _Text | None = None
    subject_token_type: _Text | None = None

    def provider(self, client: Any) -> Any:
        options = ("audience", "resource", "scope", "requested_token_type", "subject_token_type")
        given = {k: getattr(self, k) for k in options if getattr(self, k)}
        return toolpool.auth.TokenExchange(
            self.token_url, client_credentials=client, auth_method=self.auth_method, **given
        )


class _CertFiles(_Table):
    cert: _Cert


class _MutualTLS(_Table):
    type: Literal["mtls"]
    cert: _Cert | None = None
    tenants: dict[_Tenant, _CertFiles] = {}

    def config(self, dest: str, verify: Any) -> AuthConfig:
        if self.cert is None and not self.tenants:
            raise ConfigError("needs cert = [cert, key] or [.tenants.NAME] cert = [...]")
        per = {tenant: t.cert for tenant, t in self.tenants.items()}
        cert_of = _pick(dest, per, self.cert, "client certificate is", TypeError)
        mtls_verify = verify if isinstance(verify, bool | str) else None
        return AuthConfig(
            "mtls",
            lambda: toolpool.auth.MutualTLS(cert_of, verify=mtls_verify),
            _keys(per),
            self.cert is not None,
        )


_AUTH_KINDS = ("bearer", "api_key", "oauth2_client_credentials", "token_exchange", "mtls")
_AUTH_METHODS = ("client_secret_basic", "client_secret_post")
_Auth = Annotated[
    _Bearer | _ApiKey | _OAuth2ClientCredentials | _TokenExchange | _MutualTLS,
    Field(discriminator="type"),
]


def _keys(per: Mapping[str, Any]) -> frozenset[str] | None:
    return frozenset(per) or None


class _Destination(_Table):
    url: _Text
    # toolpool.Destination's own options, unchecked here: Destination checks them.
    documented_limit: Any = None
    max_connections: Any = None
    idle_ttl: Any = None
    max_lifetime: Any = None
    health_check_interval: Any = None
    acquire_timeout: Any = None
    connect_timeout: Any = None
    queue_factor: Any = None
    warmup: Any = None
    verify: _Verify | None = None
    cert: _Cert | None = None
    policy: _Policy = None
    read_timeout: _Seconds = 60.0
    write_timeout: _Seconds = 30.0
    forward_tenant_as: _Header | None = None
    auth: _Auth | None = None


class _Pool(_Table):
    # toolpool.PoolDefaults checks these.
    max_connections: Any = None
    idle_ttl: Any = None
    max_lifetime: Any = None
    health_check_interval: Any = None
    acquire_timeout: Any = None
    connect_timeout: Any = None
    queue_factor: Any = None
    warmup: Any = None
    verify: _Verify | None = None
    policy: _Policy = None
    unknown_destinations: Annotated[
        Any,
        _refused(
            "the service only ever reaches listed destinations (an open proxy is refused); "
            "remove this key"
        ),
    ] = None


class _Agent(_Table):
    secret_name = "token"
    secret_required = False
    secret: Secret | None = None
    token_sha256: (
        Annotated[
            str,
            _must(
                "64 hex digits (sha256sum of the token)",
                lambda v: isinstance(v, str) and bool(re.fullmatch(r"[0-9a-fA-F]{64}", v)),
            ),
        ]
        | None
    ) = None
    tenants: _Texts

    @model_validator(mode="after")
    def _one_token(self) -> _Agent:
        if self.token_sha256 is not None and self.secret is not None:
            raise _fault("give token_sha256 or token_env/token_file, not both", "token_sha256")
        if self.token_sha256 is None and self.secret is None:
            raise _fault('needs token_env = "VARIABLE" or token_file = "PATH"')
        if self.secret is not None and len(self.secret.reveal()) < 16:
            raise _fault(
                "the agent token is shorter than 16 characters; use a random one "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                "token_env" if self.secret.source.startswith("$") else "token_file",
            )
        if not self.tenants:
            raise _fault(
                'lists no tenant; list the tenants this agent acts for, or ["*"]', "tenants"
            )
        for tenant in self.tenants:
            if tenant != "*" and not TENANT_PATTERN.match(tenant):
                raise _fault(f"{tenant!r} is not a valid tenant name", "tenants")
        return self

    def config(self, name: str) -> AgentConfig:
        if self.secret is not None:
            digest = hashlib.sha256(self.secret.reveal().encode()).digest()
        else:
            digest = bytes.fromhex(self.token_sha256 or "")
        tenants = None if "*" in self.tenants else frozenset(self.tenants)
        return AgentConfig(name=name, token_sha256=digest, tenants=tenants)


class _Document(_Table):
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    pool: _Pool = Field(default_factory=_Pool)
    limits: dict[str, Any] = {}
    destinations: dict[str, _Destination]
    agents: dict[str, _Agent]

    @field_validator("service", mode="before")
    @classmethod
    def _service_keys(cls, value: Any) -> Any:
        known = {f.name for f in dataclasses.fields(ServiceSettings)}
        for key in value if isinstance(value, dict) else ():
            if key not in known:
                raise _unknown(key, known)
        return value

    @field_validator("service")
    @classmethod
    def _service_pairs(cls, s: ServiceSettings) -> ServiceSettings:
        if s.subject_token_header.lower() == s.tenant_header.lower():
            raise _fault("must differ from tenant_header", "subject_token_header")
        if (s.tls_cert_file is None) != (s.tls_key_file is None):
            raise _fault("give tls_cert_file and tls_key_file together", "tls_cert_file")
        return s


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
    doc = _Doc(source, _Lines(text), os.environ if env is None else env, base or Path.cwd())
    try:
        tables = _Document.model_validate(data, context=doc)
    except ValidationError as exc:
        raise doc.located(data, exc) from None
    pool = {k: getattr(tables.pool, k) for k in tables.pool.model_fields_set}
    with doc.checking(("pool",), pool):
        toolpool.PoolDefaults(**pool)
    if not tables.destinations:
        raise doc.error(
            ("destinations",), "lists no destination; add [destinations.NAME] url = ..."
        )
    destinations = {
        name: _destination(doc, name, t, tables.service.egress)
        for name, t in tables.destinations.items()
    }
    if not tables.agents:
        raise doc.error(("agents",), "lists no agent; add [agents.NAME] token_env = ...")
    agents: dict[str, AgentConfig] = {}
    seen: dict[bytes, str] = {}
    for name, t in tables.agents.items():
        if not _NAME.match(name):
            raise doc.error(
                ("agents", name), f"agent names use letters, digits, '_', '.', '-' (got {name!r})"
            )
        agents[name] = agent = t.config(name)
        other = seen.setdefault(agent.token_sha256, name)
        if other != name:
            raise doc.error(
                ("agents", name),
                f"has the same token as agent {other!r}; give each agent its own token",
            )
    return ServiceConfig(
        source=source,
        service=tables.service,
        pool=pool,
        destinations=destinations,
        agents=agents,
        limit=_limit(doc, tables.limits),
    )


_DESTINATION_OPTIONS = {
    "documented_limit",
    "max_connections",
    "idle_ttl",
    "max_lifetime",
    "health_check_interval",
    "acquire_timeout",
    "connect_timeout",
    "queue_factor",
    "warmup",
    "verify",
    "cert",
    "policy",
}


def _destination(
    doc: _Doc, name: str, t: _Destination, egress: toolpool.Egress
) -> DestinationConfig:
    where = ("destinations", name)
    if not _NAME.match(name):
        raise doc.error(
            where, f"destination names use letters, digits, '_', '.', '-' (got {name!r})"
        )
    options = {k: getattr(t, k) for k in t.model_fields_set & _DESTINATION_OPTIONS}
    with doc.checking(where, {"url", *options}, other="url"):
        spec = toolpool.Destination(name, t.url, **options)
    why = forbidden_address(spec.origin[1], egress)
    if why is not None:
        raise doc.error(
            (*where, "url"),
            f"{t.url!r} is refused by the egress policy: {why}; the service never proxies there "
            f"(a range you run services in can be allowed by address in [service.egress] allow)",
        )
    auth = None
    if t.auth is not None:
        with doc.checking((*where, "auth"), ()):
            auth = t.auth.config(name, options.get("verify"))
    return DestinationConfig(
        spec=spec,
        auth=auth,
        read_timeout=t.read_timeout,
        write_timeout=t.write_timeout,
        forward_tenant_as=t.forward_tenant_as,
    )


def _limit(doc: _Doc, table: Mapping[str, Any]) -> GlobalLimit:
    options = dict(table)
    provider = options.pop("provider", None)
    if provider is None:
        for key in options:
            if key != "replicas":
                raise doc.error(("limits", key), _unknown_key(key, ("provider", "replicas")))
        with doc.checking(("limits",), options):
            return StaticShare(**options)
    if provider == "redis":
        provider = "toolpool.fleet:RedisFleet"
    where = ("limits", "provider")
    if not isinstance(provider, str) or ":" not in provider:
        raise doc.error(where, "must be 'redis' or 'package.module:factory'")
    module_name, _, attr = provider.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise doc.error(where, f"cannot import {provider!r}: {exc}") from None
    if provider == "toolpool.fleet:RedisFleet":
        options["env"] = doc.env  # the URL and fleet key are read from the config's env
    try:
        limit = factory(**options)
    except ConfigError as exc:
        raise doc.error(where, str(exc)) from None
    except Exception as exc:
        raise doc.error(where, f"{provider}(**options) failed: {exc}") from None
    for method in ("replica_cap", "hold"):
        if not callable(getattr(limit, method, None)):
            raise doc.error(where, f"{provider} returned an object without {method}()")
    return limit  # type: ignore[no-any-return]
