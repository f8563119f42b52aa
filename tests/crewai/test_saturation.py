"""Saturation as backpressure: when a destination's pool is full, tool calls wait at its
admission gate (up to max_wait) instead of failing; past max_wait the model reads "busy, retry
in N s" as the tool's error, the crew completes, and nothing leaks."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from crewai import Agent, Crew, Task
from crewai.tools import BaseTool
from crewai.tools.tool_failure import ToolExecutionFailedError

import toolpool
from tests._support.crewai_crews import TENANTS, tenant_ctx
from toolpool.crewai import wrap
from toolpool.crewai.testing import ScriptedLLM, is_busy_result
from toolpool.testing import Downstream, ServiceSpec

#: Seconds the downstream takes per request: long enough that 16 requests released together
#: all meet a full pool (2 connections + 4 queued), while the test stays short.
SERVICE_TIME = 0.5


@pytest.fixture(scope="module")
def slow() -> Iterator[Downstream]:
    with Downstream({"slow": ServiceSpec(require_auth=False, service_time=SERVICE_TIME)}) as ds:
        yield ds


class Gate:
    """Holds the first `n` tool bodies until all `n` have arrived, so that they hit the pool
    together; later calls (retries) pass straight through."""

    def __init__(self, n: int) -> None:
        self.barrier = threading.Barrier(n) if n else None
        self.remaining = n
        self.entered = 0
        self.lock = threading.Lock()

    def pass_(self) -> None:
        with self.lock:
            first = self.remaining > 0
            self.remaining -= 1
            self.entered += 1
        if first and self.barrier is not None:
            self.barrier.wait(timeout=60)


class SlowApi(BaseTool):
    name: str = "slow_api"
    description: str = "Ask the slow API."
    url: str
    gate: Any = None

    def _run(self, item: str) -> str:
        if self.gate is not None:
            self.gate.pass_()
        with httpx.Client(timeout=30.0) as client:
            response = client.get(f"{self.url}/anything", params={"item": item})
            response.raise_for_status()
            return json.dumps({"item": item, "ok": True})


def slow_crew(url: str, llm: ScriptedLLM, gate: Gate | None = None, **agent: Any) -> Crew:
    worker = Agent(
        role="worker",
        goal="Ask the slow API",
        backstory="Patient.",
        llm=llm,
        tools=[SlowApi(url=url, gate=gate)],
        **agent,
    )
    task = Task(
        description="Ask about everything for {tenant_id}.", expected_output="answers", agent=worker
    )
    return Crew(agents=[worker], tasks=[task])


def answered_items(text: str) -> list[str]:
    return sorted(
        json.loads(part)["item"]
        for part in text.split(": ", 1)[1].split(" | ")
        if part.startswith("{")
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a condition of the run under test (bounded; fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_16_parallel_calls_on_2_connections(slow: Downstream) -> None:
    """Two tenants' crews, 8 parallel tool calls each, against max_connections 2 (queue 4)."""
    slow.reset_stats()
    per_run = 8
    gate = Gate(per_run * len(TENANTS))
    llm = ScriptedLLM(
        plan=[[{"tool": "slow_api", "args": {"item": f"i{i}"}} for i in range(per_run)]],
        busy_retries=3,
    )
    pool = toolpool.Pool(
        [toolpool.Destination("slow", slow.url("slow"), max_connections=2, queue_factor=2)],
        warmup=0,
    )
    with pool:
        crew = wrap(
            slow_crew(slow.url("slow"), llm, gate),
            pool,
            auth=lambda i: tenant_ctx(i["tenant_id"]),
            max_wait=10.0,
        )
        copies = [(tenant, crew.copy()) for tenant in TENANTS]
        with ThreadPoolExecutor(len(copies)) as executor:
            futures = [executor.submit(c.kickoff, inputs={"tenant_id": t}) for t, c in copies]
            outputs = [f.result(timeout=120) for f in futures]
        stats = pool.stats()["slow"]
    # Nobody read a busy error: the calls beyond the pool's queue waited at the gate (a cold
    # tool: nothing declared, nothing learned before the burst).
    assert not [o for o in llm.observations if is_busy_result(o)], llm.observations
    assert stats.saturated_total == 0
    assert pool.destination("slow").policy.stats().admission_waits_total >= 1
    expected = [f"i{i}" for i in range(per_run)]
    for output in outputs:
        assert answered_items(output.raw) == expected, output.raw
        assert output.tasks_output[0].tool_failures == []
    server = slow.stats("slow")
    assert server.requests_total == per_run * len(TENANTS)
    # Nothing leaked: never more than 2 connections, none left in use or waiting.
    assert server.peak_connections <= 2
    assert (stats.in_use, stats.waiting, stats.opening) == (0, 0, 0)
    assert stats.idle + stats.closing <= 2
    slow.wait_stats("slow", lambda s: s.connections_open == 0, timeout=10)


class Hold:
    """Saturates a destination from outside the crew: one response held open (its connection
    in use) and one request waiting behind it fill max_connections 1 and a queue of 1."""

    def __init__(self, pool: toolpool.Pool, url: str) -> None:
        # The waiter waits for the pool's acquire_timeout, not httpx's default 5 s.
        self.client = pool.sync_client(timeout=httpx.Timeout(5.0, pool=None))
        self.held = self.client.send(
            self.client.build_request("GET", f"{url}/stream?chunks=2&size=1&delay=30"), stream=True
        )
        self.waiter = threading.Thread(target=lambda: self.client.get(f"{url}/anything"))
        self.waiter.start()
        dest = pool.destination("slow")
        wait_for(lambda: dest.state.waiting == 1)

    def release(self) -> None:
        self.held.close()
        self.waiter.join(timeout=30)
        self.client.close()


