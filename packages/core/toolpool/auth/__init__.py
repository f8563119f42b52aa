"""toolpool.auth: credentials per (destination, auth context), fetched once and reused.

```python
import toolpool

crm = toolpool.Destination("crm", "https://crm.internal",
    auth=toolpool.auth.OAuth2ClientCredentials(
        token_url="https://crm.internal/oauth/token",
        credentials=lambda ctx: (ctx.credentials["client_id"], ctx.credentials["client_secret"]),
        scope="contacts:read"))
async with toolpool.Pool([crm]) as pool:
    with toolpool.auth_context(toolpool.AuthContext(tenant="acme", credentials={...})):
        await pool.client().get("https://crm.internal/contacts")   # token fetched, cached
```

Providers: `Bearer`, `ApiKey` (static or per context), `OAuth2ClientCredentials`,
`TokenExchange` (RFC 8693), `MutualTLS` (a client certificate per context), and your own
`TokenProvider` subclass. Each destination gets its own provider object; the registry caches
credentials per (destination, context fingerprint), fetches them single-flight, refreshes them
in the background ahead of expiry, refreshes and retries once after a 401, and holds failures
briefly (`TokenPolicy`). Token requests go through the pool as requests of their context.
`dest.auth.stats()` (or `toolpool.auth.stats(pool)`) returns the counters for metrics.
No secret appears in a repr, a log line, a stats field or an exception message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.auth._header import HeaderAuth
from toolpool.auth._mtls import ClientCertAuth, MutualTLS
from toolpool.auth._oauth import OAuth2ClientCredentials, TokenExchange, parse_token_response
from toolpool.auth._providers import ApiKey, Bearer, TokenFailure, TokenProvider
from toolpool.auth._stats import FETCH_BUCKETS, REFRESH_REASONS, AuthStats
from toolpool.auth._vcr import vcr_patches

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = [
    "FETCH_BUCKETS",
    "REFRESH_REASONS",
    "ApiKey",
    "AuthStats",
    "Bearer",
    "ClientCertAuth",
    "Credential",
    "HeaderAuth",
    "MutualTLS",
    "OAuth2ClientCredentials",
    "TokenExchange",
    "TokenFailure",
    "TokenPolicy",
    "TokenProvider",
    "parse_token_response",
    "stats",
    "vcr_patches",
]


class _Pool(Protocol):
    """What `stats` reads of a `toolpool.Pool` (this package sits below the pool)."""

    @property
    def destinations(self) -> list[str]: ...

    def destination(self, name_or_url: str) -> DestinationPool: ...


def stats(pool: _Pool) -> dict[str, AuthStats]:
    """The credential counters of every destination of `pool` that has an auth provider,
    by destination name."""
    found: dict[str, AuthStats] = {}
    for name in pool.destinations:
        auth = pool.destination(name).auth
        reading = auth.stats() if auth is not None else None
        if isinstance(reading, AuthStats):
            found[name] = reading
    return found
