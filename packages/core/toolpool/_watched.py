"""Response bodies that report, once, when their call is over: read to the end, failed,
closed, or dropped unread (then from the pool's maintenance thread, since a finalizer must not
take locks its thread may hold). Used by the layers that count calls in flight (the
resilience policy, the hierarchical overflow)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from toolpool._destination import PoolHost

__all__ = ["WatchedStream"]


class WatchedStream(httpx.AsyncByteStream, httpx.SyncByteStream):
    """Wraps a response's (sync or async) stream; calls `on_done()` exactly once."""

    def __init__(self, inner: Any, on_done: Callable[[], None], pool: PoolHost) -> None:
        self._inner = inner
        self._on_done: Callable[[], None] | None = on_done
        self._pool = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            self._finish()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        finally:
            self._finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        done, self._on_done = self._on_done, None
        if done is not None:
            done()

    def __del__(self) -> None:
        done, self._on_done = self._on_done, None
        if done is None:
            return
        self._pool._defer(done)
