"""Fixtures for toolpool.mcp's tests: real FastMCP servers, stateful and stateless."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from mcp_servers import McpTestServer, serve_mcp


@pytest.fixture(params=["stateful", "stateless"])
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    with serve_mcp(stateful=request.param == "stateful") as server:
        yield server
