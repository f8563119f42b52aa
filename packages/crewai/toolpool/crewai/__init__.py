"""toolpool.crewai: pool, tenant-bind and gate every tool call of an existing CrewAI crew.

```python
import toolpool
from toolpool.crewai import wrap

pool = toolpool.Pool([toolpool.Destination("crm", "https://crm.internal", documented_limit=100)])
crew = wrap(crew, pool, auth=lambda inputs: toolpool.AuthContext(tenant=inputs["tenant_id"]))
crew.kickoff(inputs={"tenant_id": "acme", "topic": "renewals"})   # also kickoff_async / akickoff
```

Tools need no edit: the `httpx.Client()` / `httpx.AsyncClient()` / `requests` sessions they
build inside a call go through the pool, acting for the kickoff's tenant. When a destination
saturates, the model reads "busy, retry in N s" as the tool's error instead of the run failing.
`toolpool.crewai.testing.ScriptedLLM` is an offline model for tests and demos.
"""

from __future__ import annotations

from toolpool.crewai._compat import TESTED_CREWAI, UnsupportedCrewAI
from toolpool.crewai._tools import ToolBusy, ToolDenied, is_wrapped
from toolpool.crewai._wrap import unwrap, wrap

__all__ = [
    "TESTED_CREWAI",
    "ToolBusy",
    "ToolDenied",
    "UnsupportedCrewAI",
    "is_wrapped",
    "unwrap",
    "wrap",
]
