"""Loading `toolpool serve`'s TOML configuration (`examples/toolpool.toml` documents every key):

    [service]            where to listen, limits on bodies, drain deadline, allowed Host names
    [pool]               pool-wide defaults (the `toolpool.Pool` keyword arguments)
    [limits]             how this replica's share of each destination's cap is found
    [destinations.NAME]  one allowlisted downstream: url, limits, timeouts, [.auth]
    [agents.NAME]        one agent: how it authenticates to the service, tenants it may act for

The tables are pydantic models read by `service._toml` (errors name the file, the line and the
key, and say what to write instead; secrets come from environment variables or files). What
toolpool's constructors check (`Destination`, `PoolDefaults`, `Egress`, the auth providers, the
limit) goes to them as written, so theirs is the only check.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import pydantic
from pydantic import (
    AfterValidator,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationInfo,
    model_validator,
)

import toolpool
from toolpool import resilience
from toolpool.errors import ConfigError
from toolpool.service import _toml
from toolpool.service._limits import GlobalLimit, StaticShare
from toolpool.service._toml import Document, Secret, Table, fault

# Names that appear in URLs (/d/<name>/...) and metric labels: plain, bounded characters.
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Tenants travel in a header and key connections: printable, no separators that could smuggle.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@+-]{0,127}$")
_HEADER_NAME = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"


def forbidden_address(host: str, egress: toolpool.Egress | None = None) -> str | None:
    """Why `host` may never be a destination under `egress` (default: `toolpool.Egress()`,
    which refuses metadata, link-local, unspecified and multicast addresses and metadata host
    names, in any spelling), or None. Applied to every configured destination when the
    config is loaded; the same policy is applied again to the resolved address of every
    connect while the service runs."""
    return (egress if egress is not None else toolpool.Egress()).check_host(host)


def _verify(value: Any, info: ValidationInfo) -> bool | str:
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"must be true, false or a CA bundle path, got {_toml.shown(value)}")
    return _toml.path("any", "CA bundle {} does not exist; fix the path")(value, info)


def _cert(value: Any, info: ValidationInfo) -> str | tuple[str, str]:
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not 0 < len(paths) < 3 or any(map(_toml.text_error, paths)):
        raise ConfigError("must be a PEM path or [cert_path, key_path]")
    found = [_toml.path("any", "{} does not exist; fix the path")(p, info) for p in paths]
    return found[0] if len(found) == 1 else (found[0], found[1])


# policy = "default" (toolpool.resilience's default policy), "off" (no retries, breaker, rate
# or adaptive limit; admission kept) or "none" (no resilience layer).
_POLICIES: dict[str, Callable[[], Any]] = {
    "default": resilience.Policy,
    "off": resilience.Policy.off,
    "none": lambda: None,
}


def _egress(value: Any) -> toolpool.Egress:
    """`[service.egress]`: `deny` and `allow` lists of networks and host names."""
    if not isinstance(value, dict):
        raise ConfigError("must be a table ([service.egress])")
    if "deny_unknown" in value:
        why = "every destination of the service is listed, so deny_unknown would never apply"
        raise fault(f"{why}; use deny (and allow for the exceptions)", "deny_unknown")
    for key, entries in _toml.only(value, ("allow", "deny")).items():
        try:
            toolpool.Egress(**{key: _toml.strings(entries)})  # type: ignore[arg-type]
        except ConfigError as exc:  # "Egress(deny=...): why"
            raise fault(str(exc).split("): ", 1)[-1], key) from None
    return toolpool.Egress(**value)


_Text = Annotated[str, _toml.text()]
_Seconds = Annotated[
    float, _toml.must("must be a finite number > 0, got {}", lambda v: _toml.number(v, 0) and v)
]
_Wait = Annotated[
    float, _toml.must("must be a finite number >= 0, got {}", lambda v: _toml.number(v, 0))
]
_Size = Annotated[
    int, _toml.must("must be a whole number >= 0, got {}", lambda v: _toml.number(v, 0, whole=True))
]
_Port = Annotated[
    _Size, _toml.must("must be a TCP port 0..65535, got {}", lambda v: v < 65536, AfterValidator)
]
_Header = Annotated[str, _toml.text(_HEADER_NAME, "{} is not a valid HTTP header name")]
_Forward = Annotated[
    str, _toml.text(_HEADER_NAME, "must be an HTTP header name, got {}", says_all=True)
]
_Tenant = Annotated[str, _toml.text(TENANT_PATTERN.pattern, "{} is not a valid tenant name")]
_Tenants = Annotated[
    tuple[str, ...], _toml.texts(rf"^\*$|{TENANT_PATTERN.pattern}", "{} is not a valid tenant name")
]
_Digest = Annotated[
    str,
    _toml.text(
        "^[0-9a-fA-F]{64}$", "must be 64 hex digits (sha256sum of the token)", says_all=True
    ),
]
_NAMES = "{} names use letters, digits, '_', '.', '-' (got {{}})"
_DestName = Annotated[str, _toml.text(_NAME, _NAMES.format("destination"))]
_AgentName = Annotated[str, _toml.text(_NAME, _NAMES.format("agent"))]
_Hosts = Annotated[
    tuple[str, ...], _toml.texts(), AfterValidator(lambda v: tuple(map(str.lower, v)))
]
_Cert = Annotated[str | tuple[str, str], PlainValidator(_cert)]
_Verify = Annotated[bool | str, PlainValidator(_verify)]
_Policy = Annotated[Any, _toml.one_of(_POLICIES)]
_File = Annotated[str, PlainValidator(_toml.path())]
_Egress = Annotated[toolpool.Egress, PlainValidator(_egress)]


@dataclass(frozen=True)
class ServiceSettings:
    """`[service]`: how the service listens and what it accepts."""

    # Loopback by default: a sidecar is reached only from its own host; bind 0.0.0.0
    # deliberately for a central service.
    host: _Text = "127.0.0.1"
    # An unassigned port near the metrics port family; 0 picks a free one.
    port: _Port = 8780
    # In-flight requests get this long to finish after SIGTERM (Kubernetes' default grace
    # period is 30 s; leave a few seconds for the pool to close).
    drain_timeout: _Seconds = 25.0
    # Tool payloads are small; 10 MiB stops accidental uploads without hurting real ones.
    max_request_body: _Size = 10 * 1024 * 1024
    # Downloads through a tool rarely exceed this; larger answers fail as 502.
    max_response_body: _Size = 100 * 1024 * 1024
    # Host header values the service answers to; empty: any (it never routes by Host).
    allowed_hosts: _Hosts = ()
    # The header in which an agent names the tenant it acts for.
    tenant_header: _Header = "X-Toolpool-Tenant"
    # One JSON line per request on logger toolpool.service.access (no secrets, no query).
    access_log: pydantic.StrictBool = True
    # Serve /metrics (Prometheus exposition of the pool and the service).
    metrics: pydantic.StrictBool = True
    # The service is ready (/readyz) when warm-up finished or after this long, whichever
    # comes first: a downstream that is down must not keep the others from being served.
    warmup_timeout: _Wait = 10.0
    # HTTPS for agents (certificate and key PEM paths); plain HTTP when unset, which is right
    # for a loopback sidecar only: agent tokens must not cross a network in clear text.
    tls_cert_file: _File | None = None
    tls_key_file: _File | None = None
    # `[service.egress]`: checked on the resolved address of every connect (the default
    # refuses cloud metadata, link-local, unspecified and multicast addresses).
    egress: _Egress = field(default_factory=toolpool.Egress)
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


class _Secreted(Table):
    secret: Secret | None = None


class _Token(_Secreted):
    secret_name = "token"
    secret_required = True


class _Key(_Secreted):
    secret_name = "key"
    secret_required = True


class _Client(_Secreted):
    secret_name = "client_secret"
    secret_required = True
    client_id: _Text


class _CertFiles(Table):
    cert: _Cert = Field(None, validate_default=True)


class AuthConfig(_Secreted):
    """`[destinations.NAME.auth]`: the downstream credentials the service applies, one for all
    tenants or one per tenant (`tenants`). `make()` builds a fresh `toolpool.auth` provider
    (one per pool, as providers require), given `pick(ctx)`, the credential of the context's
    tenant (else the shared one), secrets revealed."""

    what: ClassVar[str] = "credential is"  # "no <what> configured for this tenant"
    needs: ClassVar[str] = (  # the error when there is no credential at all ("": fine)
        "needs {0}_env / {0}_file (one credential for all tenants) or [.tenants.NAME] tables "
        "with {0}_env / {0}_file"
    )
    type: str
    tenants: Mapping[_Tenant, Any] = {}
    _dest: str = PrivateAttr("")  # the destination's name and verify, set with it
    _verify: Any = PrivateAttr(None)

    def credential(self, table: Any) -> Any:
        """The credential of a table (this one or a tenant's), or None."""
        return table.secret

    def check(self) -> None:
        """The kind's own checks, before the count of credentials."""

    def provider(self, pick: Callable[..., Any]) -> Any:
        raise NotImplementedError

    @model_validator(mode="after")
    def _some(self) -> Self:
        self.check()
        if self.needs and self.credential(self) is None and not self.tenants:
            raise fault(self.needs.format(self.secret_name))
        return self

    @property
    def kind(self) -> str:
        return self.type

    @property
    def shared(self) -> bool:
        """True if every tenant is served (one credential for all, or none needed)."""
        return self.credential(self) is not None or not (self.tenants or self.needs)

    def serves(self, tenant: str) -> bool:
        """True if requests of `tenant` can get credentials for this destination."""
        return self.shared or tenant in self.tenants

    def make(self) -> Any:
        return self.provider(self.pick)

    def pick(self, ctx: toolpool.AuthContext | None) -> Any:
        table = self.tenants.get(ctx.tenant) if ctx is not None and ctx.tenant else None
        if (found := self.credential(self if table is None else table)) is None:
            error = TypeError if self.type == "mtls" else toolpool.auth.TokenFailure
            raise error(f"no {self.what} configured for this tenant at {self._dest!r}")
        return _toml.reveal(found)


class _Bearer(AuthConfig):
    secret_name = "token"
    type: Literal["bearer"]
    tenants: Mapping[_Tenant, _Token] = {}

    def provider(self, pick: Callable[..., Any]) -> Any:
        return toolpool.auth.Bearer(pick)


class _ApiKey(AuthConfig):
    secret_name = "key"
    type: Literal["api_key"]
    header: _Header = "X-API-Key"
    scheme: _Text | None = None
    tenants: Mapping[_Tenant, _Key] = {}

    def provider(self, pick: Callable[..., Any]) -> Any:
        return toolpool.auth.ApiKey(pick, header=self.header, scheme=self.scheme)


class _TokenEndpoint(AuthConfig):
    """What `oauth2_client_credentials` and `token_exchange` share: the token endpoint, and
    the service's client at it (one for all tenants, or one per tenant)."""

    secret_name = "client_secret"
    what = "client credentials are"
    token_url: _Text
    scope: _Text | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = "client_secret_basic"
    client_id: _Text | None = None
    tenants: Mapping[_Tenant, _Client] = {}

    def credential(self, table: Any) -> Any:
        return (table.client_id, table.secret) if table.secret is not None else None

    def check(self) -> None:
        if self.secret is not None and self.client_id is None:
            raise fault("is required next to client_secret_env/_file", "client_id")
        if self.secret is None and self.client_id is not None:
            raise fault('needs client_secret_env = "VARIABLE" or client_secret_file = "PATH"')

    @model_validator(mode="after")
    def _provider(self) -> Self:
        try:  # the provider checks the rest
            self.provider(lambda ctx: ("probe", "probe"))
        except ConfigError as exc:
            raise fault(str(exc), "token_url") from None
        return self


class _OAuth2ClientCredentials(_TokenEndpoint):
    needs = "needs client_id + client_secret_env/_file, or [.tenants.NAME] tables"
    type: Literal["oauth2_client_credentials"]

    def provider(self, pick: Callable[..., Any]) -> Any:
        return toolpool.auth.OAuth2ClientCredentials(
            self.token_url, pick, scope=self.scope, auth_method=self.auth_method
        )


class _TokenExchange(_TokenEndpoint):
    """`type = "token_exchange"` (RFC 8693): the user's token, sent by the agent in the
    `[service] subject_token_header` header, exchanged at `token_url` for a token for this
    destination; the service authenticates to the token endpoint with `client_id` +
    `client_secret_env/_file` (shared or per tenant), or not at all when neither is given."""

    needs = ""
    type: Literal["token_exchange"]
    audience: _Text | None = None
    resource: _Text | None = None
    requested_token_type: _Text | None = None
    subject_token_type: _Text | None = None

    def provider(self, pick: Callable[..., Any]) -> Any:
        names = ("audience", "resource", "scope", "requested_token_type", "subject_token_type")
        given = {k: getattr(self, k) for k in names if getattr(self, k)}
        client = pick if self.secret is not None or self.tenants else None
        return toolpool.auth.TokenExchange(
            self.token_url, client_credentials=client, auth_method=self.auth_method, **given
        )


class _MutualTLS(AuthConfig):
    what = "client certificate is"
    needs = "needs cert = [cert, key] or [.tenants.NAME] cert = [...]"
    type: Literal["mtls"]
    cert: _Cert | None = None
    tenants: Mapping[_Tenant, _CertFiles] = {}

    def credential(self, table: Any) -> Any:
        return table.cert

    def provider(self, pick: Callable[..., Any]) -> Any:
        return toolpool.auth.MutualTLS(pick, verify=self._verify)


class DestinationConfig(Table):
    """`[destinations.NAME]`: one allowlisted downstream and how requests to it are sent."""

    # Destination's own options (pydantic reads verify, cert and policy first).
    passed_on = {f.name for f in dataclasses.fields(toolpool.Destination) if f.init} - {
        *("name", "url", "auth", "warmup_contexts"),
    }
    url: _Text
    verify: _Verify | None = None
    cert: _Cert | None = None
    policy: _Policy = None
    # A read timeout per response chunk: downstream tools can be slow, not silent forever.
    read_timeout: _Seconds = 60.0
    write_timeout: _Seconds = 30.0
    # Header in which the downstream is told the tenant (the agent's own is replaced).
    forward_tenant_as: _Forward | None = None
    auth: (
        Annotated[
            _Bearer | _ApiKey | _OAuth2ClientCredentials | _TokenExchange | _MutualTLS,
            Field(discriminator="type"),
        ]
        | None
    ) = None
    # The checked destination without auth (set when the document is read); its cap is the
    # fleet-wide one (each pool gets this replica's share of it from the GlobalLimit).
    _spec: toolpool.Destination | None = PrivateAttr(None)

    def check(self, doc: Document, name: str, egress: toolpool.Egress) -> Self:
        """Checked by `toolpool.Destination` and `egress` (which need the name)."""
        where = ("destinations", name)
        try:
            host = toolpool.Destination(name, self.url).origin[1]
        except ConfigError as exc:
            raise doc.error((*where, "url"), str(exc)) from None
        if (why := forbidden_address(host, egress)) is not None:
            raise doc.error(
                (*where, "url"),
                f"{self.url!r} is refused by the egress policy: {why}; the service never proxies "
                f"there (a range you run services in can be allowed by address in "
                f"[service.egress] allow)",
            )
        options = self.options
        self._spec = doc.make(
            where, options, lambda: toolpool.Destination(name, self.url, **options)
        )
        if self.auth is not None:
            self.auth._dest = name
            self.auth._verify = options.get("verify")
        return self

    @property
    def spec(self) -> toolpool.Destination:
        assert self._spec is not None, "a DestinationConfig is checked when the document is read"
        return self._spec

    @property
    def name(self) -> str:
        return self.spec.name

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


class _Pool(Table):
    # PoolDefaults's own options (pydantic reads verify and policy first).
    passed_on = {f.name for f in dataclasses.fields(toolpool.PoolDefaults)} - {
        *("unknown_destinations", "egress"),
    }
    refused: ClassVar[Mapping[str, str]] = {
        "unknown_destinations": "the service only ever reaches listed destinations (an open "
        "proxy is refused); remove this key"
    }
    verify: _Verify | None = None
    policy: _Policy = None


class _Agent(Table):
    secret_name = "token"
    secret: Secret | None = None
    token_sha256: _Digest | None = None
    tenants: Annotated[
        _Tenants,
        _toml.must(
            'lists no tenant; list the tenants this agent acts for, or ["*"]', bool, AfterValidator
        ),
    ]

    @model_validator(mode="after")
    def _one_token(self) -> Self:
        if self.token_sha256 is not None and self.secret is not None:
            raise fault("give token_sha256 or token_env/token_file, not both", "token_sha256")
        if self.token_sha256 is None and self.secret is None:
            raise fault('needs token_env = "VARIABLE" or token_file = "PATH"')
        if self.secret is not None and len(self.secret.reveal()) < 16:
            raise fault(
                "the agent token is shorter than 16 characters; use a random one "
                "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
                "token_env" if self.secret.source.startswith("$") else "token_file",
            )
        return self

    def config(self, name: str) -> AgentConfig:
        token = self.secret.reveal().encode() if self.secret is not None else None
        digest = hashlib.sha256(token).digest() if token else bytes.fromhex(self.token_sha256 or "")
        return AgentConfig(name, digest, None if "*" in self.tenants else frozenset(self.tenants))


class _Document(Table):
    service: Annotated[ServiceSettings, _toml.keys_of(ServiceSettings)] = Field(
        default_factory=ServiceSettings
    )
    pool: _Pool = Field(default_factory=_Pool)
    limits: Mapping[str, Any] = {}
    destinations: Mapping[_DestName, DestinationConfig] = {}
    agents: Mapping[_AgentName, _Agent] = {}

    @pydantic.field_validator("service")
    @classmethod
    def _service_pairs(cls, s: ServiceSettings) -> ServiceSettings:
        if s.subject_token_header.lower() == s.tenant_header.lower():
            raise fault("must differ from tenant_header", "subject_token_header")
        if (s.tls_cert_file is None) != (s.tls_key_file is None):
            raise fault("give tls_cert_file and tls_key_file together", "tls_cert_file")
        return s


# ---------------------------------------------------------------------------- loading


def load_config(
    path: str | os.PathLike[str], env: Mapping[str, str] | None = None
) -> ServiceConfig:
    """Read and validate a TOML config file; `ConfigError` says the line and what to fix.

    Secrets (`*_env`, `*_file`) are read now from `env` (default: the process environment),
    so a missing one stops the service at start, not at its first request.
    """
    return _config(Document.load(path, env))


def parse_config(
    text: str,
    *,
    source: str = "<config>",
    env: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> ServiceConfig:
    """Validate TOML text (see `load_config`)."""
    return _config(Document(source, text, os.environ if env is None else env, base or Path.cwd()))


def _config(doc: Document) -> ServiceConfig:
    tables = doc.read(_Document)
    pool = tables.pool.options
    doc.make(("pool",), pool, lambda: toolpool.PoolDefaults(**pool))
    limit = _limit(doc, tables.limits)
    if not tables.destinations:
        raise doc.error(
            ("destinations",), "lists no destination; add [destinations.NAME] url = ..."
        )
    destinations = {
        n: t.check(doc, n, tables.service.egress) for n, t in tables.destinations.items()
    }
    if not tables.agents:
        raise doc.error(("agents",), "lists no agent; add [agents.NAME] token_env = ...")
    agents: dict[str, AgentConfig] = {}
    for name, t in tables.agents.items():
        agents[name] = agent = t.config(name)
        other = next(a for a in agents.values() if a.token_sha256 == agent.token_sha256)
        if other is not agent:
            why = f"has the same token as agent {other.name!r}; give each agent its own token"
            raise doc.error(("agents", name), why)
    return ServiceConfig(doc.source, tables.service, pool, destinations, agents, limit)


_PROVIDER = "must be 'redis' or 'package.module:factory'"


def _limit(doc: Document, table: Mapping[str, Any]) -> GlobalLimit:
    options = dict(table)
    if (provider := options.pop("provider", None)) is None:
        for key in set(options) - {"replicas"}:
            raise doc.error(("limits", key), _toml.unknown(key, ("provider", "replicas")))
        return doc.make(("limits",), options, lambda: StaticShare(**options))
    if provider in ("redis", "toolpool.fleet:RedisFleet"):
        provider = "toolpool.fleet:RedisFleet"
        options["env"] = doc.env  # the URL and fleet key are read from the config's env
    try:
        limit: GlobalLimit = _toml.plugin(provider, options, ("replica_cap", "hold"), _PROVIDER)
        return limit
    except ConfigError as exc:
        raise doc.error(("limits", "provider"), str(exc)) from None
