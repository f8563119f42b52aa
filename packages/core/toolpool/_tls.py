"""Client TLS contexts: built once per (destination, client certificate), then shared."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from toolpool.errors import ConfigError

__all__ = ["client_ssl_context"]


def client_ssl_context(
    verify: bool | str | ssl.SSLContext, cert: str | tuple[str, str] | None = None
) -> ssl.SSLContext:
    """An SSLContext for HTTP/1.1 clients, verifying like httpx does."""
    if isinstance(verify, ssl.SSLContext):
        if cert is not None:
            raise ConfigError(
                "give the client certificate inside your ssl.SSLContext "
                "(ctx.load_cert_chain(...)) or pass verify=True/path with cert=..., not both"
            )
        return verify
    if isinstance(verify, str):
        path = Path(verify)
        if path.is_dir():
            ctx = ssl.create_default_context(capath=str(path))
        elif path.is_file():
            ctx = ssl.create_default_context(cafile=str(path))
        else:
            raise ConfigError(f"verify={verify!r}: no CA bundle file or directory at that path")
    else:
        ctx = httpx.create_ssl_context(verify=verify)
    if cert is not None:
        certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
        try:
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as exc:
            # The message names the file, never its content.
            raise ConfigError(f"cannot load client certificate {certfile!r}: {exc}") from None
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx
