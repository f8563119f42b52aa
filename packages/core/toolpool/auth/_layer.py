"""`auth_layer(provider, dest)`: the send-chain layer that runs an auth provider for one
destination (called by the pool when it builds the destination's chain)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolpool.auth._header import HeaderAuth
from toolpool.auth._mtls import ClientCertAuth, MutualTLS
from toolpool.auth._providers import TokenProvider, _check_unbound
from toolpool.errors import ConfigError

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["auth_layer"]


def auth_layer(provider: object, dest: DestinationPool) -> HeaderAuth | ClientCertAuth:
    """The layer running `provider` for `dest`: the client certificate in the TLS handshake
    (`MutualTLS`), else a credential in a header (every `TokenProvider`). A provider serves
    one destination."""
    if isinstance(provider, MutualTLS):
        return provider.layer(dest)
    if isinstance(provider, TokenProvider):
        _check_unbound(provider, dest)
        layer = HeaderAuth(provider, dest)
        provider._runtime = layer
        return layer
    raise ConfigError(
        f"destination {dest.name!r}: auth must be a toolpool.auth provider (Bearer, ApiKey, "
        f"OAuth2ClientCredentials, TokenExchange, MutualTLS or a TokenProvider subclass), "
        f"not {type(provider).__name__}"
    )
