"""A private event loop in a thread it owns: start it, run setup there, stop it, join it.

Downstream and LatencyRelay use this so that their servers run beside any caller, sync or
async, without blocking the caller's loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Literal

logger = logging.getLogger("toolpool.testing")

#: Which event loop implementation serves: uvloop when importable ("auto"), or the named one.
LoopName = Literal["auto", "asyncio", "uvloop"]


def check_loop_name(name: str) -> None:
    if name not in ("auto", "asyncio", "uvloop"):
        raise ValueError(f"loop must be 'auto', 'asyncio' or 'uvloop', got {name!r}")


def new_event_loop(name: LoopName) -> asyncio.AbstractEventLoop:
    """A new event loop of the requested implementation."""
    check_loop_name(name)
    if name != "asyncio":
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise ImportError("loop='uvloop' needs `pip install uvloop`") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class LoopThread:
    """Owns one thread running one event loop, from :meth:`start` to :meth:`stop`.

    ``setup`` runs on the loop before :meth:`start` returns (its exception is re-raised to
    the caller); ``teardown`` runs on the loop when :meth:`stop` is called, then the loop is
    closed and the thread joined.
    """

    def __init__(
        self,
        name: str,
        loop: LoopName,
        setup: Callable[[], Awaitable[None]],
        teardown: Callable[[], Awaitable[None]],
    ) -> None:
        check_loop_name(loop)
        self._name = name
        self._loop_name = loop
        self._setup = setup
        self._teardown = teardown
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._stop_requested = False
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"{self._name} is not running")
        return self._loop

    @property
    def running(self) -> bool:
        return self._ready.done() and self._ready.exception() is None and not self._done.done()

    def in_loop_thread(self) -> bool:
        return self._thread is not None and threading.get_ident() == self._thread.ident

    # -- lifecycle -----------------------------------------------------------------------

    def _begin(self) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name} was already started; create a new one")
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def start(self, timeout: float = 60.0) -> None:
        """Start the thread and wait until ``setup`` finished (re-raising its error)."""
        self._begin()
        try:
            self._ready.result(timeout)
        except BaseException:
            self._request_stop()
            self._join()
            raise

    async def astart(self) -> None:
        """Like :meth:`start`, awaiting instead of blocking the caller's loop."""
        self._begin()
        try:
            await asyncio.wrap_future(self._ready)
        except BaseException:
            self._request_stop()
            await self._ajoin()
            raise

    def stop(self, timeout: float = 60.0) -> None:
        """Run ``teardown`` on the loop, close the loop and join the thread."""
        if self.in_loop_thread():
            raise RuntimeError(f"{self._name} cannot be stopped from its own loop thread")
        self._request_stop()
        self._join(timeout)

    async def astop(self, timeout: float = 60.0) -> None:
        """Like :meth:`stop`, awaiting instead of blocking the caller's loop."""
        self._request_stop()
        await self._ajoin(timeout)

    def _request_stop(self) -> None:
        self._stop_requested = True  # read by _main after setup, before it waits
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not self._done.done():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop already closed
                pass

    def _join(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"{self._name} did not stop within {timeout} s")

    async def _ajoin(self, timeout: float = 60.0) -> None:
        if self._thread is None:
            return
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._done)), timeout)
        self._join(timeout)  # the thread has finished its work; this returns at once

    # -- the thread ----------------------------------------------------------------------

    def _run(self) -> None:
        loop = new_event_loop(self._loop_name)
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._main())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        except BaseException as exc:  # pragma: no cover - a bug in setup/teardown plumbing
            logger.exception("%s: event loop failed", self._name)
            if not self._ready.done():
                self._ready.set_exception(exc)
        finally:
            asyncio.set_event_loop(None)
            loop.close()
            self._done.set_result(None)

    async def _main(self) -> None:
        self._stop_event = asyncio.Event()
        try:
            await self._setup()
        except BaseException as exc:
            try:
                await self._teardown()
            finally:
                self._ready.set_exception(exc)
            return
        self._ready.set_result(None)
        if not self._stop_requested:
            await self._stop_event.wait()
        await self._teardown()
