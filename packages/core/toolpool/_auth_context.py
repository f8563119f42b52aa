"""Who a request acts for: the `AuthContext` and the context variable that carries it.

A connection that carried one context never carries another, so the context's
`fingerprint` is part of every pool key. The fingerprint is a salted digest: it identifies a
context inside this process without revealing its credentials, and it is safe to log.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["AuthContext", "auth_context", "current_auth"]

# A per-process salt keeps fingerprints from being matched against guessed credentials.
_SALT = os.urandom(16)


class AuthContext:
    """The identity a tool call acts for: tenant, subject (user) and credentials.

    Immutable and hashable. Two contexts with equal tenant, subject and credentials are the
    same identity and share connections; any difference gives them separate connections.
    `repr()` never shows credential values.

    >>> ctx = AuthContext(tenant="acme", subject="u1", credentials={"client_secret": "x"})
    >>> ctx
    AuthContext(tenant='acme', subject='u1', credentials=<1 redacted>)
    """

    __slots__ = ("_credentials", "_fingerprint", "_hash", "subject", "tenant")

    tenant: str | None
    subject: str | None
    _credentials: Mapping[str, Any]
    _fingerprint: str
    _hash: int

    def __init__(
        self,
        tenant: str | None = None,
        subject: str | None = None,
        credentials: Mapping[str, Any] | None = None,
    ) -> None:
        if tenant is not None and not isinstance(tenant, str):
            raise TypeError(
                f"AuthContext tenant must be a str or None, not {type(tenant).__name__}"
            )
        if subject is not None and not isinstance(subject, str):
            raise TypeError(
                f"AuthContext subject must be a str or None, not {type(subject).__name__}"
            )
        creds = dict(credentials or {})
        object.__setattr__(self, "tenant", tenant)
        object.__setattr__(self, "subject", subject)
        object.__setattr__(self, "_credentials", MappingProxyType(creds))
        digest = hashlib.sha256(_SALT)
        for part in (tenant, subject):
            digest.update(b"\x00" if part is None else b"\x01" + part.encode())
        for name in sorted(creds):
            digest.update(b"\x02" + name.encode() + b"\x03" + repr(creds[name]).encode())
        fingerprint = digest.hexdigest()[:24]
        object.__setattr__(self, "_fingerprint", fingerprint)
        object.__setattr__(self, "_hash", hash(fingerprint))

    @property
    def credentials(self) -> Mapping[str, Any]:
        """The context's credentials (read-only). Never logged or shown in `repr`."""
        return self._credentials

    @property
    def fingerprint(self) -> str:
        """A stable, secret-free identifier of this identity within this process."""
        return self._fingerprint

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("AuthContext is immutable; create a new one")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AuthContext):
            return NotImplemented
        return self._fingerprint == other._fingerprint

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return (
            f"AuthContext(tenant={self.tenant!r}, subject={self.subject!r}, "
            f"credentials=<{len(self._credentials)} redacted>)"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (AuthContext, (self.tenant, self.subject, dict(self._credentials)))

    @property
    def label(self) -> str:
        """A short human-readable name for messages: the tenant, else the subject."""
        if self.tenant is not None:
            return self.tenant
        return self.subject if self.subject is not None else "anonymous"


_current: contextvars.ContextVar[AuthContext | None] = contextvars.ContextVar(
    "toolpool_auth_context", default=None
)


def current_auth() -> AuthContext | None:
    """The `AuthContext` requests made now act for, or None outside any `auth_context`."""
    return _current.get()


class auth_context:
    """Run the enclosed code (and the asyncio tasks it starts) on behalf of `ctx`.

    >>> with auth_context(AuthContext(tenant="acme")):
    ...     current_auth().tenant
    'acme'

    Contexts nest; leaving the block restores the one before. `None` runs the block with no
    context (the destination's shared identity, if it has one).
    """

    __slots__ = ("_ctx", "_token")

    def __init__(self, ctx: AuthContext | None) -> None:
        if ctx is not None and not isinstance(ctx, AuthContext):
            raise TypeError(
                f"auth_context() takes a toolpool.AuthContext or None, not {type(ctx).__name__}"
            )
        self._ctx = ctx
        self._token: contextvars.Token[AuthContext | None] | None = None

    def __enter__(self) -> AuthContext | None:
        if self._token is not None:
            raise RuntimeError("this auth_context() block is already active; create a new one")
        self._token = _current.set(self._ctx)
        return self._ctx

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)
