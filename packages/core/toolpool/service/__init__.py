"""toolpool.service: the pool behind HTTP (`toolpool serve`), as a sidecar next to one agent
process or as a central pool service shared by many.

```python
from toolpool.service import PoolService, load_config

app = PoolService(load_config("toolpool.toml"))   # an ASGI app; `toolpool serve` runs it
```

Agents call `http://<service>/d/<destination>/<path>` with `Authorization: Bearer <agent
token>` and `X-Toolpool-Tenant: <tenant>`, or use `toolpool.RemoteTransport` /
`toolpool.RemotePool`, which map ordinary URLs onto the service. The service checks the agent
and its tenant, refuses anything outside the allowlisted destinations, applies the tenant's
downstream credentials itself, and sends the request through one shared `toolpool.Pool`, so
each destination's connection cap holds across all agents. `examples/toolpool.toml` documents
the configuration; the README's "Deployment patterns" section the three ways to run it.
"""

from __future__ import annotations

import os

from toolpool.service._app import PoolService
from toolpool.service._config import (
    AgentConfig,
    AuthConfig,
    DestinationConfig,
    ServiceConfig,
    ServiceSettings,
    forbidden_address,
    load_config,
    parse_config,
)
from toolpool.service._limits import GlobalLimit, StaticShare
from toolpool.service._toml import Secret

__all__ = [
    "AgentConfig",
    "AuthConfig",
    "DestinationConfig",
    "GlobalLimit",
    "PoolService",
    "Secret",
    "ServiceConfig",
    "ServiceSettings",
    "StaticShare",
    "create_app",
    "forbidden_address",
    "load_config",
    "parse_config",
]


def create_app(config: ServiceConfig | str | os.PathLike[str]) -> PoolService:
    """The ASGI app for a `ServiceConfig` or the path of a TOML config file."""
    if not isinstance(config, ServiceConfig):
        config = load_config(config)
    return PoolService(config)
