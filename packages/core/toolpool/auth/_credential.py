"""What a provider hands out: a `Credential` (a header value and how long it is good for), and
the `TokenPolicy` that says when cached credentials are refreshed and failures retried."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from toolpool.errors import ConfigError

__all__ = ["Credential", "TokenPolicy"]


@dataclass(frozen=True, eq=False)
class Credential:
    """A credential to put in one request header, e.g. an OAuth access token.

    `value` is the secret; it never appears in `repr()`. `expires_in` (seconds from when the
    credential was requested) makes the cache refresh it ahead of expiry; None means it is good
    until the destination rejects it with a 401.

    >>> Credential("tok-123", expires_in=3600)
    Credential(header='Authorization', scheme='Bearer', expires_in=3600, value=<redacted>)
    >>> Credential("k-1", header="X-API-Key", scheme=None).header_value
    'k-1'
    """

    value: str = field(repr=False)
    expires_in: float | None = None
    # RFC 6750 bearer tokens are the common case.
    header: str = "Authorization"
    scheme: str | None = "Bearer"

    def __post_init__(self) -> None:
        if not isinstance(self.value, str) or not self.value:
            raise TypeError("a Credential's value must be a non-empty str")
        if any(c in self.value for c in "\r\n\0"):
            # Never echo the value: it is the secret.
            raise ValueError("a Credential's value must not contain CR, LF or NUL characters")
        if self.expires_in is not None and (
            isinstance(self.expires_in, bool)
            or not isinstance(self.expires_in, int | float)
            or not self.expires_in > 0
            or math.isinf(self.expires_in)
        ):
            raise ValueError(
                f"Credential expires_in must be a finite number of seconds > 0 or None, "
                f"got {self.expires_in!r}"
            )
        if not isinstance(self.header, str) or not self.header:
            raise ValueError(f"Credential header must be a header name, got {self.header!r}")

    @property
    def header_value(self) -> str:
        """The header's value: `"<scheme> <value>"`, or the bare value without a scheme."""
        return self.value if not self.scheme else f"{self.scheme} {self.value}"

    def __repr__(self) -> str:
        return (
            f"Credential(header={self.header!r}, scheme={self.scheme!r}, "
            f"expires_in={self.expires_in!r}, value=<redacted>)"
        )


@dataclass(frozen=True)
class TokenPolicy:
    """When cached credentials are refreshed, how failures are held, and how tokens are fetched.

    A credential with lifetime `L` is refreshed, in the background, by the first request after
    `min(refresh_fraction * L, L - refresh_margin)`, whichever is earlier (the margin never
    moves it before `L / 2`, so short-lived tokens are not refreshed on every request);
    requests keep using the old credential until the new one arrives or it expires.

    >>> TokenPolicy().refresh_after(3600), TokenPolicy().refresh_after(60)
    (2880.0, 30.0)
    """

    # Refresh at 80 % of a token's lifetime: long before expiry, without fetching too often.
    refresh_fraction: float = 0.8
    # ...or 30 s before expiry if that is earlier, so a slow identity provider cannot make
    # requests wait on an expired token.
    refresh_margin: float = 30.0
    # A context whose credentials failed is not retried for 5 s: a broken tenant cannot
    # hammer the token endpoint, and it recovers quickly once fixed.
    negative_ttl: float = 5.0
    # Open the API connection while the first token is fetched (when the token endpoint is
    # another destination), so a cold call pays for the two at once, not one after the other.
    preconnect: bool = True
    # A token request that has not finished in 10 s will not; fail and let the caller retry.
    timeout: float = 10.0
    # Bound on the contexts whose credentials are cached per destination (memory bound for
    # per-user contexts); beyond it, expired and then oldest entries are dropped.
    max_contexts: int = 10_000

    def __post_init__(self) -> None:
        if not (isinstance(self.refresh_fraction, int | float) and 0 < self.refresh_fraction <= 1):
            raise ConfigError(
                f"refresh_fraction must be a fraction of the token lifetime in (0, 1], "
                f"got {self.refresh_fraction!r}"
            )
        for name in ("refresh_margin", "negative_ttl"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ConfigError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not self.timeout > 0
            or math.isinf(self.timeout)
        ):
            raise ConfigError(
                f"timeout must be a finite number of seconds > 0, got {self.timeout!r}"
            )
        if (
            isinstance(self.max_contexts, bool)
            or not isinstance(self.max_contexts, int)
            or self.max_contexts < 1
        ):
            raise ConfigError(
                f"max_contexts must be a whole number >= 1, got {self.max_contexts!r}"
            )

    def refresh_after(self, lifetime: float) -> float:
        """Seconds after it was requested that a credential of `lifetime` s is refreshed."""
        # The margin never moves the refresh before half the lifetime: for short-lived tokens
        # it would otherwise mean a refresh on every request.
        return min(
            self.refresh_fraction * lifetime, max(lifetime - self.refresh_margin, lifetime / 2)
        )
