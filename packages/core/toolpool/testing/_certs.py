"""A throwaway certificate authority: loopback server certificates and per-tenant client ones.

trustme is imported here, lazily, so that ``import toolpool`` never needs it.
"""

from __future__ import annotations

import hashlib
import re
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trustme

#: The names a loopback server certificate is valid for.
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _import_trustme() -> trustme.CA:
    try:
        import trustme
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "toolpool.testing needs 'trustme' for TLS; install it with "
            "`pip install 'toolpool[testing]'` or pass tls=False"
        ) from exc
    return trustme.CA()


class CertificateAuthority:
    """A CA whose files live in ``directory`` (owned and deleted by the caller)."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._ca = _import_trustme()
        self._server_cert = self._ca.issue_cert(*LOOPBACK_NAMES)
        self.ca_pem_path = str(directory / "ca.pem")
        self._ca.cert_pem.write_to_path(self.ca_pem_path)
        self._lock = threading.Lock()
        self._client_certs: dict[str, tuple[str, str]] = {}

    def server_context(self, *, require_client_cert: bool) -> ssl.SSLContext:
        """The server side: the loopback certificate, and with mTLS a required client cert."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._server_cert.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._ca.configure_trust(ctx)
        return ctx

    def client_context(self, tenant: str | None = None) -> ssl.SSLContext:
        """A client context trusting this CA; with ``tenant``, presenting its client cert."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._ca.configure_trust(ctx)
        if tenant is not None:
            cert_path, key_path = self.client_cert(tenant)
            ctx.load_cert_chain(cert_path, key_path)
        return ctx

    def client_cert(self, tenant: str) -> tuple[str, str]:
        """``(cert_pem_path, key_pem_path)`` of a client certificate whose CN is ``tenant``."""
        if not tenant:
            raise ValueError("tenant must be a non-empty string")
        with self._lock:
            paths = self._client_certs.get(tenant)
            if paths is None:
                # The tenant is identified by the common name; the SAN makes the certificate
                # valid X.509 (cryptography >= 51 refuses an empty SubjectAlternativeName).
                leaf = self._ca.issue_cert(client_identity(tenant), common_name=tenant)
                stem = f"client-{len(self._client_certs)}-{re.sub(r'[^A-Za-z0-9_.-]', '_', tenant)}"
                cert_path = self._dir / f"{stem}.pem"
                key_path = self._dir / f"{stem}.key"
                cert_path.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
                leaf.private_key_pem.write_to_path(str(key_path))
                paths = self._client_certs[tenant] = (str(cert_path), str(key_path))
            return paths


def client_identity(tenant: str) -> str:
    """The DNS name a tenant's client certificate carries besides its common name.

    Derived from a hash so that any tenant string (spaces, unicode, 200 characters) gives a
    valid DNS label: ``t-<16 hex>.clients.toolpool.test``.
    """
    digest = hashlib.sha256(tenant.encode()).hexdigest()[:16]
    return f"t-{digest}.clients.toolpool.test"


def peer_common_name(peercert: object) -> str | None:
    """The subject common name of a verified peer certificate (``getpeercert()`` form)."""
    if not isinstance(peercert, dict):
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None
