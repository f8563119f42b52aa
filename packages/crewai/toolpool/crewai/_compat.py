"""Which CrewAI this adapter works with, checked once before the first wrap.

The adapter replaces methods on tool and agent instances that CrewAI does not document as
extension points (`BaseTool.run` / `_run`, `Agent.create_agent_executor`). If a CrewAI release
moves them, wrapping must fail loudly rather than leave tool calls silently unpooled.
"""

from __future__ import annotations

import functools
import inspect

from toolpool.errors import ToolpoolError

__all__ = ["TESTED_CREWAI", "UnsupportedCrewAI", "check_crewai"]

#: The CrewAI release the adapter's tests ran against.
TESTED_CREWAI = "1.15.30"


class UnsupportedCrewAI(ToolpoolError, RuntimeError):
    """The installed CrewAI does not have the shape `toolpool.crewai` relies on."""


@functools.cache
def check_crewai() -> str:
    """Check the installed CrewAI once; return its version or raise `UnsupportedCrewAI`."""
    try:
        import crewai
        from crewai import Agent
        from crewai.tools import BaseTool
    except ImportError as exc:
        raise UnsupportedCrewAI(
            f"toolpool.crewai needs CrewAI: pip install 'toolpool[crewai]' ({exc})"
        ) from exc
    version = str(getattr(crewai, "__version__", "0"))
    problems = []
    if not version.startswith("1."):
        problems.append(f"version {version} is not 1.x")
    for name in ("run", "_run", "arun", "_arun", "to_structured_tool"):
        if not callable(getattr(BaseTool, name, None)):
            problems.append(f"crewai.tools.BaseTool.{name} is missing")
    executor = getattr(Agent, "create_agent_executor", None)
    if not callable(executor) or "tools" not in inspect.signature(executor).parameters:
        problems.append("crewai.Agent.create_agent_executor(tools=...) is missing")
    if problems:
        raise UnsupportedCrewAI(
            f"toolpool.crewai was built for CrewAI 1.x (tested with {TESTED_CREWAI}) and cannot "
            f"hook this installation: {'; '.join(problems)}. Install crewai>=1.0,<2 or upgrade "
            f"toolpool."
        )
    return version
