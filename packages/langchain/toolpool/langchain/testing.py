"""An offline, scripted chat model for tests, examples and notebooks: no network, no keys.

`ScriptedChatModel` answers a user message with the tool calls it was given (all in one
turn, so the agent runs them in parallel), and after the tool results come back answers with
them. It keeps no per-run state, so one instance serves any number of runs, concurrently.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, PrivateAttr

__all__ = ["ScriptedChatModel"]


class ScriptedChatModel(BaseChatModel):
    """A chat model that calls the given tools, then answers with their results.

    ```python
    model = ScriptedChatModel(tool_calls=[{"name": "lookup", "args": {"q": "acme"}}] * 10)
    agent = create_agent(model, [lookup])
    agent.invoke({"messages": [("user", "go")]})   # 10 parallel lookups, then an answer
    model.tool_results                              # every ToolMessage the model was shown
    ```

    `rounds` tool-calling turns happen before the final answer (each with the same calls).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    """The calls of each tool-calling turn: `{"name": ..., "args": {...}}`."""
    rounds: int = 1
    """Tool-calling turns per run before the final answer."""
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _results: list[ToolMessage] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "toolpool-scripted"

    @property
    def tool_results(self) -> list[ToolMessage]:
        """Every tool result this model has been shown, across runs (a copy)."""
        with self._lock:
            return list(self._results)

    def reset(self) -> None:
        """Forget the recorded tool results."""
        with self._lock:
            self._results.clear()

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The script decides which tools to call; binding changes nothing."""
        return self

    def _reply(self, messages: list[BaseMessage]) -> AIMessage:
        turn: list[BaseMessage] = []
        for message in reversed(messages):
            if isinstance(message, HumanMessage):
                break
            turn.append(message)
        turn.reverse()
        calls_made = sum(1 for m in turn if isinstance(m, AIMessage) and m.tool_calls)
        results = [m for m in turn if isinstance(m, ToolMessage)]
        if calls_made:
            with self._lock:
                self._results.extend(_new_results(turn))
        if calls_made < self.rounds and self.tool_calls:
            return AIMessage(
                content="",
                tool_calls=[
                    {
                        "name": call["name"],
                        "args": dict(call.get("args", {})),
                        "id": f"call_{uuid.uuid4().hex[:12]}",
                        "type": "tool_call",
                    }
                    for call in self.tool_calls
                ],
            )
        lines = [f"{m.name}: {m.content}" for m in results]
        return AIMessage(content="\n".join(lines) if lines else "nothing to do")

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop)


def _new_results(turn: list[BaseMessage]) -> list[ToolMessage]:
    """The tool results that arrived after the last tool-calling message of the turn."""
    out: list[ToolMessage] = []
    for message in reversed(turn):
        if isinstance(message, ToolMessage):
            out.append(message)
        elif isinstance(message, AIMessage):
            break
    out.reverse()
    return out
