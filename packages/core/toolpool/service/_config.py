"""Loading `toolpool serve`'s TOML configuration: validation with the line of every mistake,
and secrets read from environment variables or files (never from the file itself).

The layout (`examples/toolpool.toml` documents every key):

    [service]            where to listen, limits on bodies, drain deadline, allowed Host names
    [pool]               pool-wide defaults (the `toolpool.Pool` keyword arguments)
    [limits]             how this replica's share of each destination's cap is found
    [destinations.NAME]  one allowlisted downstream: url, limits, timeouts, [.auth]
    [agents.NAME]        one agent: how it authenticates to the service, tenants it may act for

Pydantic reads the tables, their keys and the service's own values. Values that toolpool's
constructors check (`Destination`, `PoolDefaults`, `Egress`, the auth providers, the limit) go
to them as written, so theirs is the only check. Every error names the file, the line and the
key, and says what to write instead. A secret's value never appears in an error, a repr or a
log line: only where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib
import math
import os
import re
import tomllib
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pydantic
from pydantic import AfterValidator, Field, PlainValidator, ValidationInfo, model_validator
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
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Tenants travel in a header and key connections: printable, no separators that could smuggle.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
_AGENT_TENANT = rf"^\*$|{TENANT_PATTERN.pattern}"  # or "*": any tenant


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

_KEY = r"[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*'"
_KEY_LINE = re.compile(rf"^\s*((?:{_KEY})(?:\s*\.\s*(?:{_KEY}))*)\s*=")
_TABLE_LINE = re.compile(r"^\s*\[\[?\s*(.+?)\s*\]\]?\s*(#.*)?$")


def _key_path(text: str) -> tuple[str, ...]:
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in re.findall(_KEY, text))


def _lines(text: str) -> dict[tuple[str, ...], int]:
    """Where each table and key of a TOML document is written (tomllib keeps no positions)."""
    where: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    multiline: str | None = None
    for number, line in enumerate(text.splitlines(), 1):
        if multiline is not None:
            multiline = None if line.count(multiline) % 2 else multiline
        elif key := _KEY_LINE.match(line):
            where.setdefault(table + _key_path(key.group(1)), number)
            multiline = next((q for q in ('"""', "'''") if line[key.end() :].count(q) % 2), None)
        elif header := _TABLE_LINE.match(line):
            table = _key_path(header.group(1))
            where.setdefault(table, number)
    return where


_LIST = "must be a list of non-empty strings, got {got}"
# pydantic's error types (and string patterns) in this module's words.
_SAID = {
    "missing": "is required",
    "union_tag_not_found": "is required",
    "bool_type": "must be true or false, got {got}",
    "string_type": "must be a non-empty string, got {got}",
    "string_too_short": "must be a non-empty string, got {got}",
    "tuple_type": _LIST,
    "literal_error": "must be {expected}",
    **dict.fromkeys(
        ("dict_type", "model_type", "model_attributes_type", "dataclass_type"),
        "must be a table ([{at}])",
    ),
    _HEADER_NAME: "{got} is not a valid HTTP header name",
    TENANT_PATTERN.pattern: "{got} is not a valid tenant name",
    _AGENT_TENANT: "{got} is not a valid tenant name",
    _NAME: "{what} names use letters, digits, '_', '.', '-' (got {got})",
}
_AUTH_KINDS = ("bearer", "api_key", "oauth2_client_credentials", "token_exchange", "mtls")


