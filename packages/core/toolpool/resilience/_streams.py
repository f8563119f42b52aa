"""Response bodies of the resilience layer: a call counts as in flight until its response
body is read, fails or is closed; then the layer grants waiting admissions and re-assesses."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from toolpool.resilience._runtime import PolicyRuntime

__all__ = ["TrackedAsyncStream", "TrackedSyncStream"]


def _finish_later(runtime: PolicyRuntime, counted: bool) -> None:
    """A response was dropped unread: count its call as done, from the pool's own thread
    (a finalizer must not take locks its thread may hold)."""
    maint = runtime.dest.pool._maint
    if maint is not None and not maint.stopped:
        maint.call_soon(lambda: runtime._leave(counted))


class TrackedAsyncStream(httpx.AsyncByteStream):
    """A response body that reports the end of its call when read, failed or closed."""

    __slots__ = ("_counted", "_done", "_inner", "_runtime")

    def __init__(self, inner: Any, runtime: PolicyRuntime, counted: bool) -> None:
        self._inner = inner
        self._runtime = runtime
        self._counted = counted
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            self._finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._runtime._leave(self._counted)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            _finish_later(self._runtime, self._counted)


class TrackedSyncStream(httpx.SyncByteStream):
    """The sync twin of `TrackedAsyncStream`."""

    __slots__ = ("_counted", "_done", "_inner", "_runtime")

    def __init__(self, inner: Any, runtime: PolicyRuntime, counted: bool) -> None:
        self._inner = inner
        self._runtime = runtime
        self._counted = counted
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        finally:
            self._finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._runtime._leave(self._counted)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            _finish_later(self._runtime, self._counted)
