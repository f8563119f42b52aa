"""Sync `FunctionTool`s that keep the caller's context variables in their worker thread.

AutoGen 0.7 runs a synchronous `FunctionTool` with `loop.run_in_executor`, which does not copy
context variables: inside the thread, `toolpool.current_auth()` is None and `httpx.Client()`
is not pooled. `ContextFunctionTool` is the same tool with one change: its function runs
through `toolpool.adapters.run_in_thread_with_context` (asyncio.to_thread semantics).
"""

from __future__ import annotations

import asyncio
from typing import Any

from autogen_core import CancellationToken
from autogen_core.tools import BaseTool, FunctionTool
from pydantic import BaseModel

from toolpool.adapters import run_in_thread_with_context

__all__ = ["ContextFunctionTool", "with_thread_context"]


class ContextFunctionTool(FunctionTool):
    """A copy of a sync `FunctionTool` whose function runs with the caller's contextvars.

    Name, description, schema and serialization are the original tool's; `original` is the
    tool it was made from.
    """

    def __init__(self, tool: FunctionTool) -> None:
        super().__init__(
            tool._func,
            tool.description,
            name=tool.name,
            global_imports=tool._global_imports,
            strict=tool._strict,
        )
        self.original = tool

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> Any:
        """Run the function in a worker thread that sees the tool call's context variables."""
        kwargs: dict[str, Any] = {
            name: getattr(args, name)
            for name in self._signature.parameters
            if name != "cancellation_token" and hasattr(args, name)
        }
        if self._has_cancellation_support:
            kwargs["cancellation_token"] = cancellation_token
        future = asyncio.ensure_future(run_in_thread_with_context(self._func, **kwargs))
        # Cancelling the token cancels the wait, as in AutoGen; the thread itself runs to its
        # end (threads cannot be interrupted), exactly like asyncio.to_thread.
        cancellation_token.link_future(future)
        return await future


def _is_sync_function_tool(tool: BaseTool[Any, Any]) -> bool:
    # Only plain FunctionTools: a subclass may have its own `run`, which we must not replace.
    return type(tool) is FunctionTool and not asyncio.iscoroutinefunction(tool._func)


# Kept on the original tool (a reference cycle the collector frees with it): building a
# FunctionTool creates a pydantic model, milliseconds that applications wrapping an agent per
# task would otherwise pay on every wrap.
_COPY_ATTR = "_toolpool_context_copy"


def with_thread_context(tool: BaseTool[Any, Any]) -> BaseTool[Any, Any]:
    """`tool`, or its `ContextFunctionTool` copy when it is a sync `FunctionTool` (made once
    per tool, again only if its function, name, description or strictness changed)."""
    if not _is_sync_function_tool(tool):
        return tool
    assert isinstance(tool, FunctionTool)
    copy = tool.__dict__.get(_COPY_ATTR)
    if not (
        isinstance(copy, ContextFunctionTool)
        and copy._func is tool._func
        and copy.name == tool.name
        and copy.description == tool.description
        and copy._strict == tool._strict
    ):
        copy = ContextFunctionTool(tool)
        tool.__dict__[_COPY_ATTR] = copy
    return copy
