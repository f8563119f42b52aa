"""toolpool: shared, auth-affine, burst-tolerant connection pools for AI-agent tool calls.

```python
import toolpool

pool = toolpool.Pool([toolpool.Destination("crm", "https://crm.internal", documented_limit=100)])
async with pool:
    with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
        r = await pool.client().get("https://crm.internal/contacts")
```

Importing toolpool imports no agent framework; the adapters live in `toolpool.langchain`,
`toolpool.crewai` and `toolpool.autogen`.
"""

from __future__ import annotations

import pkgutil

# The adapters (toolpool.langchain, toolpool.crewai, toolpool.autogen) live in their own
# folders of the repository; in an editable install each folder is a sys.path entry, so the
# package path is extended over them. In a wheel they sit inside this folder already.
__path__ = pkgutil.extend_path(__path__, __name__)

from toolpool import auth, resilience
from toolpool._auth_context import AuthContext, auth_context, current_auth
from toolpool._config import Destination, PoolDefaults
from toolpool._destination import DestinationPool
from toolpool._egress import Egress
from toolpool._overflow import OverflowStats
from toolpool._pool import Pool
from toolpool._remote import RemotePool, RemoteTransport
from toolpool._stats import DestinationStats, PoolStats
from toolpool._transport import AsyncTransport, Transport
from toolpool._version import __version__
from toolpool.errors import (
    AuthError,
    ConfigError,
    DestinationUnavailable,
    EgressDenied,
    PoolClosed,
    PoolSaturated,
    PoolTimeout,
    ToolpoolError,
    UnknownDestination,
)

__all__ = [
    "AsyncTransport",
    "AuthContext",
    "AuthError",
    "ConfigError",
    "Destination",
    "DestinationPool",
    "DestinationStats",
    "DestinationUnavailable",
    "Egress",
    "EgressDenied",
    "OverflowStats",
    "Pool",
    "PoolClosed",
    "PoolDefaults",
    "PoolSaturated",
    "PoolStats",
    "PoolTimeout",
    "RemotePool",
    "RemoteTransport",
    "ToolpoolError",
    "Transport",
    "UnknownDestination",
    "__version__",
    "auth",
    "auth_context",
    "current_auth",
    "resilience",
]
