"""toolpool.mcp: initialized MCP sessions pooled per (MCP server, auth context).

```python
import toolpool
from toolpool.mcp import McpServer, sessions_of

crm = McpServer("http://127.0.0.1:8000/mcp")
sessions = sessions_of(pool)                 # shared by the LangChain, CrewAI, AutoGen adapters
with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
    tools = await sessions.list_tools(crm)     # one initialize per (server, tenant), then cached
    result = await sessions.call_tool(crm, "lookup", {"id": 7})
```

A session's requests run on the pool for its tenant (the destination's auth provider gives
each tenant its own credentials and connections); a busy pool surfaces as the pool's own
`PoolSaturated` / `PoolTimeout` for the one call that met it, any other failure as
`toolpool.errors.McpUnavailable`, never as a hang (see `McpSessions`). Needs the `mcp`
package (`pip install "toolpool[mcp]"`).
"""

from __future__ import annotations

from toolpool.errors import McpUnavailable
from toolpool.mcp._sessions import (
    McpServer,
    McpSessions,
    McpSessionStats,
    failure_message,
    sessions_of,
)

__all__ = [
    "McpServer",
    "McpSessionStats",
    "McpSessions",
    "McpUnavailable",
    "failure_message",
    "sessions_of",
]
