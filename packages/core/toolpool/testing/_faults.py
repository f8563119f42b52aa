"""Server-side faults: what can be armed on a service, and which armed faults fire when."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from typing import Literal, get_args

FaultKind = Literal[
    "close_after_response",
    "reset",
    "status",
    "slow",
    "down",
    "goaway",
    "rst_stream",
    "refused_stream",
    "max_streams_1",
    "silent",
    "http1",
]
#: Which requests a fault applies to: API requests, token-endpoint requests, or both.
FaultEndpoint = Literal["api", "token", "any"]

FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
#: Kinds that act on one request of an HTTP/2 connection (not eligible on HTTP/1.1).
H2_REQUEST_KINDS: frozenset[str] = frozenset({"goaway", "rst_stream", "refused_stream"})
#: Kinds that act on a whole connection when it is made (``down``, ``http1``, ``max_streams_1``)
#: or when it next receives bytes (``silent``); ``count`` counts connections.
CONNECTION_KINDS: frozenset[str] = frozenset({"down", "http1", "max_streams_1", "silent"})
FAULT_HEADER = "x-testbed-fault"
_INTERNAL_ERROR = 0x2  # RFC 9113 7: error codes
_REFUSED_STREAM = 0x7


@dataclass(frozen=True)
class Fault:
    """One armed fault (see ``Downstream.set_fault`` for the meaning of each kind).

    ``count``: fire this many times then disarm (``None``: until cleared). ``probability``:
    fire on this fraction of the eligible requests or connections (``None``: all of them).
    """

    kind: FaultKind
    count: int | None = None
    probability: float | None = None
    retry_after: float | None = None
    status: int | None = None
    delay: float | None = None
    endpoint: FaultEndpoint = "api"

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; use one of {sorted(FAULT_KINDS)}")
        if self.endpoint not in get_args(FaultEndpoint):
            raise ValueError(f"endpoint must be 'api', 'token' or 'any', got {self.endpoint!r}")
        if self.count is not None and self.count < 1:
            raise ValueError(f"count must be >= 1 or None, got {self.count!r}")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be within [0, 1], got {self.probability!r}")
        if self.kind == "slow" and (self.delay is None or self.delay < 0):
            raise ValueError("a 'slow' fault needs delay=<seconds >= 0>")
        if self.status is not None and not 400 <= self.status <= 599:
            raise ValueError(f"status must be a 4xx or 5xx code, got {self.status!r}")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError(f"retry_after must be >= 0, got {self.retry_after!r}")


class Effects:
    """What the faults that fired on one request ask the server to do."""

    __slots__ = (
        "close_after_response",
        "delay",
        "drop",
        "goaway",
        "reset",
        "retry_after",
        "rst_stream",
        "status",
    )

    def __init__(self) -> None:
        self.goaway = False
        #: An HTTP/2 error code to reset the request's stream with (RST_STREAM), or None.
        self.rst_stream: int | None = None
        self.drop = False
        self.reset = False
        self.status: int | None = None
        self.retry_after: float | None = None
        self.delay = 0.0
        self.close_after_response = False

    @property
    def pre_empts(self) -> bool:
        """True when a fault takes the request instead of the service (down, reset, status,
        and the HTTP/2 kinds goaway, rst_stream, refused_stream)."""
        return (
            self.drop
            or self.reset
            or self.status is not None
            or self.goaway
            or self.rst_stream is not None
        )

    def apply(self, fault: Fault) -> None:
        kind = fault.kind
        if kind == "down":
            self.drop = True
        elif kind == "reset":
            self.reset = True
        elif kind == "status":
            self.status = fault.status or 503
            self.retry_after = fault.retry_after
        elif kind == "slow":
            self.delay += fault.delay or 0.0
        elif kind == "goaway":
            self.goaway = True
        elif kind == "rst_stream":
            self.rst_stream = _INTERNAL_ERROR
        elif kind == "refused_stream":
            self.rst_stream = _REFUSED_STREAM
        else:
            self.close_after_response = True


class _Armed:
    __slots__ = ("fault", "remaining")

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self.remaining = fault.count


class FaultBoard:
    """The faults armed on one service; thread-safe to arm from any thread.

    The server loop asks :meth:`on_connection` for each new connection and :meth:`on_request`
    for each request; with nothing armed both cost one attribute read.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._lock = threading.Lock()
        self._armed: tuple[_Armed, ...] = ()

    def arm(self, fault: Fault) -> None:
        """Arm ``fault``, replacing an armed fault of the same kind and endpoint."""
        with self._lock:
            kept = tuple(
                a
                for a in self._armed
                if (a.fault.kind, a.fault.endpoint) != (fault.kind, fault.endpoint)
            )
            self._armed = (*kept, _Armed(fault))

    def clear(self) -> None:
        with self._lock:
            self._armed = ()

    def armed(self) -> tuple[Fault, ...]:
        return tuple(a.fault for a in self._armed)

    def on_connection(self, kind: str = "down") -> bool:
        """Whether a connection-level fault of ``kind`` (``down``, ``http1``, ``max_streams_1``,
        ``silent``) fires on this connection."""
        if not self._armed:
            return False
        with self._lock:
            return any(self._fire_locked(a) for a in self._armed if a.fault.kind == kind)

    def on_request(
        self, endpoint: Literal["api", "token"], fired: list[str], *, http2: bool = False
    ) -> Effects | None:
        """The effects of the faults that fire on one request; their kinds go to ``fired``.

        Connection-level kinds never fire here; the HTTP/2 request kinds only when ``http2``.
        """
        if not self._armed:
            return None
        effects: Effects | None = None
        with self._lock:
            for armed in self._armed:
                kind = armed.fault.kind
                if kind in CONNECTION_KINDS and kind != "down":
                    continue
                if kind in H2_REQUEST_KINDS and not http2:
                    continue
                if armed.fault.endpoint not in (endpoint, "any") or not self._fire_locked(armed):
                    continue
                if effects is None:
                    effects = Effects()
                effects.apply(armed.fault)
                fired.append(armed.fault.kind)
        return effects

    def _fire_locked(self, armed: _Armed) -> bool:
        fault = armed.fault
        if fault.probability is not None and self._rng.random() >= fault.probability:
            return False
        if armed.remaining is not None:
            armed.remaining -= 1
            if armed.remaining <= 0:
                self._armed = tuple(a for a in self._armed if a is not armed)
        return True


def parse_fault_header(value: str) -> Fault:
    """Parse ``X-Testbed-Fault: kind[;key=value...]``, e.g. ``status;status=429;retry_after=2``.

    Raises ``ValueError`` with a readable message for anything malformed.
    """
    kind, *options = (p.strip() for p in value.split(";"))
    kwargs: dict[str, float | int] = {}
    for option in filter(None, options):
        key, sep, raw = option.partition("=")
        key = key.strip()
        if not sep or key not in ("status", "retry_after", "delay"):
            raise ValueError(f"bad fault option {option!r}; use status=, retry_after= or delay=")
        kwargs[key] = int(raw) if key == "status" else float(raw)
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; use one of {sorted(FAULT_KINDS)}")
    if kind in CONNECTION_KINDS:
        raise ValueError(f"{kind!r} acts on connections; arm it with Downstream.set_fault")
    return Fault(kind, endpoint="any", **kwargs)  # type: ignore[arg-type]
