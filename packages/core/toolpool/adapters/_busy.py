"""What a model reads when a tool call could not run because a destination was busy."""

from __future__ import annotations

import math

from toolpool.errors import DestinationUnavailable, PoolSaturated, PoolTimeout

__all__ = ["BUSY_ERRORS", "busy_message", "find_busy", "find_cause", "retry_after_of"]

#: The errors that mean "the destination is busy or resting, try again later": adapters turn
#: them into the framework's readable error result instead of failing the run.
BUSY_ERRORS: tuple[type[Exception], ...] = (PoolSaturated, PoolTimeout, DestinationUnavailable)

# A PoolTimeout carries no estimate of its own; the caller already waited its whole acquire
# timeout, so suggesting a short pause (not another full timeout) keeps the run moving.
_TIMEOUT_RETRY_AFTER = 1.0


def find_busy(exc: BaseException) -> BaseException | None:
    """The busy error (`BUSY_ERRORS`) behind `exc`, or None.

    Looks at `exc` itself, its causes and contexts, and inside exception groups: SDKs that run
    requests in task groups (MCP clients, for one) or tools that re-raise their own error
    while handling an httpx one still report a busy destination as busy.
    """
    return find_cause(exc, BUSY_ERRORS)


def find_cause(
    exc: BaseException, types: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException | None:
    """The first error of `types` behind `exc`: itself, its causes and contexts, and inside
    exception groups."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, types):
            return current
        inner = getattr(current, "exceptions", None)  # an ExceptionGroup (3.11+)
        if isinstance(inner, tuple):
            stack.extend(e for e in inner if isinstance(e, BaseException))
        if current.__cause__ is not None:
            stack.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            stack.append(current.__context__)
    return None


def retry_after_of(exc: BaseException) -> float:
    """Seconds after which retrying `exc`'s call is likely to succeed (a hint, >= 0.1)."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and math.isfinite(value) and value > 0:
        return max(0.1, float(value))
    return _TIMEOUT_RETRY_AFTER


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def busy_message(exc: BaseException, tool_name: str) -> str:
    """The text a model reads instead of a crash when `tool_name` met a busy destination.

    It names the tool, the destination and when to retry; it never contains a secret (only
    names and numbers from the error).

    >>> err = PoolSaturated("crm", in_use=50, waiting=12, max_connections=50,
    ...                     queue_limit=100, retry_after=0.42)
    >>> busy_message(err, "search_crm")
    "tool 'search_crm' could not run: destination 'crm' is busy (12 waiting); retry in 0.4 s"
    """
    retry = _seconds(retry_after_of(exc))
    where = getattr(exc, "destination", None)
    dest = f"destination {where!r}" if where else "its destination"
    if isinstance(exc, PoolSaturated):
        what = f"is busy ({exc.waiting} waiting)"
        if exc.reason not in ("queue_full", "admission"):
            what = f"is busy ({exc.reason}, {exc.waiting} waiting)"
    elif isinstance(exc, PoolTimeout):
        what = f"is busy (no connection became free within {exc.timeout:g} s)"
    elif isinstance(exc, DestinationUnavailable):
        what = f"is unavailable ({exc.reason})"
    else:
        what = "is busy"
    return f"tool {tool_name!r} could not run: {dest} {what}; retry in {retry}"
