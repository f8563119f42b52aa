"""Downstream: named loopback services (plain or TLS) served from a loop thread it owns."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import shutil
import ssl
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from toolpool.testing._admin import AdminHandler
from toolpool.testing._certs import CertificateAuthority
from toolpool.testing._faults import Fault, FaultEndpoint, FaultKind
from toolpool.testing._loop import LoopName, LoopThread
from toolpool.testing._relay import LatencyRelay, listen_socket
from toolpool.testing._service import TOKEN_PATH, Service
from toolpool.testing._spec import ServiceSpec
from toolpool.testing._stats import ServiceStats
from toolpool.testing._tokens import SubjectTokens

logger = logging.getLogger("toolpool.testing")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HOST = "127.0.0.1"
#: Seconds a server-side TLS close waits for the client's close_notify before dropping the TCP
#: connection. Clients rarely answer it on an idle connection, and asyncio's default (30 s)
#: would keep closed connections counted as open; nginx does not wait at all.
TLS_SHUTDOWN_TIMEOUT = 1.0


class Downstream:
    """Real HTTP/1.1 and HTTP/2 services on 127.0.0.1 for tests and benchmarks, one port each.

    With ``tls=True`` a service offers ``h2`` and ``http/1.1`` by ALPN (unless its spec says
    ``http2=False``); the client's offer decides. Plain HTTP is HTTP/1.1.

    Each service answers ``POST /oauth/token`` (client credentials and RFC 8693 token
    exchange), API routes (``/anything``, ``/echo``, ``/bytes``, ``/stream``, ``/status/<code>``,
    ``/redirect``, ``/cookies``, ``/delay``, ``/hang``, ``/close``; any other path behaves like
    ``/anything``) and ``GET /_testbed/stats``. It counts connections, requests and tenants
    exactly, and takes faults on demand. With ``latency > 0`` every service sits behind a
    :class:`LatencyRelay` and :meth:`url` points at the relay.

    The servers run on an event loop in a thread this object owns, so the same object works
    from sync and async code::

        with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
            httpx.get(ds.url("crm") + "/anything").json()["connection_id"]

        async with Downstream({"crm": ServiceSpec()}, tls=True) as ds:
            ds.register_client("crm", client_id="app", client_secret="s3cret", tenant="acme")
            ...

    ``loop``: ``"asyncio"`` (default), ``"uvloop"`` or ``"auto"`` (uvloop when importable).
    ``seed`` makes service-time, token-latency and fault-probability draws reproducible.
    """

    def __init__(
        self,
        services: Mapping[str, ServiceSpec],
        *,
        tls: bool = False,
        latency: float = 0.0,
        loop: LoopName = "asyncio",
        seed: int | None = None,
    ) -> None:
        if not services:
            raise ValueError("a Downstream needs at least one service")
        for name, spec in services.items():
            if not _NAME.match(name):
                raise ValueError(f"service name {name!r} must match {_NAME.pattern}")
            if not isinstance(spec, ServiceSpec):
                raise TypeError(f"service {name!r}: expected a ServiceSpec, got {spec!r}")
            if spec.mtls and not tls:
                raise ValueError(f"service {name!r} has mtls=True; pass tls=True to Downstream")
        if not latency >= 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency!r}")
        self.specs: Mapping[str, ServiceSpec] = dict(services)
        self.tls = tls
        self.latency = float(latency)
        self._rng = random.Random(seed)
        self._subject_tokens = SubjectTokens()
        self._thread = LoopThread("toolpool-downstream", loop, self._setup, self._teardown)
        self._services: dict[str, Service] = {}
        self._servers: list[asyncio.Server] = []
        self._addresses: dict[str, tuple[str, int]] = {}
        self._relays: dict[str, LatencyRelay] = {}
        self._admin: AdminHandler | None = None
        self._admin_address: tuple[str, int] | None = None
        self._tmpdir: str | None = None
        self._ca: CertificateAuthority | None = None

    def __repr__(self) -> str:
        state = "running" if self._thread.running else "stopped"
        return f"<Downstream {state} services={list(self.specs)} tls={self.tls}>"

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Start serving (blocks until every port listens). Prefer ``with Downstream(...)``."""
        try:
            self._thread.start()
        except BaseException:
            self._remove_tmpdir()
            raise

    def close(self) -> None:
        """Stop serving: close every listener and connection, join the thread, delete files."""
        try:
            self._thread.stop()
        finally:
            self._remove_tmpdir()

    async def astart(self) -> None:
        """:meth:`start` for async code; does not block the caller's loop."""
        try:
            await self._thread.astart()
        except BaseException:
            self._remove_tmpdir()
            raise

    async def aclose(self) -> None:
        """:meth:`close` for async code; does not block the caller's loop."""
        try:
            await self._thread.astop()
        finally:
            self._remove_tmpdir()

    def __enter__(self) -> Downstream:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Downstream:
        await self.astart()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _remove_tmpdir(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def _setup(self) -> None:
        loop = asyncio.get_running_loop()
        if self.tls:
            self._tmpdir = tempfile.mkdtemp(prefix="toolpool-testbed-")
            self._ca = CertificateAuthority(Path(self._tmpdir))
        for name, spec in self.specs.items():
            service = Service(
                name, spec, loop=loop, rng=self._rng, subject_tokens=self._subject_tokens
            )
            self._services[name] = service
            ssl_context = None
            if self._ca is not None:
                ssl_context = self._ca.server_context(require_client_cert=spec.mtls)
                if spec.http2:
                    ssl_context.set_alpn_protocols(["h2", "http/1.1"])
                    http1 = self._ca.server_context(require_client_cert=spec.mtls)
                    http1.set_alpn_protocols(["http/1.1"])
                    service.offers_h2 = True
                    service.http1_context = http1
                    ssl_context.sni_callback = service.alpn_callback
                else:
                    ssl_context.set_alpn_protocols(["http/1.1"])
            sock = listen_socket(_HOST)
            self._addresses[name] = sock.getsockname()[:2]
            tls_options: dict[str, Any] = {}
            if ssl_context is not None:
                tls_options["ssl"] = ssl_context
                tls_options["ssl_shutdown_timeout"] = TLS_SHUTDOWN_TIMEOUT
            try:
                server = await loop.create_server(
                    service.protocol, sock=sock, backlog=4096, **tls_options
                )
            except BaseException:
                sock.close()
                raise
            self._servers.append(server)
            if self.latency > 0:
                relay = LatencyRelay(_HOST, self._addresses[name][1], one_way=self.latency)
                await relay.start_in_loop()
                self._relays[name] = relay
        self._admin = AdminHandler(self, loop)
        sock = listen_socket(_HOST)
        self._admin_address = sock.getsockname()[:2]
        try:
            self._servers.append(await loop.create_server(self._admin.protocol, sock=sock))
        except BaseException:
            sock.close()
            raise
        logger.debug("downstream serving %s", {n: self.url(n) for n in self.specs})

    async def _teardown(self) -> None:
        for server in self._servers:
            server.close()
        for service in self._services.values():
            service.abort_all()
        if self._admin is not None:
            self._admin.abort_all()
        for relay in self._relays.values():
            await relay.stop_in_loop()
        for server in self._servers:
            await server.wait_closed()
        for _ in range(3):  # let the aborted transports' connection_lost callbacks run
            await asyncio.sleep(0)
        logger.debug("downstream stopped")

    # -- addresses -----------------------------------------------------------------------

    def _service(self, name: str) -> Service:
        service = self._services.get(name)
        if service is None:
            if name in self.specs:
                raise RuntimeError(
                    "the Downstream is not running; use `with Downstream(...) as ds:`"
                )
            raise KeyError(f"no service named {name!r}; services: {sorted(self.specs)}")
        return service

    def address(self, name: str, *, direct: bool = False) -> tuple[str, int]:
        """``(host, port)`` of service ``name`` (its relay's, unless ``direct`` or no latency)."""
        self._service(name)
        relay = self._relays.get(name)
        if relay is not None and not direct:
            return relay.address
        return self._addresses[name]

    def url(self, name: str, *, direct: bool = False) -> str:
        """Base URL of service ``name``, e.g. ``https://127.0.0.1:43121`` (no trailing slash).

        Through the latency relay when ``latency > 0``; ``direct=True`` bypasses it.
        """
        host, port = self.address(name, direct=direct)
        return f"{'https' if self.tls else 'http'}://{host}:{port}"

    def token_url(self, name: str) -> str:
        """The token endpoint of service ``name``: ``url(name) + "/oauth/token"``."""
        return self.url(name) + TOKEN_PATH

    def relay(self, name: str) -> LatencyRelay | None:
        """The latency relay in front of service ``name`` (None when ``latency == 0``)."""
        self._service(name)
        return self._relays.get(name)

    @property
    def admin_url(self) -> str:
        """Plain-HTTP URL of the admin endpoint that drives this Downstream from afar."""
        if self._admin_address is None:
            raise RuntimeError("the Downstream is not running")
        host, port = self._admin_address
        return f"http://{host}:{port}"

    def info(self) -> dict[str, Any]:
        """Addresses as JSON-ready data (what ``python -m toolpool.testing serve`` prints)."""
        return {
            "services": {
                name: {
                    "url": self.url(name),
                    "token_url": self.token_url(name),
                    "direct_url": self.url(name, direct=True),
                }
                for name in self.specs
            },
            "ca_pem_path": self._ca.ca_pem_path if self._ca is not None else None,
            "admin_url": self.admin_url,
            "tls": self.tls,
            "latency": self.latency,
            "pid": os.getpid(),
        }

    # -- TLS -----------------------------------------------------------------------------

    def _authority(self) -> CertificateAuthority:
        if not self.tls:
            raise RuntimeError("this Downstream serves plain HTTP; pass tls=True for certificates")
        if self._ca is None:
            raise RuntimeError("the Downstream is not running")
        return self._ca

    @property
    def ca_pem_path(self) -> str:
        """Path of the PEM CA certificate that signed the server certificates (TLS only)."""
        return self._authority().ca_pem_path

    def client_ssl_context(self, tenant: str | None = None) -> ssl.SSLContext:
        """An ``ssl.SSLContext`` trusting the test CA; with ``tenant``, presenting its
        client certificate (for mTLS services). Pass it as ``httpx.Client(verify=...)``."""
        return self._authority().client_context(tenant)

    def client_cert(self, tenant: str) -> tuple[str, str]:
        """``(cert_pem_path, key_pem_path)`` of a client certificate with CN ``tenant``."""
        return self._authority().client_cert(tenant)

    # -- identities ----------------------------------------------------------------------

    def register_client(
        self, service: str, *, client_id: str, client_secret: str, tenant: str
    ) -> None:
        """Let ``client_id``/``client_secret`` obtain tokens of ``tenant`` from ``service``."""
        self._service(service).tokens.register_client(client_id, client_secret, tenant)

    def subject_token(self, *, tenant: str, subject: str) -> str:
        """An opaque subject token (user ``subject`` of ``tenant``) that every service's token
        endpoint accepts for RFC 8693 token exchange."""
        if not tenant or not subject:
            raise ValueError("tenant and subject must be non-empty")
        return self._subject_tokens.mint(tenant, subject)

    def revoke_tokens(self, name: str, tenant: str | None = None) -> int:
        """Revoke the tokens ``name`` issued (all, or ``tenant``'s); they now answer 401.
        Returns how many were revoked."""
        return self._service(name).tokens.revoke(tenant)

    # -- stats ---------------------------------------------------------------------------

    def stats(self, name: str) -> ServiceStats:
        """A consistent snapshot of service ``name``'s counters (safe from any thread)."""
        return self._service(name).counters.snapshot()

    def reset_stats(self, name: str | None = None) -> None:
        """Zero the counters of ``name`` (or of every service); gauges stay true."""
        names = list(self.specs) if name is None else [name]
        for n in names:
            self._service(n).counters.reset()

    def wait_stats(
        self, name: str, predicate: Callable[[ServiceStats], bool], timeout: float = 10.0
    ) -> ServiceStats:
        """Block until ``predicate(stats)`` holds for service ``name``; return that snapshot.

        Woken by every counter change, so tests wait for events instead of sleeping::

            ds.wait_stats("crm", lambda s: s.connections_closed_by_server_idle == 1)

        Raises ``TimeoutError`` (with the last snapshot) after ``timeout`` seconds.
        """
        return self._service(name).counters.wait(predicate, timeout)

    async def wait_stats_async(
        self, name: str, predicate: Callable[[ServiceStats], bool], timeout: float = 10.0
    ) -> ServiceStats:
        """:meth:`wait_stats` for async code (checks every 2 ms; never blocks the loop)."""
        counters = self._service(name).counters
        deadline = time.monotonic() + timeout
        while True:
            snap = counters.snapshot()
            if predicate(snap):
                return snap
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"stats of {name!r} did not reach the expected state in {timeout} s; "
                    f"last snapshot: {snap}"
                )
            await asyncio.sleep(0.002)

    # -- faults --------------------------------------------------------------------------

    def set_fault(
        self,
        name: str,
        kind: FaultKind,
        count: int | None = None,
        probability: float | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        delay: float | None = None,
        *,
        endpoint: FaultEndpoint = "api",
    ) -> None:
        """Arm a server-side fault on service ``name`` (replacing one of the same kind).

        Kinds:

        - ``"close_after_response"``: answer, then close the connection without announcing it
          (a keep-alive connection dying under the client).
        - ``"reset"``: abort the connection with a TCP RST (SO_LINGER 0) instead of answering.
        - ``"status"``: answer ``status`` (default 503; 429 and any 4xx/5xx work) with
          ``Retry-After: retry_after`` when given.
        - ``"slow"``: add ``delay`` seconds to the answer.
        - ``"down"``: reset every new connection as soon as it is accepted, and close
          existing connections, unanswered, at their next request.

        HTTP/2 kinds (TLS services with ``ServiceSpec(http2=True)``, the default; request
        kinds do not fire on HTTP/1.1 requests):

        - ``"goaway"``: GOAWAY(NO_ERROR) naming the stream before this request as the last
          processed; this request is left unanswered (safe to retry elsewhere), earlier
          streams finish, then the connection closes.
        - ``"rst_stream"`` / ``"refused_stream"``: reset this request's stream with
          INTERNAL_ERROR / REFUSED_STREAM; the connection stays.
        - ``"max_streams_1"`` (per new connection): announce SETTINGS_MAX_CONCURRENT_STREAMS 1.
        - ``"silent"`` (per connection, when it next receives bytes): read nothing, write
          nothing from then on; a PING goes unanswered.
        - ``"http1"`` (per new TLS connection): ALPN picks ``http/1.1`` even when the client
          offers ``h2``.

        ``count``: fire on the next ``count`` eligible requests (connections, for ``down``),
        then disarm; ``None`` keeps it armed until :meth:`clear_faults`. ``probability``:
        fire on that fraction of them (draws follow ``seed``). ``endpoint``: ``"api"``
        requests (default), ``"token"`` endpoint requests, or ``"any"``.

        One request can also ask for a fault with the header
        ``X-Testbed-Fault: kind[;status=429][;retry_after=1][;delay=0.5]``.
        """
        self._service(name).faults.arm(
            Fault(
                kind,
                count=count,
                probability=probability,
                retry_after=retry_after,
                status=status,
                delay=delay,
                endpoint=endpoint,
            )
        )

    def clear_faults(self, name: str) -> None:
        """Disarm every fault of service ``name``."""
        self._service(name).faults.clear()
