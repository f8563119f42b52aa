"""httpx transports over a `Pool`: any httpx-based client or SDK becomes pooled by one."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import httpx

from toolpool._auth_context import _current

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool

__all__ = ["AsyncTransport", "Transport"]


class Pool(Protocol):
    """What a transport needs of a `toolpool.Pool`: the destination of a request URL (so
    this module sits below the pool, which hands out clients built on it)."""

    def route(self, url: httpx.URL) -> DestinationPool: ...


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
        # The destination's whole send chain (see toolpool._chain), for the current context.
        dest = self.pool.route(request.url)
        return await dest.async_send(request, _current.get())

    async def aclose(self) -> None:
        """Does nothing: the pool is closed by its owner (`pool.aclose()`)."""


class Transport(httpx.BaseTransport):
    """An `httpx.BaseTransport` (sync, thread-safe) that sends every request through `pool`."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        dest = self.pool.route(request.url)
        return dest.sync_send(request, _current.get())

    def close(self) -> None:
        """Does nothing: the pool is closed by its owner (`pool.close()`)."""
