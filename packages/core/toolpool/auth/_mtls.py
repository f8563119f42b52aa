"""Mutual TLS per auth context: each context's connections present its own client certificate.

Identity is fixed by the TLS handshake, so it is a property of the connection, not of the
request: the pool's affinity (a connection that carried context A never carries B) is what
keeps it correct, and warm-up opens connections per `Destination(warmup_contexts=...)`.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, MethodLayer, SyncSend
from toolpool._tls import client_ssl_context
from toolpool.auth._header import context_label, no_context_error
from toolpool.auth._providers import _check_unbound
from toolpool.auth._stats import INITIAL, AuthCounters, AuthStats
from toolpool.errors import AuthError, ConfigError

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["ClientCertAuth", "MutualTLS"]

log = logging.getLogger("toolpool.auth")

monotonic = time.monotonic

#: A PEM file holding certificate and key, or (cert_path, key_path).
CertFiles = str | tuple[str, str]
CertSource = CertFiles | Callable[[AuthContext | None], CertFiles]


def _check_files(value: object) -> bool:
    if isinstance(value, str):
        return bool(value)
    return (
        isinstance(value, tuple)
        and len(value) == 2
        and all(isinstance(part, str) and part for part in value)
    )


class MutualTLS:
    """A client certificate per auth context (mTLS): connection-level identity.

    ```python
    toolpool.Destination("ledger", "https://ledger.internal",
        auth=toolpool.auth.MutualTLS(
            cert=lambda ctx: (f"/certs/{ctx.tenant}.pem", f"/certs/{ctx.tenant}.key"),
            verify="/certs/ca.pem"),
        warmup_contexts=[toolpool.AuthContext(tenant="acme")])
    ```

    `cert`: `(cert_path, key_path)` or one PEM path, or a function of the `AuthContext`
    returning one. A static certificate also serves requests made outside any auth context.
    `verify`: as `Destination(verify=...)` (True, False or a CA bundle path); None uses the
    destination's. Each context's `ssl.SSLContext` is built once and kept (up to
    `max_contexts`, least recently used dropped); a context whose certificate cannot be loaded
    fails fast for `negative_ttl` seconds.
    """

    def __init__(
        self,
        cert: CertSource,
        *,
        verify: bool | str | None = None,
        max_contexts: int = 1024,
        negative_ttl: float = 5.0,
    ) -> None:
        if not (callable(cert) or _check_files(cert)):
            raise ConfigError(
                "MutualTLS cert must be (cert_path, key_path), a PEM path, or a function of the "
                "auth context returning one"
            )
        if verify is not None and not isinstance(verify, bool | str):
            raise ConfigError(
                "MutualTLS verify must be True, False or a CA bundle path (the client "
                "certificate is added to a context built per auth context), not "
                f"{type(verify).__name__}"
            )
        if isinstance(max_contexts, bool) or not isinstance(max_contexts, int) or max_contexts < 1:
            raise ConfigError(f"max_contexts must be a whole number >= 1, got {max_contexts!r}")
        if not (isinstance(negative_ttl, int | float) and negative_ttl >= 0):
            raise ConfigError(f"negative_ttl must be seconds >= 0, got {negative_ttl!r}")
        self._cert = cert
        self.verify = verify
        self.max_contexts = max_contexts
        self.negative_ttl = float(negative_ttl)
        self.shared_identity = not callable(cert)
        self._runtime: ClientCertAuth | None = None

    def cert_files(self, ctx: AuthContext | None) -> CertFiles:
        """The certificate files of `ctx` (paths, not secrets: the key stays on disk)."""
        cert = self._cert
        files = cert(ctx) if callable(cert) else cert
        if not _check_files(files):
            raise TypeError(
                "the MutualTLS cert function must return (cert_path, key_path) or a PEM path, "
                f"not {type(files).__name__}"
            )
        return files

    def layer(self, dest: DestinationPool) -> ClientCertAuth:
        """This provider's layer for `dest` (the pool adds it to the destination's send
        chain); a provider serves one destination."""
        _check_unbound(self, dest)
        if not dest.tls:
            raise ConfigError(f"destination {dest.name!r}: MutualTLS needs an https:// destination")
        if dest.settings.cert is not None:
            raise ConfigError(
                f"destination {dest.name!r}: give the client certificate either as "
                f"Destination(cert=...) or with auth=MutualTLS(...), not both"
            )
        verify = self.verify if self.verify is not None else dest.settings.verify
        if isinstance(verify, ssl.SSLContext):
            raise ConfigError(
                f"destination {dest.name!r}: MutualTLS builds a TLS context per auth context, so "
                f"verify must be True, False or a CA bundle path, not an ssl.SSLContext"
            )
        self._runtime = ClientCertAuth(self, dest, verify)
        return self._runtime

    @property
    def runtime(self) -> ClientCertAuth | None:
        """The run-time object of the destination this provider is bound to (or None)."""
        return self._runtime

    def __repr__(self) -> str:
        shown = "<callable>" if callable(self._cert) else "<files>"
        return f"MutualTLS(cert={shown}, verify={self.verify!r})"


class ClientCertAuth(MethodLayer):
    """`dest.auth` for `MutualTLS`: a client-certificate TLS context per auth context."""

    #: Identity is set by the TLS handshake: the core asks `ssl_context(ctx)` for every new
    #: connection of `ctx` and warms connections per listed context.
    connection_bound = True

    def __init__(self, provider: MutualTLS, dest: DestinationPool, verify: bool | str) -> None:
        self.provider = provider
        self.dest = dest
        self.name = dest.name
        self.verify = verify
        self.lock = threading.Lock()
        #: By (context fingerprint, ALPN protocols offered): HTTP/2 connections offer h2.
        self._contexts: OrderedDict[tuple[str, tuple[str, ...]], ssl.SSLContext] = OrderedDict()
        self._failures: dict[str, tuple[float, str]] = {}
        self._shared = provider.shared_identity
        self.counters = AuthCounters()
        self._inner_a: AsyncSend = dest.base_async_send
        self._inner_s: SyncSend = dest.base_sync_send

    def __repr__(self) -> str:
        return f"<toolpool.auth MutualTLS for {self.name!r}>"

    #: Its place in the send chain (`toolpool._chain`): innermost, right above the pool.
    role = "auth"

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """Fail early and clearly for a request without a context, else send unchanged."""
        if ctx is None and not self._shared:
            raise no_context_error(self.name)
        return await self._inner_a(request, ctx)

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """See `async_send`."""
        if ctx is None and not self._shared:
            raise no_context_error(self.name)
        return self._inner_s(request, ctx)

    def ssl_context(self, ctx: AuthContext | None, alpn: tuple[str, ...] = ()) -> ssl.SSLContext:
        """The TLS context presenting `ctx`'s client certificate and offering the `alpn`
        protocols (none: no ALPN, HTTP/1.1), built once per (context, alpn): an HTTP/2
        destination's connections offer ``("h2", "http/1.1")``, its HTTP/1.1 ones nothing,
        and neither changes a context the other uses."""
        if ctx is None and not self._shared:
            raise no_context_error(self.name)
        key = "" if ctx is None else ctx._fingerprint
        with self.lock:
            sslctx = self._contexts.get((key, alpn))
            if sslctx is not None:
                self._contexts.move_to_end((key, alpn))
                return sslctx
            failed = self._failures.get(key)
            if failed is not None and monotonic() < failed[0]:
                self.counters.negative_hits_total += 1
                raise AuthError(
                    self.name,
                    context_label(ctx),
                    f"{failed[1]} (failed recently; the next attempt is allowed in "
                    f"{failed[0] - monotonic():.1f} s)",
                )
            self.counters.started(INITIAL)
        started = monotonic()
        try:
            files = self.provider.cert_files(ctx)
            sslctx = client_ssl_context(self.verify, files)
            if alpn:
                sslctx.set_alpn_protocols(list(alpn))
        except Exception as exc:
            detail = (
                str(exc)
                if isinstance(exc, ConfigError)  # names the file, never its content
                else f"the cert function raised {type(exc).__name__}"
            )
            with self.lock:
                self.counters.observe(monotonic() - started, failed=True)
                now = monotonic()
                if len(self._failures) >= self.provider.max_contexts:
                    self._failures = {k: v for k, v in self._failures.items() if v[0] > now}
                self._failures[key] = (now + self.provider.negative_ttl, detail)
            log.warning("client certificate for %s at %s: %s", _who(ctx), self.name, detail)
            raise AuthError(self.name, context_label(ctx), detail) from exc
        with self.lock:
            self.counters.observe(monotonic() - started, failed=False)
            self._failures.pop(key, None)
            self._contexts[(key, alpn)] = sslctx
            while len(self._contexts) > self.provider.max_contexts:
                self._contexts.popitem(last=False)
        return sslctx

    def close(self) -> None:
        """Nothing runs in the background for mTLS."""

    def stats(self) -> AuthStats:
        """Certificate loads as fetches (reason "initial"), failures and load durations."""
        with self.lock:
            contexts = len({key for key, _ in self._contexts})
            return self.counters.snapshot(self.name, "MutualTLS", contexts)

    def invalidate(self, ctx: AuthContext | None) -> None:
        """Forget `ctx`'s TLS context (e.g. after rotating its certificate files): its next
        new connection loads the certificate again. Open connections keep theirs."""
        key = "" if ctx is None else ctx._fingerprint
        with self.lock:
            for cached in [c for c in self._contexts if c[0] == key]:
                del self._contexts[cached]

    def clear(self) -> None:
        """Forget every TLS context and failure."""
        with self.lock:
            self._contexts.clear()
            self._failures.clear()


def _who(ctx: AuthContext | None) -> str:
    return "the shared identity" if ctx is None else f"context {ctx.label!r}"
