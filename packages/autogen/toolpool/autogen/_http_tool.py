"""`PooledHttpTool`: AutoGen's `HttpTool`, sending its requests through a toolpool `Pool`.

`autogen_ext.tools.http.HttpTool.run` opens a new `httpx.AsyncClient` (a new TCP connection,
TLS handshake and, with an auth provider, token fetch) for every call. `PooledHttpTool` runs
the same `run` inside `toolpool.adapters.atool_call_scope`, where that client is built on the
pool's transport: requests reuse the pool's connections of the call's `AuthContext` and get
the destination's auth provider and limits. Inside a wrapped agent (`toolpool.autogen.wrap`) a
plain `HttpTool` is pooled the same way already; `PooledHttpTool` is for tools run elsewhere.
"""

from __future__ import annotations

from typing import Any, Literal

from autogen_core import CancellationToken
from autogen_ext.tools.http import HttpTool
from pydantic import BaseModel

from toolpool import Pool
from toolpool.adapters import AuthSource, atool_call_scope, resolve_auth
from toolpool.errors import ConfigError

__all__ = ["PooledHttpTool"]

_AUTH_HINT = (
    "pass auth=toolpool.AuthContext(...) to PooledHttpTool, or run the tool inside "
    "`with toolpool.auth_context(ctx):`"
)


class PooledHttpTool(HttpTool):
    """An `HttpTool` whose requests go through `pool`.

    ```python
    tool = PooledHttpTool(
        name="get_contact", host="127.0.0.1", port=8080, path="/contacts/{id}", method="GET",
        json_schema={"type": "object", "properties": {"id": {"type": "string"}},
                     "required": ["id"]},
        pool=pool,
    )
    # or from an existing tool:  PooledHttpTool.from_tool(http_tool, pool)
    ```

    Arguments are `HttpTool`'s, plus `pool` and `auth` (an `AuthContext`, a function called
    with None returning one, or None for the context current when the tool runs). Busy
    destinations raise `toolpool.PoolSaturated` / `PoolTimeout`, which a `PooledWorkbench`
    turns into a "retry in N s" result. `dump_component()` saves a plain `HttpTool`.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        json_schema: dict[str, Any],
        headers: dict[str, Any] | None = None,
        description: str = "HTTP tool",
        path: str = "/",
        scheme: Literal["http", "https"] = "http",
        method: Literal["GET", "POST", "PUT", "DELETE", "PATCH"] = "POST",
        return_type: Literal["text", "json"] = "text",
        timeout: float = 5.0,
        *,
        pool: Pool,
        auth: AuthSource = None,
    ) -> None:
        if not isinstance(pool, Pool):
            raise ConfigError(f"PooledHttpTool needs pool=toolpool.Pool(...), not {pool!r}")
        super().__init__(
            name=name,
            host=host,
            port=port,
            json_schema=json_schema,
            headers=headers,
            description=description,
            path=path,
            scheme=scheme,
            method=method,
            return_type=return_type,
            timeout=timeout,
        )
        self._pool = pool
        self._auth = auth

    @classmethod
    def from_tool(cls, tool: HttpTool, pool: Pool, *, auth: AuthSource = None) -> PooledHttpTool:
        """The same tool as `tool` (same config), on `pool`."""
        config = tool._to_config().model_dump()
        return cls(**config, pool=pool, auth=auth)

    @property
    def pool(self) -> Pool:
        """The pool the tool's requests go through."""
        return self._pool

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        """`HttpTool.run`, with its per-call httpx client on the pool's transport."""
        ctx = resolve_auth(self._auth, None, framework="autogen", hint=_AUTH_HINT)
        async with atool_call_scope(self._pool, ctx, tool_name=self.name):
            return await super().run(args, cancellation_token)
