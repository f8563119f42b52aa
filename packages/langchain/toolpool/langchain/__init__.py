"""toolpool.langchain: pool an existing LangChain / LangGraph agent's tool calls in one call.

```python
import toolpool
from toolpool.langchain import wrap

agent = wrap(agent, pool, auth=lambda run: toolpool.AuthContext(tenant=run.context.tenant_id))
agent.invoke({"messages": [...]}, context=MyContext(tenant_id="acme"))
```

or, when you build the agent yourself (public LangChain API, preferred):

```python
from toolpool.langchain import ToolpoolMiddleware

agent = create_agent(model, tools, middleware=[ToolpoolMiddleware(pool, auth=...)])
```

Tools need no edit: `httpx.Client()` / `httpx.AsyncClient()` they build inside a tool call
send through the pool, on connections of the run's tenant only. A busy destination becomes a
readable tool result ("... busy, retry in N s") instead of an exception that ends the run.
MCP tools on pooled MCP sessions (one per server and tenant): `await mcp_tools(pool, ...)`;
langchain-mcp-adapters' own per-call sessions pool their connections with
`mcp_client_factory(pool)`.
"""

from __future__ import annotations

from toolpool.langchain._mcp import mcp_client_factory, mcp_tools
from toolpool.langchain._middleware import AUTH_HINT, ToolpoolMiddleware
from toolpool.langchain._wrap import (
    TESTED_LANGGRAPH_PREBUILT,
    check_tool_node_hooks,
    middleware_of,
    tool_nodes,
    wrap,
)

__all__ = [
    "AUTH_HINT",
    "TESTED_LANGGRAPH_PREBUILT",
    "ToolpoolMiddleware",
    "check_tool_node_hooks",
    "mcp_client_factory",
    "mcp_tools",
    "middleware_of",
    "tool_nodes",
    "wrap",
]
