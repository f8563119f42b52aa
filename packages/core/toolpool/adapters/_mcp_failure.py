"""What a model reads when an MCP tool call failed for a reason that is not the tool's own.

MCP clients report a server that is gone, a session that died or a request the server
refused in many shapes: `McpError` (a JSON-RPC error, or "Connection closed"), anyio's
`ClosedResourceError` / `BrokenResourceError` from a session whose streams closed, httpx's
transport errors from the session's own tasks, and exception groups of any of these from
the client's task groups. `find_mcp_failure` finds such a failure behind an exception and
`mcp_failure_message` is the tool error the model reads instead of a crashed run: "tool 'x'
could not run: MCP server unavailable (...); retry later". None of this imports `mcp`.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx

from toolpool.adapters._busy import find_cause
from toolpool.errors import McpUnavailable

__all__ = ["find_mcp_failure", "is_mcp_tool", "mcp_failure_message"]

# Errors that only an MCP client's session raises: an MCP failure wherever they come from.
_SESSION_ERRORS: tuple[type[BaseException], ...] = (
    McpUnavailable,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)
# Errors of the network under an MCP tool: an MCP failure when the tool is an MCP tool.
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    httpx.TransportError,
    httpx.HTTPStatusError,
    ConnectionError,
    TimeoutError,
)
# Modules whose tool functions call an MCP server.
_MCP_TOOL_MODULES = ("langchain_mcp_adapters", "toolpool.langchain._mcp")


def _mcp_error_type() -> type[BaseException] | None:
    try:
        from mcp import McpError
    except ImportError:  # pragma: no cover - only without the mcp package
        return None
    return McpError


def is_mcp_tool(tool: Any) -> bool:
    """Whether a framework tool object calls an MCP server (langchain-mcp-adapters' tools,
    `toolpool.langchain.mcp_tools`)."""
    for attr in ("coroutine", "func"):
        fn = getattr(tool, attr, None)
        module = getattr(fn, "__module__", None) or ""
        if module.startswith(_MCP_TOOL_MODULES):
            return True
    return False


def find_mcp_failure(exc: BaseException, *, mcp_tool: bool = False) -> BaseException | None:
    """The MCP failure behind `exc` (itself, its causes, inside exception groups), or None.

    `McpError`, `McpUnavailable` and anyio's closed-stream errors always count; with
    `mcp_tool` (the failing tool is an MCP tool) so do httpx transport and status errors,
    `ConnectionError` and `TimeoutError`: for such a tool they mean the server is gone."""
    kinds = _SESSION_ERRORS + (_TRANSPORT_ERRORS if mcp_tool else ())
    mcp_error = _mcp_error_type()
    if mcp_error is not None:
        kinds = (mcp_error, *kinds)
    return find_cause(exc, kinds)


def mcp_failure_message(exc: BaseException, tool_name: str) -> str:
    """The text a model reads for MCP tool `tool_name` failing with `exc` (an MCP failure,
    see `find_mcp_failure`). It names the tool and the kind of failure; never a URL's query
    or a header (secrets)."""
    if isinstance(exc, McpUnavailable):
        return f"tool {tool_name!r} could not run: {exc}"
    mcp_error = _mcp_error_type()
    if mcp_error is not None and isinstance(exc, mcp_error):
        message = str(getattr(getattr(exc, "error", None), "message", "") or exc)
        if message.startswith("toolpool: ") or "closed" in message.lower():
            detail = message.removeprefix("toolpool: ")
            return _unavailable(tool_name, detail)
        return f"tool {tool_name!r} failed: the MCP server answered {message[:300]!r}"
    if isinstance(exc, httpx.HTTPStatusError):
        detail = f"HTTP {exc.response.status_code}"
    elif isinstance(exc, anyio.ClosedResourceError | anyio.BrokenResourceError):
        detail = "the MCP session was closed"
    elif isinstance(exc, anyio.EndOfStream):
        detail = "the MCP session ended"
    else:
        text = str(exc).split("?", 1)[0]
        detail = f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
    return _unavailable(tool_name, detail)


def _unavailable(tool_name: str, detail: str) -> str:
    return (
        f"tool {tool_name!r} could not run: MCP server unavailable ({detail}); "
        f"retry later, or check that the server is up"
    )
