"""Serving the exposition: a small `/metrics` HTTP server on a thread, and an ASGI app to mount
in an existing web application."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, MutableMapping
from types import TracebackType
from typing import Any
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["ASGIApp", "MetricsServer", "asgi_app", "serve"]

ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]

# OpenTelemetry's Prometheus exporter listens on 9464 by default; collectors look there.
DEFAULT_PORT = 9464


class MetricsServer:
    """A running `/metrics` endpoint started by `serve`. Stop it with `close()` (or `with`)."""

    def __init__(self, httpd: WSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address = httpd.server_address
        self.host: str = str(address[0])
        self.port: int = int(address[1])

    @property
    def url(self) -> str:
        """The exposition URL, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<toolpool.metrics.MetricsServer {self.url}>"


def serve(
    port: int = DEFAULT_PORT,
    registry: CollectorRegistry | None = None,
    addr: str = "127.0.0.1",
) -> MetricsServer:
    """Serve `registry` (default: prometheus-client's global one) at
    ``http://{addr}:{port}/metrics`` from a daemon thread; `port=0` picks a free port.

    It listens on loopback unless told otherwise: expose it deliberately.

    ```python
    toolpool.metrics.register(pool)
    server = toolpool.metrics.serve(9464)   # curl http://127.0.0.1:9464/metrics
    ```
    """
    httpd, thread = prometheus_client.start_http_server(
        port, addr=addr, registry=REGISTRY if registry is None else registry
    )
    return MetricsServer(httpd, thread)


def asgi_app(registry: CollectorRegistry | None = None) -> ASGIApp:
    """An ASGI app answering with `registry`'s exposition (default: the global registry),
    to mount in Starlette, FastAPI and the like:

    ```python
    app.mount("/metrics", toolpool.metrics.asgi_app())
    ```
    """
    app: ASGIApp = prometheus_client.make_asgi_app(REGISTRY if registry is None else registry)
    return app
