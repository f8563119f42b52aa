"""An offline, scripted CrewAI model for tests, examples and notebooks: `ScriptedLLM`.

It plays the part of a model that follows a plan of tool calls and then answers, on either of
CrewAI's two tool paths: native function calling (it returns OpenAI-style tool-call dicts, all
calls of a turn at once, which CrewAI runs in parallel) or the text/ReAct path (it writes
``Action:`` / ``Action Input:`` one call per turn, then ``Final Answer:``). Like a real model
it reads the conversation to decide what to do next, so one instance serves any number of
concurrent runs; and when a tool result says a destination is busy ("... retry in 0.4 s") it
calls that tool again, the way a model follows such a hint.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field, PrivateAttr

from crewai.llms.base_llm import BaseLLM

__all__ = ["ScriptedLLM", "is_busy_result"]

# toolpool's busy results end with "retry in <seconds> s" (see toolpool.adapters.busy_message).
_BUSY = re.compile(r"could not run: .* retry in [0-9.]+ s")
_OBSERVATION = re.compile(r"\nObservation:(.*)", re.DOTALL)
_RETRY_ID = "retry"


def is_busy_result(text: str) -> bool:
    """Whether a tool result the model reads is toolpool's "busy, retry in N s" message."""
    return bool(_BUSY.search(text))


class ScriptedLLM(BaseLLM):
    """A CrewAI model that calls tools by a fixed plan, then answers with what they returned.

    ```python
    llm = ScriptedLLM(plan=[[{"tool": "lookup", "args": {"q": "acme"}},
                             {"tool": "lookup", "args": {"q": "globex"}}]])
    Agent(role="analyst", goal="...", backstory="...", llm=llm, tools=[lookup])
    ```

    `plan` is a list of turns; each turn is a list of calls ``{"tool": name, "args": {...}}``.
    With `function_calling` (the default) a turn's calls are returned together, and CrewAI runs
    them in parallel threads; without it, the text path runs one call per turn. After the plan
    the model answers ``"<answer_prefix>: <result 1> | <result 2> ..."``, one result per call.
    A call whose result is a busy message is repeated in an extra turn (its new result
    replaces the busy one), at most `busy_retries` extra turns per run.
    Every tool result the model reads is appended to `observations` (shared by copies).
    """

    model: str = "toolpool-scripted"
    function_calling: bool = True
    plan: list[list[dict[str, Any]]] = Field(default_factory=list)
    busy_retries: int = 3
    answer_prefix: str = "Answer"
    observations: list[str] = Field(default_factory=list, exclude=True)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **data: Any) -> None:
        data.setdefault("model", "toolpool-scripted")
        super().__init__(**data)

    def supports_function_calling(self) -> bool:
        """Native function calling (True) or the text/ReAct path (False)."""
        return self.function_calling

    def get_input_tokens_count(
        self, messages: Any, tools: Any = None, response_model: Any = None
    ) -> int:
        """A length estimate (a scripted model has no tokenizer; CrewAI only needs a bound)."""
        if isinstance(messages, str):
            return (len(messages) + 3) // 4
        return sum(len(str(m.get("content") or "")) for m in messages) // 4 + 1

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        """The next step of the plan for this conversation."""
        history: list[Mapping[str, Any]] = (
            [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        )
        if self.function_calling and tools:
            return self._native_step(history)
        return self._text_step(history)

    async def acall(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        """`call`, for CrewAI's async paths (the model does no I/O)."""
        return self.call(messages, tools, callbacks, available_functions, from_task, from_agent)

    # ------------------------------------------------------------------ native path

    def _native_step(self, history: Sequence[Mapping[str, Any]]) -> Any:
        results = {
            str(m.get("tool_call_id")): str(m.get("content") or "")
            for m in history
            if m.get("role") == "tool"
        }
        turns = [
            m["tool_calls"] for m in history if m.get("role") == "assistant" and m.get("tool_calls")
        ]
        planned = sum(1 for turn in turns if not str(turn[0].get("id", "")).startswith(_RETRY_ID))
        if turns:
            self._observe([results.get(str(c.get("id")), "") for c in turns[-1]])
            busy = [c for c in turns[-1] if is_busy_result(results.get(str(c.get("id")), ""))]
            retries = len(turns) - planned
            if busy and retries < self.busy_retries:
                return [
                    {
                        "id": f"{_RETRY_ID}_{retries}_{i}",
                        "type": "function",
                        "function": dict(c["function"]),
                    }
                    for i, c in enumerate(busy)
                ]
        if planned < len(self.plan):
            return [
                {
                    "id": f"call_{planned}_{i}",
                    "type": "function",
                    "function": {
                        "name": call["tool"],
                        "arguments": json.dumps(call.get("args", {})),
                    },
                }
                for i, call in enumerate(self.plan[planned])
            ]
        # One result per call: a repeated (busy) call's last result replaces the earlier one.
        final: dict[str, str] = {}
        for turn in turns:
            for c in turn:
                key = json.dumps(c.get("function", {}), sort_keys=True)
                final[key] = results.get(str(c.get("id")), "")
        return self._answer(list(final.values()))

    # ------------------------------------------------------------------ text path

    def _text_step(self, history: Sequence[Mapping[str, Any]]) -> str:
        flat = [call for turn in self.plan for call in turn]
        done: list[str] = []
        for m in history:
            if m.get("role") != "assistant":
                continue
            found = _OBSERVATION.search(str(m.get("content") or ""))
            if found:
                # CrewAI appends its tool-format reminder after a blank line; the result
                # is what comes before it.
                done.append(found.group(1).strip().split("\n\n")[0])
        if done:
            self._observe(done[-1:])
        # Which planned call each observation answered: a busy one is repeated in place.
        position, retries = 0, 0
        answers: list[str] = []
        for observation in done:
            if is_busy_result(observation) and retries < self.busy_retries:
                retries += 1  # the same call again; its next result replaces this one
            else:
                answers.append(observation)
                position += 1
        if position < len(flat):
            call = flat[position]
            return (
                f"Thought: I should use {call['tool']}.\n"
                f"Action: {call['tool']}\n"
                f"Action Input: {json.dumps(call.get('args', {}))}"
            )
        return "Thought: I now know the final answer.\nFinal Answer: " + self._answer(answers)

    # ------------------------------------------------------------------ shared

    def _answer(self, results: Sequence[str]) -> str:
        return f"{self.answer_prefix}: " + " | ".join(results)

    def _observe(self, results: Sequence[str]) -> None:
        with self._lock:
            self.observations.extend(results)
