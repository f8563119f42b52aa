"""The provider protocol (`TokenProvider`) and the static/callable providers `Bearer` and
`ApiKey`.

A provider only says *what* credential a context has, without doing I/O: it returns a
`Credential` it can compute itself, or the `httpx.Request` that obtains one from a token
endpoint plus a parser for the answer. The registry (`auth/_header.py`) does the caching,
single-flight, refresh and sending, the same for sync and async requests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from toolpool._auth_context import AuthContext
from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.errors import ConfigError

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["ApiKey", "Bearer", "TokenFailure", "TokenProvider"]

#: What `TokenProvider.credential` returns: a credential (a bare str is a bearer token), or a
#: token request for the registry to send.
CredentialStep = Credential | str | httpx.Request
#: A static secret, or a function of the auth context returning one.
SecretSource = str | Credential | Callable[[AuthContext | None], str | Credential]


class TokenFailure(Exception):
    """Raised by a provider's `token_response` when the answer holds no credential.

    `detail` must be secret-free: it becomes the `toolpool.AuthError` message. `retry_after`
    (seconds) extends the negative cache, e.g. from a 429's Retry-After.
    """

    def __init__(self, detail: str, retry_after: float = 0.0) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class TokenProvider:
    """Base class of providers that authenticate requests with a header: the provider protocol.

    Implement `credential(ctx)`, returning either

    - a `Credential` (or a str, sent as `Authorization: Bearer <str>`) computed locally, or
    - an `httpx.Request` to a token endpoint: the registry sends it through the pool as a
      request of `ctx` and passes the response to `token_response(ctx, response)` (the default
      parses an OAuth 2 token response).

    Neither method does I/O, so one implementation serves sync and async requests; the
    registry caches the result per (destination, context), refreshes it ahead of `expires_in`,
    fetches it once for concurrent requests, and retries once after a 401.

    ```python
    class SignedJwt(toolpool.auth.TokenProvider):
        def credential(self, ctx):
            return toolpool.auth.Credential(sign(ctx.tenant), expires_in=300)

    toolpool.Destination("crm", "https://crm.internal", auth=SignedJwt())
    ```

    `shared_identity`: True if requests made outside any `toolpool.auth_context` may use
    `credential(None)`; otherwise they fail with `toolpool.AuthError`. One provider object
    serves one destination: a credential is only ever sent to the destination it is for.
    """

    #: Requests with no auth context may use `credential(None)`.
    shared_identity: bool = False

    def __init__(self, *, policy: TokenPolicy | None = None) -> None:
        if policy is not None and not isinstance(policy, TokenPolicy):
            raise ConfigError(
                f"policy must be a toolpool.auth.TokenPolicy, not {type(policy).__name__}"
            )
        self.policy = policy if policy is not None else TokenPolicy()
        self._runtime: Any = None

    def credential(self, ctx: AuthContext | None) -> CredentialStep:
        """The context's credential, or the token request that obtains it (no I/O here)."""
        raise NotImplementedError(f"{type(self).__name__} must implement credential(ctx)")

    def token_response(self, ctx: AuthContext | None, response: httpx.Response) -> Credential:
        """The credential in a token endpoint's answer (already read); raise `TokenFailure`
        when there is none. The default reads an OAuth 2 access token response (RFC 6749)."""
        from toolpool.auth._oauth import parse_token_response

        return parse_token_response(response)

    @property
    def runtime(self) -> Any:
        """The run-time registry of the destination this provider is bound to (or None)."""
        return self._runtime


def _check_unbound(provider: Any, dest: DestinationPool) -> None:
    current = provider._runtime
    if current is not None and not current.dest.pool.closed:
        raise ConfigError(
            f"this {type(provider).__name__} is already the auth provider of destination "
            f"{current.dest.name!r}; create one provider object per destination (so a "
            f"credential is only ever sent to the destination it is for), e.g. for "
            f"destination {dest.name!r}"
        )


def _check_source(name: str, value: object, what: str) -> None:
    if isinstance(value, str):
        if not value:
            raise ConfigError(f"{name}: the {what} must not be empty")
    elif not (isinstance(value, Credential) or callable(value)):
        raise ConfigError(
            f"{name}: the {what} must be a str, a toolpool.auth.Credential or a function "
            f"of the auth context, not {type(value).__name__}"
        )


def _shown(value: object) -> str:
    return "<callable>" if callable(value) and not isinstance(value, str) else "<redacted>"


class Bearer(TokenProvider):
    """`Authorization: Bearer <token>`: a static token, or one per auth context.

    ```python
    auth=toolpool.auth.Bearer("static-token")                       # also for no context
    auth=toolpool.auth.Bearer(lambda ctx: ctx.credentials["api_token"])
    auth=toolpool.auth.Bearer(lambda ctx: Credential(mint(ctx), expires_in=300))
    ```

    A function is called once per context and its result cached (until `expires_in`, if it
    returns a `Credential` with one, or until the destination answers 401). It runs on the
    request path, so it must be quick (no network I/O: use `TokenProvider` for that).
    """

    def __init__(self, token: SecretSource, *, policy: TokenPolicy | None = None) -> None:
        super().__init__(policy=policy)
        _check_source("Bearer", token, "token")
        self._token = token
        self.shared_identity = not callable(token)

    def credential(self, ctx: AuthContext | None) -> CredentialStep:
        token = self._token
        if callable(token):
            return _as_credential(token(ctx), "Bearer")
        return token

    def __repr__(self) -> str:
        return f"Bearer(token={_shown(self._token)})"


class ApiKey(TokenProvider):
    """An API key in a header (`X-API-Key` by default): static, or one per auth context.

    ```python
    auth=toolpool.auth.ApiKey(key="k-123")
    auth=toolpool.auth.ApiKey(header="X-Api-Token", key=lambda ctx: ctx.credentials["key"])
    ```
    """

    def __init__(
        self,
        key: SecretSource,
        *,
        header: str = "X-API-Key",
        scheme: str | None = None,
        policy: TokenPolicy | None = None,
    ) -> None:
        super().__init__(policy=policy)
        _check_source("ApiKey", key, "key")
        if not isinstance(header, str) or not header or not header.isascii():
            raise ConfigError(f"ApiKey header must be an ASCII header name, got {header!r}")
        self._key = key
        self.header = header
        self.scheme = scheme
        self.shared_identity = not callable(key)

    def credential(self, ctx: AuthContext | None) -> CredentialStep:
        key = self._key
        if callable(key):
            key = _as_credential(key(ctx), "ApiKey")
        if isinstance(key, Credential):
            return Credential(
                key.value, expires_in=key.expires_in, header=self.header, scheme=self.scheme
            )
        return Credential(key, header=self.header, scheme=self.scheme)

    def __repr__(self) -> str:
        return f"ApiKey(header={self.header!r}, key={_shown(self._key)})"


def _as_credential(value: object, who: str) -> Credential | str:
    if isinstance(value, Credential | str) and value:
        return value
    raise TypeError(
        f"the {who} function must return a non-empty str or a toolpool.auth.Credential, "
        f"not {type(value).__name__}"
    )
