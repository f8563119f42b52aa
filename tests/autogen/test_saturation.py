"""Saturation: more parallel tool calls than the destination takes. Calls beyond the queue
wait at the destination's admission gate instead of failing (issue 20), the run completes, the
limit adapts and nothing leaks; past max_wait the model reads "busy, retry in N s"."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import TextMessage

import toolpool
from tests._support.autogen_replay import describe, replay_model, tenant_headers, tool_results_seen
from toolpool.autogen import DEFAULT_MAX_PARALLEL_TOOL_CALLS, PooledWorkbench, wrap
from toolpool.testing import Downstream, ServiceSpec

ACME = toolpool.AuthContext(tenant="acme")
FIRST_WAVE = 12
SECOND_WAVE = 8


@pytest.fixture
async def slow_crm() -> AsyncIterator[Downstream]:
    # Each request holds its connection for 0.3 s: queued calls wait, none times out.
    async with Downstream({"crm": ServiceSpec(require_auth=False, service_time=0.3)}) as ds:
        yield ds


async def test_twelve_parallel_calls_on_two_connections(slow_crm: Downstream) -> None:
    url = slow_crm.url("crm") + "/anything"
    entered = 0
    all_in = asyncio.Event()

    async def fetch(wave: int) -> str:
        """Fetch a record (a naive tool: its own httpx.AsyncClient per call)."""
        nonlocal entered
        if wave == 1:
            # Start the first wave's requests together, so that 2 get a connection and 10
            # wait at the admission gate (tool calls do not take the pool's queue places),
            # whatever the scheduling.
            entered += 1
            if entered == FIRST_WAVE:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), timeout=30)
        async with httpx.AsyncClient() as client:
            return describe(await client.get(url, headers=tenant_headers()))

    model = replay_model(
        [("fetch", {"wave": 1})] * FIRST_WAVE,
        [("fetch", {"wave": 2})] * SECOND_WAVE,  # the model retries after the busy results
        "done",
    )
    agent = AssistantAgent(
        "crm_agent",
        model_client=model,
        tools=[fetch],
        max_tool_iterations=2,
        reflect_on_tool_use=True,
    )
    pool = toolpool.Pool([toolpool.Destination("crm", slow_crm.url("crm"), max_connections=2)])
    async with pool:
        wrap(agent, pool, max_wait=20.0)
        with toolpool.auth_context(ACME):
            result = await asyncio.wait_for(agent.run(task="fetch everything"), timeout=120)

        # The run completed with the model's final answer.
        final = result.messages[-1]
        assert isinstance(final, TextMessage)
        assert final.content == "done"

        # First wave: a cold tool (no destination declared or learned yet), 12 calls on 2
        # connections: the 10 beyond waited at the gate, none was refused.
        first = tool_results_seen(model, 1)
        assert len(first) == FIRST_WAVE
        assert not [r.content for r in first if r.is_error]
        ok = [json.loads(r.content) for r in first]
        assert [o["tenant"] for o in ok] == ["acme"] * FIRST_WAVE

        # Second wave: the destination is learned now and admitted up front; every call ran.
        second = tool_results_seen(model, 2)[-SECOND_WAVE:]
        assert not [r.content for r in second if r.is_error]
        stats = pool.stats()["crm"]
        assert stats.saturated_total == 0
        runtime = pool.destination("crm").policy
        assert runtime.stats().admission_waits_total >= 10

        # The adaptive limit halved once per wave whose calls waited behind more than the
        # destination's capacity (2 connections + 4 queue places; a burst of waits is one
        # signal): 16 -> 8 in the first; 8 calls still exceed those 6, so 8 -> 4 in the
        # second; it grew back by one at most after the successes that followed.
        (wb,) = agent._workbench
        assert isinstance(wb, PooledWorkbench)
        assert wb.concurrency.decreases_total == 2
        assert wb.concurrency.limit >= DEFAULT_MAX_PARALLEL_TOOL_CALLS // 4
        assert wb.concurrency.limit <= DEFAULT_MAX_PARALLEL_TOOL_CALLS // 4 + 1

        # Nothing leaked: no connection in use, no waiter, no slot held.
        assert (stats.in_use, stats.opening, stats.waiting) == (0, 0, 0)
        assert (wb.concurrency.in_flight, wb.concurrency.waiting) == (0, 0)
        down = slow_crm.stats("crm")
        assert down.peak_connections <= 2
        assert down.requests_total == FIRST_WAVE + SECOND_WAVE
