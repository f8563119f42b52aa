"""Tool schemas computed once per tool, not on every list of an agent's tools.

AutoGen 0.7 lists an agent's tools (`workbench.list_tools()`) before every model turn and again
before every single tool call, and a `StaticWorkbench` rebuilds each tool's JSON schema every
time (`BaseTool.schema` -> pydantic `model_json_schema`, ~1.3 ms per tool on a 2-core machine).
An agent with 5 tools making 4 tool calls in a run pays ~30 schemas, ~40 ms of CPU in one
event loop, per run (issue 25: 3.9 s of CPU of a 24 s storm). A `BaseTool`'s schema depends only
on its arguments model, name, description and strict flag, so `tool_schema` keys a cache on
exactly those: a tool renamed or redescribed gets a new schema, and a subclass that computes
its own `schema` is never cached.
"""

from __future__ import annotations

import copy
import threading
import weakref
from typing import Any

from autogen_core.tools import BaseTool, ToolSchema

__all__ = ["tool_schema"]

# args model class -> {(name, description, strict): schema}; weak on the class, so a tool's
# entry goes when its arguments model does.
_cache: weakref.WeakKeyDictionary[type, dict[tuple[str, str, bool], ToolSchema]] = (
    weakref.WeakKeyDictionary()
)
_lock = threading.Lock()


def _cache_key(tool: Any) -> tuple[type, tuple[str, str, bool]] | None:
    if not isinstance(tool, BaseTool) or type(tool).schema is not BaseTool.schema:
        return None
    try:
        args_type = tool._args_type
        key = (tool._name, tool._description, tool._strict)
    except AttributeError:  # another AutoGen version: compute it every time, as AutoGen does
        return None
    if not isinstance(args_type, type) or not all(isinstance(k, str) for k in key[:2]):
        return None
    return args_type, (key[0], key[1], bool(key[2]))


def tool_schema(tool: Any) -> ToolSchema:
    """`tool.schema`, computed once per (arguments model, name, description, strict).

    Every caller gets its own copy: a model client may change the dict it is given.
    """
    found = _cache_key(tool)
    if found is None:
        schema: ToolSchema = tool.schema
        return schema
    args_type, key = found
    with _lock:
        cached = _cache.get(args_type, {}).get(key)
    if cached is None:
        cached = tool.schema  # outside the lock: it may take milliseconds
        with _lock:
            _cache.setdefault(args_type, {})[key] = cached
    return copy.deepcopy(cached)
