"""toolpool.adapters: what every agent-framework adapter needs, written once.

The LangChain, CrewAI and AutoGen adapters only translate their framework's hooks into these
helpers; none of them is imported here, and this package imports no agent framework.

```python
from toolpool.adapters import (
    Admission, AdaptiveToolConcurrency, busy_message, find_busy, resolve_auth, tool_call_scope,
)

ctx = resolve_auth(auth, run_input, framework="myframework", hint="pass tenant=... to run()")
with limiter.slot_sync() as slot:
    try:
        with admission.hold_sync(tool_name), tool_call_scope(   # waits while saturated
            pool, ctx, tool_name=tool_name, admission=admission
        ):
            result = tool(**args)                  # its own httpx.Client() is pooled
    except Exception as exc:
        if (busy := find_busy(exc)) is None:
            raise
        slot.busy()
        result = busy_message(busy, tool_name)     # what the model reads
    else:
        slot.success()
```

- `AuthSource`, `resolve_auth`: which `AuthContext` a run acts for.
- `tool_call_scope`, `atool_call_scope`: run a tool body as one tool call (auth context,
  transparent pooling of the httpx clients it builds, destination learning).
- `run_in_thread_with_context`: run a sync tool in a worker thread, context copied.
- `Admission`: wait (boundedly) while a destination the tool uses is saturated; `hold` keeps
  the call counted against the destination's capacity while it runs; destinations not known
  up front are gated by the scope on the call's first request to them.
- `AdaptiveToolConcurrency`: AIMD limit on parallel tool calls, fed by busy signals.
- `BUSY_ERRORS`, `find_busy`, `busy_message`: which errors mean "busy" (also when wrapped
  in another error or an exception group) and what the model reads.
- `find_denied`, `denied_message`: a connect the egress policy refused (`EgressDenied`) and
  the tool error the model reads instead ("tool ... could not run: address ... is not
  allowed by the egress policy").
- `find_mcp_failure`, `mcp_failure_message`, `is_mcp_tool`: an MCP failure (a server gone, a
  dead session, an MCP error, in whatever exception group the MCP client raised it) and the
  tool error the model reads instead ("tool ... could not run: MCP server unavailable ...").
- `RequestsAdapter`, `install_requests_patch`: the same transparent pooling for tools written
  with `requests` (imported on first use: `requests` is not a dependency of the core).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from toolpool.adapters._admission import Admission, Held
from toolpool.adapters._auth import AuthSource, resolve_auth
from toolpool.adapters._busy import BUSY_ERRORS, busy_message, find_busy, retry_after_of
from toolpool.adapters._concurrency import AdaptiveToolConcurrency, ToolSlot
from toolpool.adapters._denied import denied_message, find_denied
from toolpool.adapters._mcp_failure import find_mcp_failure, is_mcp_tool, mcp_failure_message
from toolpool.adapters._scope import (
    ToolCall,
    atool_call_scope,
    current_tool_call,
    install_httpx_patch,
    mcp_transport,
    run_in_thread_with_context,
    tool_call_scope,
)

__all__ = [
    "BUSY_ERRORS",
    "AdaptiveToolConcurrency",
    "Admission",
    "AuthSource",
    "Held",
    "ToolCall",
    "ToolSlot",
    "atool_call_scope",
    "busy_message",
    "current_tool_call",
    "denied_message",
    "find_busy",
    "find_denied",
    "find_mcp_failure",
    "install_httpx_patch",
    "is_mcp_tool",
    "mcp_failure_message",
    "mcp_transport",
    "resolve_auth",
    "retry_after_of",
    "run_in_thread_with_context",
    "tool_call_scope",
]

if TYPE_CHECKING:
    from toolpool.adapters._requests import RequestsAdapter as RequestsAdapter
    from toolpool.adapters._requests import install_requests_patch as install_requests_patch


def __getattr__(name: str) -> Any:
    # `requests` is optional for the core, so its adapter is imported on first use.
    if name in ("RequestsAdapter", "install_requests_patch"):
        from toolpool.adapters import _requests

        return getattr(_requests, name)
    raise AttributeError(f"module 'toolpool.adapters' has no attribute {name!r}")
