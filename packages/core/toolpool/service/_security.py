"""What the service lets through, decided before any connection is made: the request target,
the path inside a destination, the Host header, the agent's token, and which headers cross.

Pure functions over bytes and header lists, so every rule is tested without a socket. The
proxy forwards a request only to the origin of a configured destination, with a path that
passed `check_path`; nothing an agent sends can name another host.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes

__all__ = [
    "HOP_BY_HOP",
    "Refusal",
    "authenticate",
    "check_host",
    "check_path",
    "request_headers",
    "response_headers",
    "split_target",
]

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies must drop.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Request headers that never reach a downstream: the agent's credential for the service,
# routing by Host (the pool sets the destination's), framing (the pool frames the body),
# 100-continue (the service already accepted the body), and forwarding claims an agent could
# forge about where the request came from.
_REQUEST_DROP = frozenset(
    {b"authorization", b"host", b"content-length", b"expect", b"forwarded", b"cookie2"}
)
_FORWARDED_PREFIX = b"x-forwarded-"
# The service's own signals to agents: a downstream cannot fake them.
SERVICE_HEADER_PREFIX = b"x-toolpool-"

# How many rounds of percent-decoding are inspected for traversal (double encoding etc.).
_DECODE_ROUNDS = 3


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the HTTP status, a stable code (the `X-Toolpool-Error`
    header and the metrics' `reason` label) and a message saying what to send instead."""

    status: int
    code: str
    detail: str
    # Numbers for the agent (saturation, retry_after), added to the JSON body.
    extra: Mapping[str, Any] | None = None


def split_target(raw_path: bytes) -> tuple[str, bytes] | Refusal:
    """`/d/<destination>/<rest>` -> (destination, rest) where rest is `b""` or starts with
    `/`. Absolute-form (`http://host/...`) and authority-form targets are refused."""
    if not raw_path.startswith(b"/"):
        return Refusal(
            400,
            "bad_target",
            "absolute-form and authority-form request targets are refused (this is not an "
            "open proxy); send the path form /d/<destination>/<path>",
        )
    if not raw_path.startswith(b"/d/"):
        return Refusal(404, "not_found", "proxied requests go to /d/<destination>/<path>")
    name, slash, rest = raw_path[3:].partition(b"/")
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    if not text or not all(c.isalnum() or c in "_.-" for c in text):
        return Refusal(404, "unknown_destination", "no such destination")
    return text, slash + rest


def check_path(rest: bytes) -> Refusal | None:
    """Refuse a path that could leave the destination or confuse the downstream's router:
    dot segments (`..`, `.`, also percent-encoded, double-encoded, or with `;params`),
    encoded slashes or backslashes, empty segments, control characters and NUL."""
    if not rest:
        return None
    layer = rest
    for _ in range(_DECODE_ROUNDS + 1):
        if b"\\" in layer:
            return _bad_path("a backslash")
        if any(b < 0x20 or b == 0x7F for b in layer):
            return _bad_path("a control character")
        segments = layer.split(b"/")
        for i, segment in enumerate(segments[1:], 1):
            bare = segment.split(b";", 1)[0]
            if bare in (b".", b".."):
                return _bad_path("a '.' or '..' segment")
            if not segment and i != len(segments) - 1:
                return _bad_path("an empty segment ('//')")
        lowered = layer.lower()
        if b"%2f" in lowered or b"%5c" in lowered:
            return _bad_path("an encoded '/' or '\\'")
        decoded = unquote_to_bytes(layer)
        if decoded == layer:
            return None
        layer = decoded
    return _bad_path("more than three layers of percent-encoding")


def _bad_path(what: str) -> Refusal:
    return Refusal(
        400,
        "bad_path",
        f"the path has {what}; paths must stay inside the destination (normalize the path "
        f"before sending it)",
    )


def check_host(headers: Iterable[tuple[bytes, bytes]], allowed: tuple[str, ...]) -> Refusal | None:
    """With `allowed` set, the Host header must name one of them (port ignored); a request
    with several Host headers is refused either way."""
    hosts = [v for k, v in headers if k.lower() == b"host"]
    if len(hosts) > 1:
        return Refusal(400, "bad_host", "the request has more than one Host header")
    if not allowed:
        return None
    value = hosts[0].decode("latin-1").strip().lower() if hosts else ""
    host = value.rsplit(":", 1)[0] if not value.endswith("]") else value
    host = host.strip("[]")
    if host not in allowed:
        return Refusal(
            421,
            "host_not_allowed",
            "this service does not answer to that Host name; use one listed in "
            "[service] allowed_hosts",
        )
    return None


def token_digest(token: str) -> bytes:
    """SHA-256 of an agent token: what the config keeps instead of the token."""
    return hashlib.sha256(token.encode()).digest()


def authenticate(
    headers: Iterable[tuple[bytes, bytes]], agents: Mapping[bytes, str]
) -> str | Refusal:
    """The agent named by the `Authorization: Bearer` header (`agents` maps token digests to
    agent names), compared in constant time."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) != 1 or values[0][:7].lower() != b"bearer ":
        return Refusal(
            401,
            "unauthenticated",
            "send the agent's token as 'Authorization: Bearer <token>' (one header)",
        )
    digest = hashlib.sha256(values[0][7:].strip()).digest()
    found: str | None = None
    for known, name in agents.items():
        if hmac.compare_digest(known, digest):
            found = name
    if found is None:
        return Refusal(401, "unauthenticated", "the agent token is not valid for this service")
    return found


def request_headers(
    headers: Iterable[tuple[bytes, bytes]], also_drop: Iterable[bytes] = ()
) -> list[tuple[bytes, bytes]]:
    """The agent's headers that may cross to the downstream: no hop-by-hop ones (nor those
    the Connection header names), no Authorization, Host, framing or forwarding claims, no
    X-Toolpool-* and nothing in `also_drop` (lower-case names)."""
    pairs = list(headers)
    named = _connection_named(pairs)
    drop = HOP_BY_HOP | _REQUEST_DROP | named | {n.lower() for n in also_drop}
    out = []
    for name, value in pairs:
        low = name.lower()
        if (
            low in drop
            or low.startswith(_FORWARDED_PREFIX)
            or low.startswith(SERVICE_HEADER_PREFIX)
        ):
            continue
        out.append((name, value))
    return out


def response_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The downstream's response headers that may reach the agent: no hop-by-hop ones (the
    service frames the body itself) and no X-Toolpool-* (only the service sets those)."""
    pairs = list(headers)
    named = _connection_named(pairs)
    out = []
    for name, value in pairs:
        low = name.lower()
        if low in HOP_BY_HOP or low in named or low.startswith(SERVICE_HEADER_PREFIX):
            continue
        out.append((name, value))
    return out


def _connection_named(pairs: list[tuple[bytes, bytes]]) -> frozenset[bytes]:
    named: set[bytes] = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            named.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(named)
