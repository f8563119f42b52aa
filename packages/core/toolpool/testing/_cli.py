"""The test bed's command line: ``serve`` a Downstream as its own process, or ``bench`` it.

``serve`` prints one line of JSON (the addresses) to stdout, then serves until SIGTERM/SIGINT
or until stdin closes (so a parent that dies takes the server with it). ``bench`` prints one
line of JSON with the measured throughput.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import get_args

from toolpool.testing._downstream import Downstream
from toolpool.testing._loadgen import measure, result_json
from toolpool.testing._loop import LoopName
from toolpool.testing._spec import ServiceSpec

logger = logging.getLogger("toolpool.testing")


def parse_service(text: str) -> tuple[str, ServiceSpec]:
    """``name`` or ``name:key=value,...`` -> (name, ServiceSpec)."""
    name, _, options = text.partition(":")
    return name, ServiceSpec.from_text(options)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m toolpool.testing", description="toolpool's loopback test bed"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a Downstream until SIGTERM/SIGINT or stdin EOF")
    serve.add_argument(
        "--service",
        action="append",
        required=True,
        metavar="NAME[:KEY=VALUE,...]",
        help="a service and its ServiceSpec fields, e.g. "
        "search:require_auth=false,concurrency_limit=30,service_time=0.01..0.03",
    )
    serve.add_argument("--tls", action="store_true", help="serve HTTPS (certificates by trustme)")
    serve.add_argument(
        "--latency", type=float, default=0.0, help="one-way delay of a relay per service (s)"
    )
    serve.add_argument(
        "--register-client",
        action="append",
        default=[],
        metavar="SERVICE:CLIENT_ID:SECRET:TENANT",
        help="register an OAuth client (visible in the process list: test secrets only)",
    )
    serve.add_argument("--loop", choices=get_args(LoopName), default="auto")
    serve.add_argument("--seed", type=int, default=None, help="seed for the random draws")
    serve.add_argument("--ignore-stdin", action="store_true", help="keep serving when stdin closes")
    serve.add_argument("--log-level", default="WARNING")
    bench = sub.add_parser(
        "bench", help="measure the test bed's keep-alive throughput (server in a child process)"
    )
    bench.add_argument("--connections", type=int, default=32)
    bench.add_argument("--seconds", type=float, default=5.0)
    bench.add_argument("--loop", choices=get_args(LoopName), default="auto", help="server loop")
    bench.add_argument("--client-loop", choices=get_args(LoopName), default="auto")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m toolpool.testing``."""
    args = _parser().parse_args(argv)
    if args.command == "bench":
        result = measure(
            connections=args.connections,
            seconds=args.seconds,
            server_loop=args.loop,
            client_loop=args.client_loop,
        )
        sys.stdout.write(json.dumps(result_json(result)) + "\n")
        return 0 if result.errors == 0 else 1
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    specs = dict(parse_service(text) for text in args.service)
    clients = []
    for text in args.register_client:
        parts = text.split(":", 3)
        if len(parts) != 4:
            raise SystemExit(
                f"--register-client needs SERVICE:CLIENT_ID:SECRET:TENANT, got {text!r}"
            )
        clients.append(parts)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    with Downstream(
        specs, tls=args.tls, latency=args.latency, loop=args.loop, seed=args.seed
    ) as ds:
        for service, client_id, secret, tenant in clients:
            ds.register_client(service, client_id=client_id, client_secret=secret, tenant=tenant)
        sys.stdout.write(json.dumps(ds.info()) + "\n")  # the one line a parent reads
        sys.stdout.flush()
        if not args.ignore_stdin:
            threading.Thread(
                target=_set_on_eof, args=(stop,), name="toolpool-stdin-watch", daemon=True
            ).start()
        while not stop.wait(0.5):
            pass
        logger.info("downstream process %s stopping", ds.info()["pid"])
    return 0


def _set_on_eof(stop: threading.Event) -> None:
    # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader holds its lock,
    # and the interpreter aborts when it finds that lock taken at exit.
    try:
        fd = sys.stdin.fileno()
        while os.read(fd, 65536):
            pass
    except (OSError, ValueError):
        pass
    stop.set()
