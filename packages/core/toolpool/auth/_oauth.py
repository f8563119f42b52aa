"""OAuth 2 providers: client credentials (RFC 6749 §4.4) and token exchange (RFC 8693). They
build the token request and read the answer; the registry sends it through the pool."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable
from typing import Literal
from urllib.parse import quote_plus

import httpx

from toolpool._auth_context import AuthContext
from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.auth._providers import CredentialStep, TokenFailure, TokenProvider
from toolpool.errors import ConfigError

__all__ = ["OAuth2ClientCredentials", "TokenExchange", "parse_token_response"]

GRANT_CLIENT_CREDENTIALS = "client_credentials"
GRANT_TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TOKEN_TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"

#: A client id and secret, or a function of the auth context returning them.
ClientCredentials = tuple[str, str] | Callable[[AuthContext | None], tuple[str, str]]
AuthMethod = Literal["client_secret_basic", "client_secret_post"]

# OAuth error codes are short ASCII words; anything else is not repeated in messages.
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ACCEPTED_TOKEN_TYPES = frozenset({"bearer", "n_a"})


def _check_token_url(who: str, token_url: object) -> str:
    if not isinstance(token_url, str):
        raise ConfigError(f"{who}: token_url must be a URL string")
    try:
        url = httpx.URL(token_url)
    except Exception as exc:
        raise ConfigError(f"{who}: token_url {token_url!r} is not a valid URL ({exc})") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"{who}: token_url {token_url!r} must be an http:// or https:// URL")
    if url.userinfo:
        raise ConfigError(f"{who}: put the client credentials in credentials=, not in token_url")
    return token_url


def _check_client(who: str, credentials: object, *, optional: bool) -> None:
    if credentials is None and optional:
        return
    if callable(credentials):
        return
    if (
        isinstance(credentials, tuple)
        and len(credentials) == 2
        and all(isinstance(part, str) and part for part in credentials)
    ):
        return
    raise ConfigError(
        f"{who}: credentials must be a (client_id, client_secret) tuple of non-empty strings "
        f"or a function of the auth context returning one"
    )


def _check_method(who: str, auth_method: object) -> None:
    if auth_method not in ("client_secret_basic", "client_secret_post"):
        raise ConfigError(
            f"{who}: auth_method must be 'client_secret_basic' or 'client_secret_post', "
            f"not {auth_method!r}"
        )


def _resolve_client(credentials: ClientCredentials, ctx: AuthContext | None) -> tuple[str, str]:
    if not callable(credentials):
        return credentials
    value = credentials(ctx)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(part, str) and part for part in value)
    ):
        raise TokenFailure(
            "the credentials function must return a (client_id, client_secret) tuple of "
            f"non-empty strings, not {type(value).__name__}"
        )
    return value


def _token_request(
    token_url: str,
    form: dict[str, str],
    client: tuple[str, str] | None,
    auth_method: AuthMethod,
) -> httpx.Request:
    headers = {"Accept": "application/json"}
    if client is not None:
        client_id, secret = client
        if auth_method == "client_secret_basic":
            # RFC 6749 §2.3.1: both parts form-encoded before base64.
            pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            form = {**form, "client_id": client_id, "client_secret": secret}
    return httpx.Request("POST", token_url, data=form, headers=headers)


def _retry_after(response: httpx.Response) -> float:
    value = response.headers.get("retry-after")
    if value is None:
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        return 0.0
    return seconds if 0 <= seconds < math.inf else 0.0


def parse_token_response(response: httpx.Response) -> Credential:
    """The bearer credential in an OAuth 2 token response, or `TokenFailure` saying why not.

    Failure details name the HTTP status and the OAuth `error` code only; the body's other
    fields (which may echo request parameters) are never repeated.
    """
    status = response.status_code
    data: object = None
    try:
        data = response.json()
    except ValueError:
        data = None
    if status != 200:
        code = data.get("error") if isinstance(data, dict) else None
        shown = f" ({code})" if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
        raise TokenFailure(
            f"the token endpoint answered {status}{shown}",
            _retry_after(response) if status in (429, 503) else 0.0,
        )
    if not isinstance(data, dict):
        raise TokenFailure("the token endpoint answered 200 without a JSON object")
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenFailure("the token endpoint answered 200 without an access_token")
    token_type = data.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() not in _ACCEPTED_TOKEN_TYPES:
        shown = (
            token_type if isinstance(token_type, str) and _ERROR_CODE.fullmatch(token_type) else "?"
        )
        raise TokenFailure(f"the token endpoint issued a {shown!r} token; only Bearer is supported")
    expires_in = data.get("expires_in")
    lifetime: float | None = None
    if isinstance(expires_in, int | float | str) and not isinstance(expires_in, bool):
        try:
            lifetime = float(expires_in)
        except ValueError:
            lifetime = None
        if lifetime is not None and not (0 < lifetime < math.inf):
            lifetime = None
    try:
        return Credential(token, expires_in=lifetime)
    except ValueError:
        raise TokenFailure("the token endpoint issued a token with control characters") from None


class OAuth2ClientCredentials(TokenProvider):
    """OAuth 2 client credentials: a token per (destination, auth context), fetched through the
    pool from `token_url`, cached until shortly before it expires.

    ```python
    toolpool.Destination("crm", "https://crm.internal",
        auth=toolpool.auth.OAuth2ClientCredentials(
            token_url="https://crm.internal/oauth/token",
            credentials=lambda ctx: (ctx.credentials["id"], ctx.credentials["secret"]),
            scope="contacts:read"))
    ```

    `credentials`: a `(client_id, client_secret)` tuple (one identity for every context, also
    usable outside any auth context) or a function of the `AuthContext` returning one.
    `auth_method`: send them as HTTP Basic (`client_secret_basic`, the RFC's default) or in the
    form body (`client_secret_post`). `extra`: more form fields (e.g. `audience`).
    """

    def __init__(
        self,
        token_url: str,
        credentials: ClientCredentials,
        *,
        scope: str | None = None,
        auth_method: AuthMethod = "client_secret_basic",
        extra: dict[str, str] | None = None,
        policy: TokenPolicy | None = None,
    ) -> None:
        super().__init__(policy=policy)
        who = "OAuth2ClientCredentials"
        self.token_url = _check_token_url(who, token_url)
        _check_client(who, credentials, optional=False)
        _check_method(who, auth_method)
        self._credentials = credentials
        self.scope = scope
        self.auth_method: AuthMethod = auth_method
        self.extra = dict(extra or {})
        self.shared_identity = not callable(credentials)

    def credential(self, ctx: AuthContext | None) -> CredentialStep:
        form = {"grant_type": GRANT_CLIENT_CREDENTIALS, **self.extra}
        if self.scope:
            form["scope"] = self.scope
        client = _resolve_client(self._credentials, ctx)
        return _token_request(self.token_url, form, client, self.auth_method)

    def __repr__(self) -> str:
        shown = "<callable>" if callable(self._credentials) else "<redacted>"
        return (
            f"OAuth2ClientCredentials(token_url={self.token_url!r}, credentials={shown}, "
            f"scope={self.scope!r}, auth_method={self.auth_method!r})"
        )


def _default_subject_token(ctx: AuthContext | None) -> str:
    token = ctx.credentials.get("subject_token") if ctx is not None else None
    if not isinstance(token, str) or not token:
        raise TokenFailure(
            "the auth context has no credentials['subject_token']; create it with "
            "AuthContext(..., credentials={'subject_token': ...}) or give "
            "TokenExchange(subject_token=...)"
        )
    return token


class TokenExchange(TokenProvider):
    """OAuth 2 token exchange (RFC 8693): the context's subject token (e.g. the user's token
    from the agent's front door) exchanged at `token_url` for a token for this destination.

    ```python
    auth=toolpool.auth.TokenExchange(
        token_url="https://idp.internal/oauth/token",
        audience="crm",                           # default subject token:
    )                                             # ctx.credentials["subject_token"]
    ```

    `subject_token`: a function of the `AuthContext` returning the token to exchange.
    `client_credentials`: optional `(client_id, client_secret)` (or a function) authenticating
    this service to the token endpoint. Requires an auth context (the subject is the user).
    """

    def __init__(
        self,
        token_url: str,
        subject_token: Callable[[AuthContext | None], str] | None = None,
        *,
        subject_token_type: str = TOKEN_TYPE_ACCESS,
        audience: str | None = None,
        resource: str | None = None,
        scope: str | None = None,
        requested_token_type: str | None = None,
        client_credentials: ClientCredentials | None = None,
        auth_method: AuthMethod = "client_secret_basic",
        policy: TokenPolicy | None = None,
    ) -> None:
        super().__init__(policy=policy)
        who = "TokenExchange"
        self.token_url = _check_token_url(who, token_url)
        if subject_token is not None and not callable(subject_token):
            raise ConfigError(
                f"{who}: subject_token must be a function of the auth context returning the "
                f"token to exchange (a static subject token would be one user for everybody)"
            )
        _check_client(who, client_credentials, optional=True)
        _check_method(who, auth_method)
        self._subject_token = subject_token or _default_subject_token
        self.subject_token_type = subject_token_type
        self.audience = audience
        self.resource = resource
        self.scope = scope
        self.requested_token_type = requested_token_type
        self._client = client_credentials
        self.auth_method: AuthMethod = auth_method

    def credential(self, ctx: AuthContext | None) -> CredentialStep:
        subject = self._subject_token(ctx)
        if not isinstance(subject, str) or not subject:
            raise TokenFailure("the subject_token function returned no token")
        form = {
            "grant_type": GRANT_TOKEN_EXCHANGE,
            "subject_token": subject,
            "subject_token_type": self.subject_token_type,
        }
        for name in ("audience", "resource", "scope", "requested_token_type"):
            value = getattr(self, name)
            if value:
                form[name] = value
        client = None if self._client is None else _resolve_client(self._client, ctx)
        return _token_request(self.token_url, form, client, self.auth_method)

    def __repr__(self) -> str:
        return (
            f"TokenExchange(token_url={self.token_url!r}, audience={self.audience!r}, "
            f"resource={self.resource!r}, scope={self.scope!r}, "
            f"client_credentials={'<redacted>' if self._client is not None else None})"
        )
