"""`toolpool serve`: run the pool service (sidecar or central) from a TOML config with uvicorn.

    toolpool serve --config toolpool.toml              # listens where [service] says
    toolpool serve --config toolpool.toml --port 0     # any free port (printed on stdout)
    toolpool serve --config toolpool.toml --check      # validate the config and exit

On start it prints one JSON line on stdout, {"event": "listening", "url": ...}. SIGTERM (or
Ctrl-C) drains: the listening socket closes, /readyz turns 503, requests in flight finish
within `drain_timeout`, then the pool closes and the process exits 0. An invalid config exits
2 with the file, line and key at fault.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import socket
import sys
from types import FrameType
from typing import Any

__all__ = ["HELP", "configure", "run"]

HELP = "run the pool service (sidecar or central) from a TOML config"


def configure(parser: argparse.ArgumentParser) -> None:
    """Add `serve`'s arguments."""
    parser.add_argument("--config", "-c", required=True, help="the TOML config file")
    parser.add_argument("--host", help="listen address (overrides [service] host)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free one")
    parser.add_argument(
        "--drain-timeout", type=float, help="seconds in-flight requests get after SIGTERM"
    )
    parser.add_argument(
        "--check", action="store_true", help="validate the config, print a summary, exit"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (the access log is at info)",
    )


def run(args: argparse.Namespace) -> int:
    """Load the config, then serve until SIGTERM/SIGINT; the exit status."""
    from toolpool.errors import ConfigError
    from toolpool.service._config import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"toolpool serve: invalid configuration\n  {exc}", file=sys.stderr)
        return 2
    settings = config.service
    host = args.host if args.host is not None else settings.host
    port = args.port if args.port is not None else settings.port
    drain = args.drain_timeout if args.drain_timeout is not None else settings.drain_timeout
    if args.check:
        print(
            json.dumps(
                {
                    "config": config.source,
                    "listen": f"{host}:{port}",
                    "destinations": list(config.destinations),
                    "agents": {a.name: sorted(a.tenants or ["*"]) for a in config.agents.values()},
                    "limit": repr(config.limit),
                }
            )
        )
        return 0
    _setup_logging(args.log_level)
    return _serve(config, host, port, drain, args.log_level)


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("toolpool")
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The access log is one JSON object per line, nothing else on it.
    access = logging.getLogger("toolpool.service.access")
    plain = logging.StreamHandler(sys.stderr)
    plain.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(plain)
    access.propagate = False


def _serve(config: Any, host: str, port: int, drain: float, log_level: str) -> int:
    import uvicorn

    from toolpool.service._app import PoolService

    app = PoolService(config)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"toolpool serve: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 1
    sock.listen(2048)
    sock.set_inheritable(True)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    scheme = "https" if config.service.tls_cert_file else "http"
    uv_config = uvicorn.Config(
        app,
        # h11 hands the raw request target to the app, so absolute-form targets are refused
        # (httptools would drop their host part before the app could see it).
        http="h11",
        ws="none",
        lifespan="on",
        access_log=False,  # the service writes its own, without secrets
        proxy_headers=False,  # never trust X-Forwarded-* from agents
        server_header=False,
        timeout_graceful_shutdown=math.ceil(drain),
        log_level=log_level,
        ssl_certfile=config.service.tls_cert_file,
        ssl_keyfile=config.service.tls_key_file,
    )

    class DrainingServer(uvicorn.Server):
        """Tells the app a drain started (/readyz turns 503) before uvicorn stops accepting."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.begin_drain()
            super().handle_exit(sig, frame)

    server = DrainingServer(uv_config)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in
    # place that re-raise is a no-op and a drained service exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore)
    print(
        json.dumps(
            {"event": "listening", "url": f"{scheme}://{shown}:{bound}", "pid": os.getpid()}
        ),
        flush=True,
    )
    server.run(sockets=[sock])
    return 0


def _ignore(signum: int, frame: FrameType | None) -> None:
    return None
