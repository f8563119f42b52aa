"""httpx requests into HTTP/1.1 bytes, and parsed response heads into httpx responses.

Shared by the asyncio and thread drivers, so both send the same bytes and build the same
`httpx.Response` objects.
"""

from __future__ import annotations

import select
from typing import Any

import httpx

from toolpool._http11 import ResponseHead, encode_request_head

__all__ = [
    "NO_TIMEOUTS",
    "ReadCheck",
    "RequestBytes",
    "make_response",
    "prepare",
    "unread_or_eof",
]

NO_TIMEOUTS: dict[str, float | None] = {}


class RequestBytes:
    """What a driver sends for one request: the head, and a fixed body or a stream."""

    __slots__ = ("body", "chunked", "head", "head_request", "stream")

    def __init__(self, request: httpx.Request) -> None:
        try:
            self.head = encode_request_head(
                request.method.encode("ascii"), request.url.raw_path, request.headers.raw
            )
        except ValueError as exc:
            # No request attached: `request` may be the credentialed copy an auth layer
            # made. httpx's client (and pool.request) attach the caller's own request.
            raise httpx.LocalProtocolError(str(exc)) from None
        stream = request.stream
        self.head_request = request.method == "HEAD"
        self.chunked = False
        if isinstance(stream, httpx.ByteStream):
            # Fixed content: sent with the head in one write, and replayable on a retry.
            self.body: bytes | None = b"".join(stream)
            self.stream: Any = None
        else:
            self.body = None
            self.stream = stream
            self.chunked = request.headers.get("transfer-encoding", "").lower() == "chunked"

    @property
    def replayable(self) -> bool:
        """True if the request can be sent again (its body is not a one-shot stream)."""
        return self.body is not None


def unread_or_eof(fd: int) -> bool:
    """The zero-timeout readability check of a pooled connection's socket: True if bytes
    are waiting or the peer closed (both make the connection stale), or the socket is gone."""
    if fd < 0:
        return True
    if _poll is None:  # pragma: no cover - platforms without poll()
        try:
            return bool(select.select([fd], [], [], 0)[0])
        except (OSError, ValueError):
            return True
    poller = _poll()
    poller.register(fd, _POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:  # pragma: no cover
        return True


_poll = getattr(select, "poll", None)
_POLLIN = getattr(select, "POLLIN", 1)


class ReadCheck:
    """`unread_or_eof` for one connection's socket, set up once when it opens: a poll object
    with the descriptor registered, so a check on reuse is one `poll(0)` call, not the
    creation and registration of a poll object each time."""

    __slots__ = ("_fd", "_poll")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._poll: Any = None
        if fd >= 0 and _poll is not None:
            self._poll = _poll()
            self._poll.register(fd, _POLLIN)

    def __call__(self) -> bool:
        """True if bytes are waiting or the peer closed, or the socket is gone."""
        poller = self._poll
        if poller is None:
            return unread_or_eof(self._fd)
        try:
            return bool(poller.poll(0))  # POLLIN, POLLHUP, POLLERR or POLLNVAL: stale
        except OSError:  # pragma: no cover
            return True


def prepare(request: httpx.Request) -> RequestBytes:
    return RequestBytes(request)


def make_response(
    head: ResponseHead,
    stream: Any,
    destination: str,
    connection_id: int,
    reused: bool,
    wait_seconds: float = 0.0,
) -> httpx.Response:
    return httpx.Response(
        head.status,
        headers=head.headers,
        stream=stream,
        extensions={
            "http_version": head.http_version,
            "reason_phrase": head.reason,
            "toolpool": {
                "destination": destination,
                "connection_id": connection_id,
                "reused": reused,
                # Time the request waited for a connection (the adaptive limit subtracts it
                # to measure the downstream's service time alone).
                "wait_seconds": wait_seconds,
            },
        },
    )
