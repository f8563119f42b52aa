"""httpx transports over a `Pool`: any httpx-based client or SDK becomes pooled by one."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from toolpool._async import request as async_request
from toolpool._sync import request as sync_request

if TYPE_CHECKING:
    from toolpool._pool import Pool

__all__ = ["AsyncTransport", "Transport"]


class AsyncTransport(httpx.AsyncBaseTransport):
    """An `httpx.AsyncBaseTransport` that sends every request through `pool`.

    ```python
    client = httpx.AsyncClient(transport=toolpool.AsyncTransport(pool))
    # or any SDK that accepts an httpx client:  openai.AsyncOpenAI(http_client=client)
    ```

    Closing the client (or this transport) does not close the pool: the pool outlives the
    many short-lived clients that tool code creates.
    """

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await async_request.handle_request(self.pool, request)

    async def aclose(self) -> None:
        """Does nothing: the pool is closed by its owner (`pool.aclose()`)."""


class Transport(httpx.BaseTransport):
    """An `httpx.BaseTransport` (sync, thread-safe) that sends every request through `pool`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return sync_request.handle_request(self.pool, request)

    def close(self) -> None:
        """Does nothing: the pool is closed by its owner (`pool.close()`)."""
