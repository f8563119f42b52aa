"""The long-lived event loop that runs async tool bodies reached from CrewAI's sync paths.

CrewAI runs an async tool (`@tool async def ...`, an `async def _run`) with `asyncio.run`:
a new event loop for every call. Connections of toolpool's asyncio driver belong to the loop
they were opened on, so on throwaway loops an `httpx.AsyncClient()` in a tool could never
reuse one, and each call would leave an idle connection on a dead loop. Running those bodies
on one loop that lives as long as the process gives them the same reuse as sync tools. The
body keeps the caller's context variables (auth context, tool call), copied in.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["in_running_loop", "run_on_tool_loop"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def _tool_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            loop = asyncio.new_event_loop()
            started = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                loop.run_forever()

            # A daemon: it holds no state of its own that must be flushed at exit (the pool,
            # closed by its owner, closes the connections on it gracefully while it runs).
            thread = threading.Thread(target=serve, name="toolpool-crewai-async-tools", daemon=True)
            thread.start()
            started.wait()
            _loop, _thread = loop, thread
        return _loop


def in_running_loop() -> bool:
    """Whether the calling thread is running an event loop right now."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def run_on_tool_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on the tool loop with the caller's context variables; block for its result.

    Call it from a thread that is not running an event loop (a CrewAI worker thread).
    """
    ctx = contextvars.copy_context()

    async def with_context() -> T:
        for var, value in ctx.items():
            var.set(value)
        return await coro

    loop = _tool_loop()
    if threading.current_thread() is _thread:
        coro.close()
        raise RuntimeError("run_on_tool_loop() called from the tool loop itself; await instead")
    future = asyncio.run_coroutine_threadsafe(with_context(), loop)
    try:
        return future.result()
    except BaseException:
        future.cancel()
        raise