@dataclass
class _Doc:
    """The document being read: the validation context of every validator below."""

    source: str
    lines: dict[tuple[str, ...], int]
    env: Mapping[str, str]
    base: Path  # relative paths in the file are relative to it

    def error(self, path: tuple[str, ...], message: str) -> ConfigError:
        """`message` about the key at `path`, at its line (else its table's)."""
        found = (self.lines.get(path[:n]) for n in range(len(path), 0, -1))
        line = next((n for n in found if n is not None), None)
        where = f"{self.source}, line {line}" if line is not None else self.source
        return ConfigError(
            f"{where}: {'.'.join(path)}: {message}" if path else f"{where}: {message}"
        )

    def make(self, path: tuple[str, ...], keys: Collection[str], make: Callable[[], Any]) -> Any:
        """`make()`, a toolpool constructor given the table's `keys`: its `ConfigError` at
        the key it starts with, else at the last one it names, else at the table."""
        try:
            return make()
        except ConfigError as exc:
            message = re.sub(r"^destination '[^']*': ", "", str(exc))
            lead = re.split(r"[ =]", message, maxsplit=1)[0]
            named = [(m.start(), k) for k in keys if (m := re.search(rf"\b{k}\b", message))]
            key = lead if lead in keys else max(named)[1] if named else ""
            where = (*path, key) if key else path
            raise self.error(where, message.removeprefix(f"{key} ")) from None

    def located(self, data: Mapping[str, Any], exc: pydantic.ValidationError) -> ConfigError:
        """pydantic's first error (the checks run in document order), in this module's words."""
        err = exc.errors(include_url=False)[0]
        kind, ctx, got = err["type"], err.get("ctx", {}), err.get("input")
        path: tuple[str, ...] = ()
        node: Any = data
        for seg in err["loc"]:  # union tags and "[key]" are not in the document
            if isinstance(node, dict) and seg in node:
                path, node = (*path, str(seg)), node[seg]
            elif isinstance(node, list) and kind in ("string_type", "string_too_short"):
                kind, got = "tuple_type", node  # a list's entry is no string: the list's fault
        if kind in ("value_error", "toolpool"):  # a ConfigError or a `_fault` of a validator
            path, message = (*path, *ctx.get("path", ())), str(ctx.get("error", err["msg"]))
        elif kind == "union_tag_invalid" and isinstance(node.get("type"), str):
            close = difflib.get_close_matches(ctx["tag"], _AUTH_KINDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            path = (*path, "type")
            message = f"unknown auth type {ctx['tag']!r}{hint} (one of {', '.join(_AUTH_KINDS)})"
        else:
            if kind in ("missing", "union_tag_not_found"):
                path = (*path, "type" if "union" in kind else str(err["loc"][-1]))
            elif kind == "union_tag_invalid":  # a type that is no string
                path, kind, got = (*path, "type"), "string_type", node.get("type")
            template = _SAID.get(ctx.get("pattern", kind), "{msg}")
            what = path[0].removesuffix("s") if path else ""  # "destination", "agent"
            message = template.format(
                **ctx, got=_shown(got), msg=err["msg"], at=".".join(path), what=what
            )
        return self.error(path, message)


def _doc(info: ValidationInfo) -> _Doc:
    return typing.cast(_Doc, info.context)


def _fault(message: str, *path: str) -> PydanticCustomError:
    """A validation error about the key `path` below the value being validated."""
    return PydanticCustomError("toolpool", "{message}", {"message": message, "path": path})


def _unknown(key: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (known here: {', '.join(sorted(known))})"


def _shown(value: object) -> str:
    if isinstance(value, str | int | float | bool) and len(repr(value)) <= 60:
        return repr(value)
    return type(value).__name__


# ---------------------------------------------------------------------------- values


def _must(message: str, ok: Callable[[Any], Any], then: Any = PlainValidator) -> Any:
    """A value `ok` accepts, else `message` (with the value shown)."""

    def check(value: Any) -> Any:
        if not ok(value):
            raise ConfigError(message.format(_shown(value)))
        return value

    return then(check)


def _number(value: Any, low: float, high: float = math.inf, whole: bool = False) -> bool:
    kind = int if whole else int | float
    return isinstance(value, kind) and not isinstance(value, bool) and low <= value < high


def _file(value: str, info: ValidationInfo) -> str:
    if not (path := _doc(info).base / value).is_file():
        raise ConfigError(f"{path} is not a file; fix the path")
    return str(path)


def _verify(value: Any, info: ValidationInfo) -> bool | str:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be true, false or a CA bundle path, got {_shown(value)}")
    if not (path := _doc(info).base / value).exists():
        raise ConfigError(f"CA bundle {path} does not exist; fix the path")
    return str(path)


def _cert(value: Any, info: ValidationInfo) -> str | tuple[str, str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not 0 < len(paths) < 3 or not all(map(_nonempty, paths)):
        raise ConfigError("must be a PEM path or [cert_path, key_path]")
    found = [str(_doc(info).base / p) for p in paths]
    for path in found:
        if not os.path.exists(path):
            raise ConfigError(f"{path} does not exist; fix the path")
    return found[0] if len(found) == 1 else (found[0], found[1])


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _policy(value: Any) -> Any:
    """`"default"` (toolpool.resilience's default policy), `"off"` (no retries, breaker, rate
    or adaptive limit; admission kept) or `"none"` (no resilience layer)."""
    choices: dict[str, Callable[[], Any]] = {
        "default": resilience.Policy,
        "off": resilience.Policy.off,
        "none": lambda: None,
    }
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}")
    return choices[value]()


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
        if key not in ("allow", "deny"):
            raise _fault(_unknown(key, ("allow", "deny")), key)
        if not isinstance(entries, list) or not all(map(_nonempty, entries)):
            raise _fault(_LIST.format(got=_shown(entries)), key)
        try:
            toolpool.Egress(**{key: entries})  # type: ignore[arg-type]
        except ConfigError as exc:  # "Egress(deny=...): why"
            raise _fault(str(exc).split(": ", 1)[-1], key) from None
    return toolpool.Egress(**value)


_Text = Annotated[str, Field(strict=True, min_length=1)]
_Seconds = Annotated[
    float, _must("must be a finite number > 0, got {}", lambda v: _number(v, 0) and v)
]
_Size = Annotated[
    int, _must("must be a whole number >= 0, got {}", lambda v: _number(v, 0, whole=True))
]
_Header = Annotated[str, Field(strict=True, min_length=1, pattern=_HEADER_NAME)]
_Tenant = Annotated[str, Field(pattern=TENANT_PATTERN.pattern)]
_Name = Annotated[str, Field(pattern=_NAME)]
_Cert = Annotated[str | tuple[str, str], PlainValidator(_cert)]
_Verify = Annotated[bool | str, PlainValidator(_verify)]
_Policy = Annotated[Any, PlainValidator(_policy)]


@dataclass(frozen=True)
class ServiceSettings:
    """`[service]`: how the service listens and what it accepts."""

    # Loopback by default: a sidecar is reached only from its own host; bind 0.0.0.0
    # deliberately for a central service.
    host: _Text = "127.0.0.1"
    # An unassigned port near the metrics port family; 0 picks a free one.
    port: Annotated[
        _Size, _must("must be a TCP port 0..65535, got {}", lambda v: v < 65536, AfterValidator)
    ] = 8780
    # In-flight requests get this long to finish after SIGTERM (Kubernetes' default grace
    # period is 30 s; leave a few seconds for the pool to close).
    drain_timeout: _Seconds = 25.0
    # Tool payloads are small; 10 MiB stops accidental uploads without hurting real ones.
    max_request_body: _Size = 10 * 1024 * 1024
    # Downloads through a tool rarely exceed this; larger answers fail as 502.
    max_response_body: _Size = 100 * 1024 * 1024
    # Host header values the service answers to; empty: any (it never routes by Host).
    allowed_hosts: Annotated[
        tuple[_Text, ...], AfterValidator(lambda v: tuple(h.lower() for h in v))
    ] = ()
    # The header in which an agent names the tenant it acts for.
    tenant_header: _Header = "X-Toolpool-Tenant"
    # One JSON line per request on logger toolpool.service.access (no secrets, no query).
    access_log: pydantic.StrictBool = True
    # Serve /metrics (Prometheus exposition of the pool and the service).
    metrics: pydantic.StrictBool = True
    # The service is ready (/readyz) when warm-up finished or after this long, whichever
    # comes first: a downstream that is down must not keep the others from being served.
    warmup_timeout: Annotated[
        float, _must("must be a finite number >= 0, got {}", lambda v: _number(v, 0))
    ] = 10.0
    # HTTPS for agents (certificate and key PEM paths); plain HTTP when unset, which is right
    # for a loopback sidecar only: agent tokens must not cross a network in clear text.
    tls_cert_file: Annotated[_Text, AfterValidator(_file)] | None = None
    tls_key_file: Annotated[_Text, AfterValidator(_file)] | None = None
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

    # The checked destination without auth; its cap is the fleet-wide one (each pool gets
    # this replica's share of it from the GlobalLimit).
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
        """`max_connections`, or 70 % of `documented_limit`; None: the pool's default."""
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


class _Table(pydantic.BaseModel):
    """One TOML table. Keys that are no field are refused (naming the closest known one),
    unless `passed_on` (they go to the toolpool constructor that checks them, as `options`)
    or `refused` (with its message). The secret `secret_name`, if the table has one, is read
    from `<name>_env` or `<name>_file` into `secret`."""

    model_config = pydantic.ConfigDict(extra="allow", frozen=True, arbitrary_types_allowed=True)
    secret_name: ClassVar[str] = ""
    secret_required: ClassVar[bool] = False
    passed_on: ClassVar[Collection[str]] = ()
    refused: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _secret(cls, data: Any, info: ValidationInfo) -> Any:
        if isinstance(data, dict) and (base := cls.secret_name):
            secret = _read_secret(_doc(info), data, base, cls.secret_required)
            data = {k: v for k, v in data.items() if k not in (f"{base}_env", f"{base}_file")}
            data["secret"] = secret
        return data

    @model_validator(mode="after")
    def _keys(self) -> typing.Self:
        secret = (f"{self.secret_name}_env", f"{self.secret_name}_file") if self.secret_name else ()
        known = {*type(self).model_fields, *secret, *self.passed_on} - {"secret"}
        for key in self.model_extra or ():
            if key in self.refused:
                raise _fault(self.refused[key], key)
            if key not in known:
                raise _fault(_unknown(key, known), key)
        return self

    @property
    def options(self) -> dict[str, Any]:
        """The `passed_on` keys given: fields as read, other keys as written."""
        given = self.model_fields_set & set(self.passed_on)
        return {**{k: getattr(self, k) for k in given}, **(self.model_extra or {})}


def _read_secret(doc: _Doc, data: Mapping[str, Any], base: str, required: bool) -> Secret | None:
    env_key, file_key = f"{base}_env", f"{base}_file"
    if base in data:
        raise _fault(
            f"secrets are never written in the config file (it ends up in repositories "
            f'and logs); write {base}_env = "VARIABLE" (an environment variable) or '
            f'{base}_file = "/run/secrets/..." (a file holding only the secret)',
            base,
        )
    if env_key in data and file_key in data:
        raise _fault(f"give {env_key} or {file_key}, not both", env_key)
    if env_key in data:
        if not _nonempty(name := data[env_key]):
            raise _fault("must name an environment variable", env_key)
        if not doc.env.get(name):
            raise _fault(
                f"environment variable {name} is not set (or empty); export it before "
                f"starting the service",
                env_key,
            )
        return Secret(doc.env[name], f"${name}")
    if file_key in data:
        if not _nonempty(data[file_key]):
            raise _fault("must be a file path", file_key)
        path = doc.base / data[file_key]
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            why = f"cannot read {path} ({exc.strerror or exc}); fix the path"
            raise _fault(why, file_key) from None
        if not value:
            raise _fault(f"{path} is empty; it must hold the secret", file_key)
        return Secret(value, str(path))
    if required:
        raise _fault(f'needs {env_key} = "VARIABLE" or {file_key} = "PATH"')
    return None


class _Token(_Table):
    secret_name, secret_required = "token", True
    secret: Secret | None = None


class _Key(_Table):
    secret_name, secret_required = "key", True
    secret: Secret | None = None


class _Client(_Table):
    secret_name, secret_required = "client_secret", True
    client_id: _Text
    secret: Secret | None = None


class _CertFiles(_Table):
    cert: _Cert = Field(None, validate_default=True)


class _Auth(_Table):
    """What every auth kind shares: one credential for all tenants, or one per tenant."""

    what: ClassVar[str] = "credential is"  # "no <what> configured for this tenant"
    needs: ClassVar[str] = ""  # the error when there is neither; "": none is needed
    type: str
    tenants: dict[_Tenant, Any] = {}

    def credential(self, table: Any) -> Any:
        """The credential a table (the auth table or a tenant's) gives, or None."""
        return table.secret

    def check(self) -> None:
        """The kind's own checks, before the count of credentials."""

    def probe(self) -> None:
        """Checks of the provider, after the count of credentials."""

    def provider(self, pick: Callable[..., Any], verify: Any) -> Any:
        raise NotImplementedError

    @model_validator(mode="after")
    def _some(self) -> typing.Self:
        self.check()
        if self.needs and self.credential(self) is None and not self.tenants:
            raise _fault(self.needs)
        self.probe()
        return self

    def config(self, dest: str, verify: Any) -> AuthConfig:
        shared = self.credential(self)
        per = {tenant: self.credential(t) for tenant, t in self.tenants.items()}
        error = TypeError if self.type == "mtls" else toolpool.auth.TokenFailure

        def pick(ctx: toolpool.AuthContext | None) -> Any:
            found = per.get(ctx.tenant) if ctx is not None and ctx.tenant is not None else None
            if (found := found if found is not None else shared) is None:
                raise error(f"no {self.what} configured for this tenant at {dest!r}")
            return found

        everyone = shared is not None or not (per or self.needs)
        return AuthConfig(
            self.type, lambda: self.provider(pick, verify), frozenset(per) or None, everyone
        )


def _needs(base: str) -> str:
    return (
        f"needs {base}_env / {base}_file (one credential for all tenants) or "
        f"[.tenants.NAME] tables with {base}_env / {base}_file"
    )


class _Bearer(_Auth):
    secret_name, needs = "token", _needs("token")
    type: Literal["bearer"]
    secret: Secret | None = None
    tenants: dict[_Tenant, _Token] = {}

    def provider(self, pick: Callable[..., Secret], verify: Any) -> Any:
        return toolpool.auth.Bearer(lambda ctx: pick(ctx).reveal())


class _ApiKey(_Auth):
    secret_name, needs = "key", _needs("key")
    type: Literal["api_key"]
    secret: Secret | None = None
    header: _Header = "X-API-Key"
    scheme: _Text | None = None
    tenants: dict[_Tenant, _Key] = {}

    def provider(self, pick: Callable[..., Secret], verify: Any) -> Any:
        return toolpool.auth.ApiKey(
            lambda ctx: pick(ctx).reveal(), header=self.header, scheme=self.scheme
        )


class _TokenEndpoint(_Auth):
    """What `oauth2_client_credentials` and `token_exchange` share: the token endpoint, and
    the service's client at it (one for all tenants, or one per tenant)."""

    secret_name, what = "client_secret", "client credentials are"
    token_url: _Text
    scope: _Text | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    client_id: _Text | None = None
    secret: Secret | None = None
    tenants: dict[_Tenant, _Client] = {}

    def credential(self, table: Any) -> Any:
        return (table.client_id, table.secret) if table.secret is not None else None

    def check(self) -> None:
        if self.secret is not None and self.client_id is None:
            raise _fault("is required next to client_secret_env/_file", "client_id")
        if self.secret is None and self.client_id is not None:
            raise _fault('needs client_secret_env = "VARIABLE" or client_secret_file = "PATH"')

    def probe(self) -> None:
        try:  # the provider checks the rest
            self.provider(lambda ctx: ("probe", Secret("probe", "probe")), None)
        except ConfigError as exc:
            raise _fault(str(exc), "token_url") from None

    def client(self, pick: Callable[..., tuple[str, Secret]]) -> Any:
        """The provider's `client_credentials(ctx)`; None without any client."""
        if self.secret is None and not self.tenants:
            return None

        def client(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
            client_id, secret = pick(ctx)
            return client_id, secret.reveal()

        return client


class _OAuth2ClientCredentials(_TokenEndpoint):
    needs = "needs client_id + client_secret_env/_file, or [.tenants.NAME] tables"
    type: Literal["oauth2_client_credentials"]

    def provider(self, pick: Callable[..., tuple[str, Secret]], verify: Any) -> Any:
        return toolpool.auth.OAuth2ClientCredentials(
            self.token_url, self.client(pick), scope=self.scope, auth_method=self.auth_method
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

    def provider(self, pick: Callable[..., tuple[str, Secret]], verify: Any) -> Any:
        names = ("audience", "resource", "scope", "requested_token_type", "subject_token_type")
        given = {k: getattr(self, k) for k in names if getattr(self, k)}
        return toolpool.auth.TokenExchange(
            self.token_url,
            client_credentials=self.client(pick),
            auth_method=self.auth_method,
            **given,
        )


class _MutualTLS(_Auth):
    what = "client certificate is"
    needs = "needs cert = [cert, key] or [.tenants.NAME] cert = [...]"
    type: Literal["mtls"]
    cert: _Cert | None = None
    tenants: dict[_Tenant, _CertFiles] = {}

    def credential(self, table: Any) -> Any:
        return table.cert

    def provider(self, pick: Callable[..., Any], verify: Any) -> Any:
        verify = verify if isinstance(verify, bool | str) else None
        return toolpool.auth.MutualTLS(pick, verify=verify)


class _Destination(_Table):
    # Destination's own options, as written: Destination checks them.
    passed_on = {f.name for f in dataclasses.fields(toolpool.Destination) if f.init} - {
        *("name", "url", "auth", "warmup_contexts"),
    }
    url: _Text
    verify: _Verify | None = None
    cert: _Cert | None = None
    policy: _Policy = None
    read_timeout: _Seconds = 60.0
    write_timeout: _Seconds = 30.0
    forward_tenant_as: (
        Annotated[
            str,
            _must(
                "must be an HTTP header name, got {}",
                lambda v: _nonempty(v) and re.match(_HEADER_NAME, v),
            ),
        ]
        | None
    ) = None
    auth: (
        Annotated[
            _Bearer | _ApiKey | _OAuth2ClientCredentials | _TokenExchange | _MutualTLS,
            Field(discriminator="type"),
        ]
        | None
    ) = None


class _Pool(_Table):
    # PoolDefaults's own options, as written: PoolDefaults checks them.
    passed_on = {f.name for f in dataclasses.fields(toolpool.PoolDefaults)} - {
        *("unknown_destinations", "egress"),
    }
    refused = {
        "unknown_destinations": "the service only ever reaches listed destinations (an open "
        "proxy is refused); remove this key"
    }
    verify: _Verify | None = None
    policy: _Policy = None


class _Agent(_Table):
    secret_name = "token"
    secret: Secret | None = None
    token_sha256: (
        Annotated[
            str,
            _must(
                "must be 64 hex digits (sha256sum of the token)",
                lambda v: _nonempty(v) and re.fullmatch("[0-9a-fA-F]{64}", v),
            ),
        ]
        | None
    ) = None
    tenants: tuple[Annotated[str, Field(strict=True, min_length=1, pattern=_AGENT_TENANT)], ...]

    @model_validator(mode="after")
    def _one_token(self) -> typing.Self:
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
        return self

    def config(self, name: str) -> AgentConfig:
        token = self.secret.reveal().encode() if self.secret is not None else None
        digest = hashlib.sha256(token).digest() if token else bytes.fromhex(self.token_sha256 or "")
        return AgentConfig(name, digest, None if "*" in self.tenants else frozenset(self.tenants))


class _Document(_Table):
    service: ServiceSettings = Field(default_factory=ServiceSettings)
    pool: _Pool = Field(default_factory=_Pool)
    limits: dict[str, Any] = {}
    destinations: dict[_Name, _Destination] = {}
    agents: dict[_Name, _Agent] = {}

    @pydantic.field_validator("service", mode="before")
    @classmethod
    def _service_keys(cls, value: Any) -> Any:
        known = {f.name for f in dataclasses.fields(ServiceSettings)}
        for key in value if isinstance(value, dict) else ():
            if key not in known:
                raise _fault(_unknown(key, known), key)
        return value

    @pydantic.field_validator("service")
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
    doc = _Doc(source, _lines(text), os.environ if env is None else env, base or Path.cwd())
    try:
        tables = _Document.model_validate(data, context=doc)
    except pydantic.ValidationError as exc:
        raise doc.located(data, exc) from None
    pool = tables.pool.options
    doc.make(("pool",), pool, lambda: toolpool.PoolDefaults(**pool))
    limit = _limit(doc, tables.limits)
    if not tables.destinations:
        raise doc.error(
            ("destinations",), "lists no destination; add [destinations.NAME] url = ..."
        )
    destinations = {
        n: _destination(doc, n, t, tables.service.egress) for n, t in tables.destinations.items()
    }
    if not tables.agents:
        raise doc.error(("agents",), "lists no agent; add [agents.NAME] token_env = ...")
    agents: dict[str, AgentConfig] = {}
    for name, t in tables.agents.items():
        agents[name] = agent = t.config(name)
        other = next(a for a in agents.values() if a.token_sha256 == agent.token_sha256)
        if other is not agent:
            raise doc.error(
                ("agents", name),
                f"has the same token as agent {other.name!r}; give each agent its own token",
            )
    return ServiceConfig(source, tables.service, pool, destinations, agents, limit)


def _destination(
    doc: _Doc, name: str, t: _Destination, egress: toolpool.Egress
) -> DestinationConfig:
    where = ("destinations", name)
    try:
        url = toolpool.Destination(name, t.url).origin[1]
    except ConfigError as exc:
        raise doc.error((*where, "url"), str(exc)) from None
    if (why := forbidden_address(url, egress)) is not None:
        raise doc.error(
            (*where, "url"),
            f"{t.url!r} is refused by the egress policy: {why}; the service never proxies there "
            f"(a range you run services in can be allowed by address in [service.egress] allow)",
        )
    options = t.options
    spec = doc.make(where, options, lambda: toolpool.Destination(name, t.url, **options))
    auth = t.auth.config(name, options.get("verify")) if t.auth is not None else None
    return DestinationConfig(spec, auth, t.read_timeout, t.write_timeout, t.forward_tenant_as)


def _limit(doc: _Doc, table: Mapping[str, Any]) -> GlobalLimit:
    options = dict(table)
    provider = options.pop("provider", None)
    if provider is None:
        for key in set(options) - {"replicas"}:
            raise doc.error(("limits", key), _unknown(key, ("provider", "replicas")))
        return doc.make(("limits",), options, lambda: StaticShare(**options))  # type: ignore[no-any-return]
    provider = "toolpool.fleet:RedisFleet" if provider == "redis" else provider
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
    except Exception as exc:
        detail = (
            str(exc) if isinstance(exc, ConfigError) else f"{provider}(**options) failed: {exc}"
        )
        raise doc.error(where, detail) from None
    for method in ("replica_cap", "hold"):
        if not callable(getattr(limit, method, None)):
            raise doc.error(where, f"{provider} returned an object without {method}()")
    return limit  # type: ignore[no-any-return]
