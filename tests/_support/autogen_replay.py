"""Offline AutoGen models and tools for the adapter's tests (imported by the test modules)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import httpx
from autogen_core import FunctionCall
from autogen_core.models import (
    CreateResult,
    FunctionExecutionResult,
    FunctionExecutionResultMessage,
    ModelFamily,
    ModelInfo,
    RequestUsage,
)
from autogen_ext.models.replay import ReplayChatCompletionClient

import toolpool

MODEL_INFO = ModelInfo(
    vision=False,
    function_calling=True,
    json_output=False,
    family=ModelFamily.UNKNOWN,
    structured_output=False,
)

_ids = itertools.count(1)

Turn = str | Sequence[tuple[str, dict[str, Any]]]


def tool_turn(*calls: tuple[str, dict[str, Any]]) -> CreateResult:
    """A model answer asking for `calls` ((tool name, arguments) pairs), all in parallel."""
    return CreateResult(
        finish_reason="function_calls",
        content=[
            FunctionCall(id=f"call-{next(_ids)}", name=name, arguments=json.dumps(args))
            for name, args in calls
        ],
        usage=RequestUsage(prompt_tokens=0, completion_tokens=0),
        cached=False,
    )


def replay_model(*turns: Turn) -> ReplayChatCompletionClient:
    """A scripted model: each turn is a final text or a list of parallel tool calls.

    Stateful: make one per run.
    """
    script: list[str | CreateResult] = [
        turn if isinstance(turn, str) else tool_turn(*turn) for turn in turns
    ]
    return ReplayChatCompletionClient(script, model_info=MODEL_INFO)


def tool_results_seen(
    model: ReplayChatCompletionClient, call: int
) -> list[FunctionExecutionResult]:
    """The tool results the model was shown in its `call`-th request (0-based)."""
    messages = model.create_calls[call]["messages"]
    results = [m for m in messages if isinstance(m, FunctionExecutionResultMessage)]
    assert results, f"request {call} showed the model no tool results"
    return list(results[-1].content)


def tenant_headers() -> dict[str, str]:
    """The X-Tenant header of the current auth context (what a multi-tenant tool sends)."""
    ctx = toolpool.current_auth()
    return {"X-Tenant": ctx.tenant} if ctx is not None and ctx.tenant else {}


def describe(response: httpx.Response) -> str:
    """What a tool returns to the model: who the downstream served, on which connection."""
    body = response.json()
    return json.dumps({"tenant": body["tenant"], "connection_id": body["connection_id"]})