def test_text_path_busy_then_success(slow: Downstream) -> None:
    """The text/ReAct path: CrewAI retries a failing tool call itself, then the model reads
    CrewAI's error text with toolpool's busy message; it calls again once there is room.
    `max_wait` lets the retried call wait out the release of the held connection (closing
    it mid-body may take the pool's close grace)."""
    slow.reset_stats()
    llm = ScriptedLLM(function_calling=False, plan=[[{"tool": "slow_api", "args": {"item": "x"}}]])
    pool = toolpool.Pool(
        [toolpool.Destination("slow", slow.url("slow"), max_connections=1, queue_factor=1)],
        warmup=0,
    )
    with pool:
        crew = wrap(slow_crew(slow.url("slow"), llm), pool, auth=tenant_ctx("acme"), max_wait=1.0)
        hold = Hold(pool, slow.url("slow"))
        try:
            with ThreadPoolExecutor(1) as executor:
                run = executor.submit(crew.kickoff, inputs={"tenant_id": "acme"})
                wait_for(lambda: any(is_busy_result(o) for o in llm.observations))
                hold.release()
                output = run.result(timeout=60)
        finally:
            hold.release()
        stats = pool.stats()["slow"]
    busy = next(o for o in llm.observations if is_busy_result(o))
    assert busy.startswith(
        "I encountered an error while trying to use the tool. This was the error: "
        "tool 'slow_api' could not run: destination 'slow' is busy"
    )
    assert answered_items(output.raw) == ["x"], llm.observations
    assert (stats.in_use, stats.waiting) == (0, 0)


def test_raise_policy_stops_the_run_on_busy(slow: Downstream) -> None:
    """tool_failure_policy="raise" applies to busy calls like to any failing call."""
    llm = ScriptedLLM(plan=[[{"tool": "slow_api", "args": {"item": "x"}}]])
    pool = toolpool.Pool(
        [toolpool.Destination("slow", slow.url("slow"), max_connections=1, queue_factor=1)],
        warmup=0,
    )
    with pool:
        crew = wrap(
            slow_crew(slow.url("slow"), llm, tool_failure_policy="raise"),
            pool,
            auth=tenant_ctx("acme"),
            max_wait=0.0,
        )
        hold = Hold(pool, slow.url("slow"))
        try:
            with pytest.raises(
                ToolExecutionFailedError, match="could not run: destination 'slow' is busy"
            ):
                crew.kickoff(inputs={"tenant_id": "acme"})
        finally:
            hold.release()


@pytest.mark.parametrize("declared", [False, True])
def test_declared_destination_is_gated_before_the_body_runs(
    slow: Downstream, declared: bool
) -> None:
    """Learned destinations gate a tool from its second call on; declared ones from the
    first: then a call to a saturated destination is refused before its body runs."""
    llm = ScriptedLLM(plan=[[{"tool": "slow_api", "args": {"item": "x"}}]], busy_retries=0)
    counter = Gate(0)  # counts the bodies that ran (a gate of 0 holds nobody)
    pool = toolpool.Pool(
        [toolpool.Destination("slow", slow.url("slow"), max_connections=1, queue_factor=1)],
        warmup=0,
    )
    with pool:
        crew = wrap(
            slow_crew(slow.url("slow"), llm, counter),
            pool,
            auth=tenant_ctx("acme"),
            max_wait=0.2,
            destinations={"slow_api": ["slow"]} if declared else None,
        )
        hold = Hold(pool, slow.url("slow"))
        try:
            output = crew.kickoff(inputs={"tenant_id": "acme"})
        finally:
            hold.release()
    assert is_busy_result(output.raw)
    assert counter.entered == (0 if declared else 1)


def test_declared_destination_never_overfills_the_pool(slow: Downstream) -> None:
    """16 parallel calls from two tenants, destination declared: admission counts every
    admitted call against the destination's capacity for the whole call, so no request meets
    a full queue; a call admission cannot take is refused before its body runs; every item
    is answered in the end."""
    slow.reset_stats()
    per_run = 8
    llm = ScriptedLLM(
        plan=[[{"tool": "slow_api", "args": {"item": f"i{i}"}} for i in range(per_run)]],
        busy_retries=3,
    )
    counter = Gate(0)  # counts the bodies that ran (a gate of 0 holds nobody)
    pool = toolpool.Pool(
        [toolpool.Destination("slow", slow.url("slow"), max_connections=2, queue_factor=2)],
        warmup=0,
    )
    with pool:
        crew = wrap(
            slow_crew(slow.url("slow"), llm, counter),
            pool,
            auth=lambda i: tenant_ctx(i["tenant_id"]),
            max_wait=30.0,
            destinations={"slow_api": ["slow"]},
        )
        copies = [(tenant, crew.copy()) for tenant in TENANTS]
        with ThreadPoolExecutor(len(copies)) as executor:
            futures = [executor.submit(c.kickoff, inputs={"tenant_id": t}) for t, c in copies]
            outputs = [f.result(timeout=120) for f in futures]
        stats = pool.stats()["slow"]
    for output in outputs:
        assert answered_items(output.raw) == [f"i{i}" for i in range(per_run)], output.raw
    assert stats.saturated_total == 0  # the pool itself never refused a request
    # Every body that ran reached the downstream once: none started and then met a full pool.
    assert counter.entered == slow.stats("slow").requests_total == per_run * len(TENANTS)
    assert slow.stats("slow").peak_connections <= 2
