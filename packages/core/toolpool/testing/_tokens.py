"""The identity provider of the test bed: registered clients, subject tokens, issued tokens.

Tokens are opaque random strings; secrets and tokens never appear in a repr or a log line.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Identity:
    """Who a token speaks for: a tenant, optionally a user (subject) and the OAuth client."""

    tenant: str | None
    subject: str | None = None
    client_id: str | None = None


@dataclass(frozen=True)
class _Client:
    client_id: str
    secret: str = field(repr=False)
    tenant: str


class SubjectTokens:
    """Opaque subject tokens for RFC 8693 token exchange, accepted by every service."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, Identity] = {}

    def mint(self, tenant: str, subject: str) -> str:
        """A new subject token that stands for user ``subject`` of ``tenant``."""
        token = "tb-subject-" + secrets.token_urlsafe(18)
        with self._lock:
            self._tokens[token] = Identity(tenant=tenant, subject=subject)
        return token

    def lookup(self, token: str) -> Identity | None:
        with self._lock:
            return self._tokens.get(token)


class TokenIssuer:
    """One service's clients and the access tokens it issued (valid on that service only)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[str, _Client] = {}
        self._tokens: dict[str, tuple[Identity, float]] = {}

    def register_client(self, client_id: str, client_secret: str, tenant: str) -> None:
        """Accept ``client_id``/``client_secret`` for client credentials; tokens get ``tenant``."""
        if not client_id or not tenant:
            raise ValueError("client_id and tenant must be non-empty")
        with self._lock:
            self._clients[client_id] = _Client(client_id, client_secret, tenant)

    def authenticate(self, client_id: str, client_secret: str) -> Identity | None:
        """The client's identity, or ``None`` for an unknown client or a wrong secret."""
        with self._lock:
            client = self._clients.get(client_id)
        if client is None or not hmac.compare_digest(
            client.secret.encode(), client_secret.encode()
        ):
            return None
        return Identity(tenant=client.tenant, client_id=client.client_id)

    def issue(self, identity: Identity, ttl: float) -> str:
        token = "tb-access-" + secrets.token_urlsafe(24)
        with self._lock:
            self._tokens[token] = (identity, time.monotonic() + ttl)
        return token

    def validate(self, token: str) -> Identity | None:
        """The identity of a live token issued here; ``None`` if unknown, expired or revoked."""
        with self._lock:
            entry = self._tokens.get(token)
            if entry is None:
                return None
            identity, expires_at = entry
            if time.monotonic() >= expires_at:
                del self._tokens[token]
                return None
            return identity

    def revoke(self, tenant: str | None = None) -> int:
        """Revoke every token (or every token of ``tenant``); return how many."""
        with self._lock:
            doomed = [
                t
                for t, (ident, _) in self._tokens.items()
                if tenant is None or ident.tenant == tenant
            ]
            for token in doomed:
                del self._tokens[token]
            return len(doomed)
