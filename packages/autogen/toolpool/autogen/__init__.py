"""toolpool.autogen: put an AutoGen (autogen-agentchat 0.7) agent or team on a toolpool `Pool`.

```python
import toolpool
from toolpool.autogen import wrap

agent = wrap(agent, pool)                     # an AssistantAgent, or a whole team
with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
    await agent.run(task="...")
```

Every tool call then runs in the run's `AuthContext`, with httpx clients built by the tool on
the pool (sync `FunctionTool`s included), behind admission and an adaptive parallel-call
limit; a busy destination becomes an error `ToolResult` ("retry in N s") the model reads
instead of a crashed run. `PooledWorkbench` is the workbench `wrap` installs,
`PooledHttpTool` is AutoGen's `HttpTool` on the pool.
"""

from __future__ import annotations

from toolpool.autogen._function_tool import ContextFunctionTool
from toolpool.autogen._http_tool import PooledHttpTool
from toolpool.autogen._workbench import (
    DEFAULT_MAX_PARALLEL_TOOL_CALLS,
    DEFAULT_MAX_WAIT,
    PooledWorkbench,
)
from toolpool.autogen._wrap import TESTED_AUTOGEN_VERSIONS, assistant_agents, unwrap, wrap

__all__ = [
    "DEFAULT_MAX_PARALLEL_TOOL_CALLS",
    "DEFAULT_MAX_WAIT",
    "TESTED_AUTOGEN_VERSIONS",
    "ContextFunctionTool",
    "PooledHttpTool",
    "PooledWorkbench",
    "assistant_agents",
    "unwrap",
    "wrap",
]
