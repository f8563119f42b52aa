"""What one attempt's outcome (a response or an exception) means to each resilience piece:
may it be retried and why, is it a failure of the destination, is it an overload signal,
and how long the server asked us to wait (Retry-After).

Pure functions, shared by the retry strategy, the breaker and the adaptive limit so that the
three agree on every outcome.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import ssl
import time

import httpx

from toolpool.errors import ToolpoolError
from toolpool.resilience._adaptive import HTTP_429, HTTP_503, TIMEOUT
from toolpool.resilience._breaker import FAILURE, IGNORE, SUCCESS

__all__ = [
    "breaker_outcome",
    "overload_signal",
    "replayable",
    "retry_after_seconds",
    "retry_reason",
]

# Failures that happened before any byte of the request left: safe to retry for any method.
_NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
# Failures of the connection after the request (maybe) left: safe only for idempotent
# requests. Read timeouts are not retried: a slow downstream does not get faster by being
# asked twice, and the caller's timeout is the caller's deadline.
_CONNECTION_LOST = (
    httpx.ReadError,
    httpx.WriteError,
    httpx.WriteTimeout,
    httpx.RemoteProtocolError,
)


# Errors that say the destination did not work: it could not be reached (in time), dropped
# the connection or spoke garbage. A read or write timeout is not among them: it fires at the
# caller's own deadline (a 1 s timeout on a 5 s completion), which says nothing about the
# destination, and must not open the breaker for every other caller.
_DESTINATION_FAILURES = (httpx.NetworkError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def replayable(request: httpx.Request) -> bool:
    """True if the request's body can be sent again (it is not a one-shot stream)."""
    return isinstance(request.stream, httpx.ByteStream)


def _certificate_failure(exc: BaseException) -> bool:
    cause = exc.__cause__
    return isinstance(cause, ssl.SSLCertVerificationError | ssl.CertificateError)


def retry_reason(
    request: httpx.Request,
    response: httpx.Response | None,
    exc: BaseException | None,
    statuses: frozenset[int],
    idempotent: bool,
) -> str | None:
    """Why this attempt may be retried ("http_503", "connect_error", "connection_lost"),
    or None when it must not be."""
    if not replayable(request):
        return None
    if exc is not None:
        if isinstance(exc, ToolpoolError) or not isinstance(exc, httpx.TransportError):
            return None  # refused locally, cancelled, or a bug: never retried
        if isinstance(exc, _NOTHING_SENT):
            return None if _certificate_failure(exc) else "connect_error"
        if idempotent and isinstance(exc, _CONNECTION_LOST):
            return "connection_lost"
        return None
    assert response is not None
    if idempotent and response.status_code in statuses:
        return f"http_{response.status_code}"
    return None


def breaker_outcome(
    response: httpx.Response | None, exc: BaseException | None, failure_statuses: frozenset[int]
) -> str:
    """SUCCESS (the destination answered), FAILURE (it did not work), or IGNORE (the
    outcome says nothing about the destination: refused locally, cancelled, a bug)."""
    if exc is not None:
        if isinstance(exc, ToolpoolError | asyncio.CancelledError):
            return IGNORE
        if isinstance(exc, _DESTINATION_FAILURES):
            return FAILURE
        return IGNORE
    assert response is not None
    return FAILURE if response.status_code in failure_statuses else SUCCESS


def overload_signal(
    response: httpx.Response | None,
    exc: BaseException | None,
    caller_connect_deadline: bool = False,
) -> str | None:
    """ "http_429", "http_503" or "timeout" when the downstream says "too much load".

    A read or write timeout is the caller's own deadline (a 1 s timeout on a 5 s completion
    says nothing about load), so it is no signal: a downstream that slows down shows in its
    latency instead. A connect timeout is one (the downstream stops accepting), unless it
    fired at a connect timeout the caller chose below the pool's (`caller_connect_deadline`).
    Local refusals and waits for a pooled connection are never signals."""
    if exc is not None:
        if (
            isinstance(exc, httpx.ConnectTimeout)
            and not isinstance(exc, ToolpoolError)
            and not caller_connect_deadline
        ):
            return TIMEOUT
        return None
    assert response is not None
    status = response.status_code
    if status == 429:
        return HTTP_429
    if status == 503:
        return HTTP_503
    return None


def retry_after_seconds(response: httpx.Response, wall_now: float | None = None) -> float | None:
    """The response's Retry-After in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        now = time.time() if wall_now is None else wall_now
        seconds = when.timestamp() - now
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)
