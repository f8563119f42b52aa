"""The admin endpoint of a Downstream: its control surface over plain HTTP on loopback.

It lets a process drive a Downstream that runs in another process (``spawn_downstream``):
read stats, arm faults, register clients, mint subject tokens, revoke tokens. Its connections
and requests are not counted in any service's stats.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from toolpool.testing._connection import HttpConnection
from toolpool.testing._http import Request
from toolpool.testing._stats import ServiceStats

ADMIN_PREFIX = "/_testbed/"


class Control(Protocol):
    """The part of :class:`~toolpool.testing.Downstream` the admin endpoint exposes."""

    def info(self) -> dict[str, Any]: ...
    def stats(self, name: str) -> ServiceStats: ...
    def reset_stats(self, name: str | None = None) -> None: ...
    def set_fault(
        self,
        name: str,
        kind: Any,
        count: int | None = None,
        probability: float | None = None,
        retry_after: float | None = None,
        status: int | None = None,
        delay: float | None = None,
        *,
        endpoint: Any = "api",
    ) -> None: ...
    def clear_faults(self, name: str) -> None: ...
    def revoke_tokens(self, name: str, tenant: str | None = None) -> int: ...
    def register_client(
        self, service: str, *, client_id: str, client_secret: str, tenant: str
    ) -> None: ...
    def subject_token(self, *, tenant: str, subject: str) -> str: ...
    def client_cert(self, tenant: str) -> tuple[str, str]: ...


def _dumps(value: object) -> bytes:
    return json.dumps(value).encode()


def _required(args: dict[str, Any], name: str) -> Any:
    if name not in args:
        raise ValueError(f"missing {name!r} in the request body")
    return args.pop(name)


class AdminHandler:
    """Connection handler of the admin port (see the module docstring for the routes)."""

    def __init__(self, control: Control, loop: asyncio.AbstractEventLoop) -> None:
        self._control = control
        self._loop = loop
        self._connections: set[HttpConnection] = set()
        self._next_id = 0

    def protocol(self) -> HttpConnection:
        return HttpConnection(self, self._loop, 75.0)

    def abort_all(self) -> None:
        for conn in list(self._connections):
            if conn.transport is not None:
                conn.transport.abort()

    def connection_made(self, conn: HttpConnection) -> bool:
        self._next_id += 1
        conn.id = self._next_id
        self._connections.add(conn)
        return True

    def connection_lost(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)

    def connection_idle_closed(self, conn: HttpConnection) -> None:
        pass

    def handle(self, conn: HttpConnection, request: Request) -> None:
        try:
            status, body = self._route(request)
        except KeyError as exc:
            status, body = 404, {"error": "not_found", "detail": str(exc.args[0])}
        except (ValueError, TypeError, RuntimeError) as exc:
            status, body = 400, {"error": "bad_request", "detail": str(exc)}
        conn.respond(status, _dumps(body))

    def _route(self, request: Request) -> tuple[int, Any]:
        control = self._control
        method = request.method
        parts = (
            request.path[len(ADMIN_PREFIX) :].split("/")
            if request.path.startswith(ADMIN_PREFIX)
            else []
        )
        args: dict[str, Any] = json.loads(request.body) if request.body else {}
        if not isinstance(args, dict):
            raise ValueError("the request body must be a JSON object")
        match method, parts:
            case "GET", ["info"]:
                return 200, control.info()
            case "GET", ["stats", name]:
                return 200, control.stats(name).to_json()
            case "POST", ["reset_stats"]:
                control.reset_stats(args.get("service"))
                return 200, {}
            case "POST", ["faults", name]:
                control.set_fault(name, _required(args, "kind"), **args)
                return 200, {}
            case "DELETE", ["faults", name]:
                control.clear_faults(name)
                return 200, {}
            case "POST", ["revoke", name]:
                return 200, {"revoked": control.revoke_tokens(name, args.get("tenant"))}
            case "POST", ["clients", name]:
                control.register_client(
                    name,
                    client_id=_required(args, "client_id"),
                    client_secret=_required(args, "client_secret"),
                    tenant=_required(args, "tenant"),
                )
                return 200, {}
            case "POST", ["subject_tokens"]:
                token = control.subject_token(
                    tenant=_required(args, "tenant"), subject=_required(args, "subject")
                )
                return 200, {"subject_token": token}
            case "POST", ["client_certs"]:
                cert, key = control.client_cert(_required(args, "tenant"))
                return 200, {"cert": cert, "key": key}
        return 404, {"error": "not_found", "detail": f"no admin route {method} {request.path}"}
