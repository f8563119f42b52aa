"""Real FastMCP servers on loopback for the MCP tests of every framework.

`serve_mcp(stateful=...)` starts a FastMCP server (the `mcp` package) under uvicorn on
127.0.0.1 in a thread and records what reached it: per TCP connection (client port) the
Authorization headers it carried, the JSON-RPC methods POSTed, the GET event streams opened.
Stateful is FastMCP's default (sessions, SSE answers, a GET stream per session); stateless is
`stateless_http=True` with JSON answers.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from mcp.server.fastmcp import Context, FastMCP

__all__ = ["McpTestServer", "serve_mcp", "tenant_of"]


def tenant_of(authorization: str | None) -> str | None:
    """The tenant a test Bearer token names ("Bearer t-acme" -> "acme")."""
    if not authorization or not authorization.startswith("Bearer t-"):
        return None
    return authorization[len("Bearer t-") :]


@dataclass
class McpTestServer:
    url: str
    origin: str
    stateful: bool
    lock: threading.Lock = field(default_factory=threading.Lock)
    # client port -> Authorization headers seen on that connection
    connections: dict[int, set[str]] = field(default_factory=dict)
    # (method, tenant) of every JSON-RPC message POSTed
    methods: list[tuple[str, str | None]] = field(default_factory=list)
    gets: int = 0
    deletes: int = 0
    # Set to make the app answer 503 to everything (a server that is "gone" but listening).
    down: bool = False
    # Set to answer 503 only to requests carrying credentials (tool discovery that sends
    # none still works).
    down_for_tenants: bool = False
    extra_tools: list[str] = field(default_factory=list)
    server: Any = None
    thread: threading.Thread | None = None

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server for good (blocking): in-flight requests are cut after uvicorn's
        1 s graceful shutdown, the listening socket is closed, new connects are refused."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "the MCP server did not stop"

    def count(self, method: str) -> int:
        with self.lock:
            return sum(1 for m, _ in self.methods if m == method)

    def mixed_connections(self) -> dict[int, set[str]]:
        """Connections that carried more than one tenant's credentials (must stay empty)."""
        with self.lock:
            return {p: a for p, a in self.connections.items() if len(a) > 1}

    def reset(self) -> None:
        with self.lock:
            self.connections.clear()
            self.methods.clear()
            self.gets = self.deletes = 0


def _build(info: McpTestServer, stateful: bool, sse: bool = False) -> Any:
    server = FastMCP(
        "crm",
        log_level="CRITICAL",
        stateless_http=not stateful,
        json_response=not stateful,
        host="127.0.0.1",
    )

    @server.tool()
    async def whoami(ctx: Context) -> str:  # type: ignore[type-arg]
        """Which tenant's credentials this call carried."""
        request = ctx.request_context.request
        assert request is not None
        return json.dumps({"tenant": tenant_of(request.headers.get("authorization"))})

    @server.tool()
    async def slow_add(a: int, b: int, delay: float = 0.05) -> int:
        """Add two numbers, slowly."""
        await asyncio.sleep(delay)
        return a + b

    @server.tool()
    async def grow(name: str, ctx: Context) -> str:  # type: ignore[type-arg]
        """Add a tool named `name` and tell the client its tool list changed."""

        def extra() -> str:
            return name

        server.add_tool(extra, name=name, description="added at run time")
        info.extra_tools.append(name)
        await ctx.session.send_tool_list_changed()
        return "ok"

    return server.sse_app() if sse else server.streamable_http_app()


@contextmanager
def serve_mcp(*, stateful: bool = True, sse: bool = False) -> Iterator[McpTestServer]:
    """A FastMCP server on loopback: streamable HTTP at /mcp (stateful or stateless), or
    with `sse` the legacy HTTP+SSE transport (GET /sse, POST /messages/)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    port = sock.getsockname()[1]
    info = McpTestServer(
        url=f"http://127.0.0.1:{port}/{'sse' if sse else 'mcp'}",
        origin=f"http://127.0.0.1:{port}",
        stateful=stateful,
    )
    app = _build(info, stateful, sse)

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode()
        with info.lock:
            info.connections.setdefault(scope["client"][1], set()).add(auth)
            if scope["method"] == "GET":
                info.gets += 1
            elif scope["method"] == "DELETE":
                info.deletes += 1
        if info.down or (info.down_for_tenants and auth):
            await send({"type": "http.response.start", "status": 503, "headers": []})
            await send({"type": "http.response.body", "body": b"down"})
            return
        if scope["method"] != "POST":
            await app(scope, receive, send)
            return
        # Read the body to record the JSON-RPC method, then replay it to the app.
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            method = json.loads(body).get("method", "")
        except (ValueError, AttributeError):
            method = ""
        with info.lock:
            info.methods.append((method or "(response)", tenant_of(auth)))
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await app(scope, replay, send)

    runner = uvicorn.Server(
        uvicorn.Config(recording, log_level="critical", lifespan="on", timeout_graceful_shutdown=1)
    )
    info.server = runner
    thread = threading.Thread(target=runner.run, kwargs={"sockets": [sock]}, daemon=True)
    info.thread = thread
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not runner.started:
            assert thread.is_alive(), "the MCP server did not start"
            assert time.monotonic() < deadline, "the MCP server did not start within 30 s"
            time.sleep(0.01)
        yield info
    finally:
        runner.should_exit = True
        thread.join(15)
        sock.close()
