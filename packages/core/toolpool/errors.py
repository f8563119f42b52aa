"""The exceptions toolpool raises, each saying what to change.

Errors raised while a request is on its way are also `httpx` exceptions, so tool code that
already handles `httpx.HTTPError` (or `httpx.TimeoutException`) keeps working when it is
pooled. No message ever contains a secret: only destination names, tenant names and numbers.
"""

from __future__ import annotations

import httpx

__all__ = [
    "AuthError",
    "ConfigError",
    "DestinationUnavailable",
    "EgressDenied",
    "McpUnavailable",
    "PoolClosed",
    "PoolSaturated",
    "PoolTimeout",
    "ToolpoolError",
    "UnknownDestination",
]


class ToolpoolError(Exception):
    """Base class of every toolpool error."""


class ConfigError(ToolpoolError, ValueError):
    """Invalid configuration, raised when the `Pool` or `Destination` is built."""


class PoolClosed(ToolpoolError, httpx.TransportError):
    """The pool was closed; requests can no longer be sent through it."""

    def __init__(self, message: str = "the pool is closed; create a new toolpool.Pool") -> None:
        super().__init__(message)


class UnknownDestination(ToolpoolError, httpx.TransportError):
    """The request's origin is not a configured destination and the pool rejects unknown ones."""

    def __init__(self, origin: str, known: list[str]) -> None:
        self.origin = origin
        listed = ", ".join(known) if known else "none"
        super().__init__(
            f"{origin} is not a configured destination (configured: {listed}); add "
            f"toolpool.Destination(name, {origin!r}) or create the pool with "
            f"unknown_destinations='pool'"
        )


class PoolSaturated(ToolpoolError, httpx.TransportError):
    """The destination's wait queue is full: the request was not sent.

    `retry_after` estimates, in seconds, when a slot is likely to be free. Agent adapters turn
    this into a readable "busy, retry in N s" tool result instead of failing the run.
    """

    def __init__(
        self,
        destination: str,
        *,
        in_use: int,
        waiting: int,
        max_connections: int,
        queue_limit: int,
        retry_after: float,
        reason: str = "queue_full",
        opening: int = 0,
        closing: int = 0,
    ) -> None:
        self.destination = destination
        self.in_use = in_use
        # Slots being opened or closed: they count against the cap without carrying a
        # request, so "in use" below the cap does not mean free capacity.
        self.opening = opening
        self.closing = closing
        self.waiting = waiting
        self.max_connections = max_connections
        self.queue_limit = queue_limit
        self.retry_after = retry_after
        self.reason = reason
        where = f"destination {destination!r}"
        turning = "".join(
            f", {n} {what}" for n, what in ((opening, "opening"), (closing, "closing")) if n
        )
        load = (
            f"{in_use} in use{turning} of {max_connections}, {waiting} waiting "
            f"(queue limit {queue_limit})"
        )
        after = f"retry after {retry_after:.1f} s"
        # What to change depends on why the request was refused (toolpool.resilience).
        if reason == "rate_limited":
            message = (
                f"{where} is rate-limited (its rate limit, or a Retry-After from the server) "
                f"beyond the policy's max_wait; {after}, or send fewer requests per second"
            )
        elif reason == "breaker_open":
            message = f"{where} is unavailable (circuit breaker open); {after}"
        elif reason == "timeout":
            message = (
                f"{where} stayed saturated for the whole admission wait: {load}; {after}, "
                f"wait longer in admit(), or raise max_connections if the downstream allows it"
            )
        else:
            message = (
                f"{where} is saturated: {load}; {after}, "
                f"or raise max_connections / queue_factor if the downstream allows it"
            )
        super().__init__(message)


class PoolTimeout(ToolpoolError, httpx.PoolTimeout):
    """No connection became free within the acquire timeout."""

    def __init__(
        self, destination: str, timeout: float, *, in_use: int, waiting: int, streams: int = 0
    ) -> None:
        self.destination = destination
        self.timeout = timeout
        self.in_use = in_use
        self.waiting = waiting
        self.streams = streams
        held = f", {streams} of them long-lived streams" if streams else ""
        super().__init__(
            f"no connection to destination {destination!r} became free within {timeout:g} s "
            f"({in_use} in use{held}, {waiting} waiting); raise acquire_timeout (or httpx's "
            f"pool timeout) or max_connections, or slow down the callers"
        )


class DestinationUnavailable(ToolpoolError, httpx.TransportError):
    """The destination's circuit breaker is open: calls fail fast until it half-opens."""

    def __init__(self, destination: str, retry_after: float, reason: str) -> None:
        self.destination = destination
        self.retry_after = retry_after
        self.reason = reason
        super().__init__(
            f"destination {destination!r} is unavailable ({reason}); retry after "
            f"{retry_after:.1f} s"
        )


class McpUnavailable(ToolpoolError):
    """An MCP tool call could not be answered: its session failed, the server is gone or
    did not answer in time (a busy pool raises `PoolSaturated` / `PoolTimeout` instead)."""

    def __init__(self, server: str, detail: str) -> None:
        self.server = server
        self.detail = detail
        super().__init__(
            f"MCP server {server!r} unavailable: {detail}; retry later, or check that the "
            f"server is up"
        )


class AuthError(ToolpoolError, httpx.TransportError):
    """Credentials for a (destination, tenant) could not be obtained or were rejected."""

    def __init__(self, destination: str, tenant: str | None, detail: str) -> None:
        self.destination = destination
        self.tenant = tenant
        self.detail = detail
        who = f"tenant {tenant!r}" if tenant is not None else "the shared identity"
        super().__init__(
            f"authentication for {who} at destination {destination!r} failed: {detail}"
        )


class EgressDenied(ToolpoolError, httpx.TransportError):
    """The egress policy refused a connect: the host, or an address it resolved to, is not
    allowed (`toolpool.Egress`). Nothing was sent to that address.

    `destination`, `host`, `address` (the refused address, None when the host name itself
    was refused) and `rule` (metadata, link_local, unspecified, multicast, broadcast, deny,
    deny_unknown) say what was refused and why.
    """

    def __init__(
        self, *, destination: str, host: str, address: str | None, rule: str, reason: str
    ) -> None:
        self.destination = destination
        self.host = host
        self.address = address
        self.rule = rule
        self.reason = reason
        shown = f"[{host}]" if ":" in host else host
        if rule in ("deny", "deny_unknown"):
            change = (
                "If this destination is meant to be reachable, add its network or host name to "
                "toolpool.Egress(allow=[...]) (the service: [service.egress] allow)"
            )
        else:
            change = (
                "This range is refused by default; if this is a service you run, allow its "
                "address explicitly: toolpool.Egress(allow=['<address>/32'])"
            )
        super().__init__(
            f"connecting to {shown} is not allowed by the egress policy: {reason}; "
            f"nothing was sent. {change}"
        )
