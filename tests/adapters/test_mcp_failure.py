"""find_mcp_failure / mcp_failure_message: MCP failures recognised in the shapes MCP clients
raise them (exception groups of task groups included), and only those; the text a model
reads names the tool and the failure, never a URL's query."""

from __future__ import annotations

import anyio
import httpx
from mcp import McpError
from mcp.types import ErrorData

from toolpool.adapters import find_mcp_failure, is_mcp_tool, mcp_failure_message
from toolpool.errors import McpUnavailable


def _group(*excs: Exception) -> ExceptionGroup:
    return ExceptionGroup("unhandled errors in a TaskGroup", list(excs))


def test_session_errors_are_found_inside_groups_and_causes() -> None:
    closed = anyio.ClosedResourceError()
    assert find_mcp_failure(_group(ValueError("x"), _group(closed))) is closed
    error = McpError(ErrorData(code=-32000, message="Connection closed"))
    outer = RuntimeError("tool failed")
    outer.__cause__ = error
    assert find_mcp_failure(outer) is error
    text = mcp_failure_message(error, "crm_lookup")
    assert text.startswith("tool 'crm_lookup' could not run: MCP server unavailable")
    gone = McpUnavailable("crm", "ConnectError: All connection attempts failed")
    assert find_mcp_failure(_group(gone)) is gone
    assert "could not run: MCP server 'crm' unavailable" in mcp_failure_message(gone, "t")


def test_a_servers_own_error_answer_reads_as_its_answer() -> None:
    error = McpError(ErrorData(code=-32602, message="Unknown tool: nope"))
    assert mcp_failure_message(error, "nope") == (
        "tool 'nope' failed: the MCP server answered 'Unknown tool: nope'"
    )


def test_network_errors_count_only_under_an_mcp_tool() -> None:
    request = httpx.Request("POST", "http://127.0.0.1:9/mcp?token=s3cret")
    refused = httpx.ConnectError("All connection attempts failed", request=request)
    assert find_mcp_failure(_group(refused)) is None  # a plain tool's error stays its own
    assert find_mcp_failure(_group(refused), mcp_tool=True) is refused
    status = httpx.HTTPStatusError(
        "Server error '503' for url 'http://127.0.0.1:9/mcp?token=s3cret'",
        request=request,
        response=httpx.Response(503, request=request),
    )
    text = mcp_failure_message(status, "crm_lookup")
    assert "HTTP 503" in text and "s3cret" not in text
    assert find_mcp_failure(ValueError("bad argument"), mcp_tool=True) is None


def test_mcp_tools_are_recognised_by_their_function() -> None:
    from langchain_core.tools import StructuredTool
    from langchain_mcp_adapters.tools import convert_mcp_tool_to_langchain_tool
    from mcp.types import Tool

    async def lookup(a: int) -> int:
        return a

    plain = StructuredTool.from_function(coroutine=lookup, name="plain", description="d")
    assert not is_mcp_tool(plain)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    mcp_tool = convert_mcp_tool_to_langchain_tool(
        None,
        Tool(name="lookup", description="d", inputSchema=schema),
        connection={"transport": "streamable_http", "url": "http://127.0.0.1:9/mcp"},
    )
    assert is_mcp_tool(mcp_tool)
    assert not is_mcp_tool(None)
