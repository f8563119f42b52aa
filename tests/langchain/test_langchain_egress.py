"""A wrapped LangChain agent whose tool fetches the URL the model gives it: a URL whose name
resolves (through the test's resolver hook) to an address the egress policy forbids becomes
the tool's error message the model reads; the run goes on, and other calls succeed."""

from __future__ import annotations

import httpx
from langchain.agents import create_agent
from langchain.tools import tool
from langchain_core.messages import ToolMessage

import toolpool
from tests._support.langchain_tools import Ctx, by_context
from toolpool.langchain import wrap
from toolpool.langchain.testing import ScriptedChatModel
from toolpool.testing import Downstream, HostMap


@tool
async def fetch_url(url: str) -> str:
    """Fetch a web page (the model picks the URL)."""
    async with httpx.AsyncClient(timeout=30.0) as client:  # the tool's own client: pooled
        r = await client.get(url)
    return f"{r.status_code} {r.json()['path']}"


@tool
def fetch_url_sync(url: str) -> str:
    """Fetch a web page with a blocking client."""
    with httpx.Client(timeout=30.0) as client:
        r = client.get(url)
    return f"{r.status_code} {r.json()['path']}"


async def test_a_refused_address_becomes_the_tools_error(ds: Downstream) -> None:
    port = ds.address("crm")[1]
    names = HostMap({"ok.test": "127.0.0.1", "evil.test": "127.0.0.2"})
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    calls = [
        {"name": tool_name, "args": {"url": f"http://{host}.test:{port}/{host}?token=s3cret"}}
        for tool_name in ("fetch_url", "fetch_url_sync")
        for host in ("ok", "evil")
    ]
    model = ScriptedChatModel(tool_calls=calls)
    async with toolpool.Pool(egress=egress, warmup=0) as pool:
        agent = wrap(
            create_agent(model, [fetch_url, fetch_url_sync], context_schema=Ctx),
            pool,
            auth=by_context,
        )
        output = await agent.ainvoke({"messages": [("user", "go")]}, context=Ctx("acme"))
        results = [m for m in output["messages"] if isinstance(m, ToolMessage)]
        assert len(results) == 4
        ok = [m for m in results if m.status != "error"]
        refused = [m for m in results if m.status == "error"]
        assert sorted(m.content for m in ok) == ["200 /ok", "200 /ok"]
        assert sorted(m.name for m in refused) == ["fetch_url", "fetch_url_sync"]
        for m in refused:
            assert m.content == (
                f"tool {m.name!r} could not run: address 127.0.0.2 (host 'evil.test') is not "
                f"allowed by the egress policy (rule deny); do not retry it"
            )
        assert pool.destination(f"http://evil.test:{port}").egress_denied == {"deny": 2}
