"""What a model reads when a tool call could not run because the egress policy refused the
address it was about to connect to (`toolpool.EgressDenied`)."""

from __future__ import annotations

from toolpool.adapters._busy import find_cause
from toolpool.errors import EgressDenied

__all__ = ["denied_message", "find_denied"]


def find_denied(exc: BaseException) -> EgressDenied | None:
    """The `EgressDenied` behind `exc` (itself, a cause or context, or inside an exception
    group: SDKs and tools often re-raise their own error while handling httpx's), or None."""
    found = find_cause(exc, EgressDenied)
    return found if isinstance(found, EgressDenied) else None


def denied_message(exc: EgressDenied, tool_name: str) -> str:
    """The text a model reads instead of a crash: the tool, the refused address and the rule.
    Never a query string or a secret: only the host, the address and the policy's rule.

    >>> err = EgressDenied(destination="http://metadata.test", host="metadata.test",
    ...     address="169.254.169.254", rule="metadata", reason="...")
    >>> print(denied_message(err, "fetch_url"))  # doctest: +NORMALIZE_WHITESPACE
    tool 'fetch_url' could not run: address 169.254.169.254 (host 'metadata.test') is not
    allowed by the egress policy (rule metadata); do not retry it
    """
    what = (
        f"address {exc.address} (host {exc.host!r})"
        if exc.address is not None
        else f"host {exc.host!r}"
    )
    return (
        f"tool {tool_name!r} could not run: {what} is not allowed by the egress policy "
        f"(rule {exc.rule}); do not retry it"
    )
