"""Fixtures shared by several test folders, registered for the whole suite by
tests/conftest.py (`pytest_plugins`). A folder's own fixtures stay in its conftest.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests._support.packet_spy import PacketSpy

if TYPE_CHECKING:
    from tests._support.mcp_servers import McpTestServer


@pytest.fixture
def spy() -> Iterator[PacketSpy]:
    """Refuses (and records) any connect or lookup of a non-loopback address while the test
    runs; the test fails if anything tried."""
    guard = PacketSpy()
    with guard.installed():
        yield guard
    assert guard.refused == [], f"something tried to leave loopback: {guard.refused}"


@pytest.fixture(params=["stateful", "stateless"])
def mcp_server(request: pytest.FixtureRequest) -> Iterator[McpTestServer]:
    """A real FastMCP server on loopback, stateful (sessions, SSE answers) and stateless."""
    # Imported here: uvicorn and mcp load only for the tests that use an MCP server.
    from tests._support.mcp_servers import serve_mcp

    with serve_mcp(stateful=request.param == "stateful") as server:
        yield server
