"""Long-lived responses on a real server (issue 19, scenarios 4 and 5): a tenant holding an
event stream still gets its next request served by closing another tenant's idle
connections, and a PoolTimeout counts the waiter that timed out."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

import toolpool

A = toolpool.AuthContext(tenant="a")
B = toolpool.AuthContext(tenant="b")


@pytest.fixture
def sse_origin() -> Iterator[str]:
    """/events streams an event, then holds the stream open until the client leaves;
    anything else answers "ok"."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/events":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            await send({"type": "http.response.body", "body": b"data: hi\n\n", "more_body": True})
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        if scope["path"] == "/slow":
            await asyncio.sleep(0.3)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="critical", lifespan="off", timeout_keep_alive=120)
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


async def test_a_stream_holder_gets_other_tenants_idle_connections(sse_origin: str) -> None:
    # A pool that left B waiting for a connection to come back would never serve it (the
    # stream holds its connection, A's stay idle): httpx's 5 s wait limit would fail it.
    dest = toolpool.Destination("svc", sse_origin, max_connections=4, acquire_timeout=30.0)
    async with toolpool.Pool([dest], warmup=0) as pool:
        client = pool.client()
        # Tenant A leaves 3 idle connections (3 slow requests at once).
        with toolpool.auth_context(A):
            await asyncio.gather(*(client.get(f"{sse_origin}/slow") for _ in range(3)))
        assert pool.stats()["svc"].idle == 3
        # Tenant B holds a streaming GET, then sends one more request.
        with toolpool.auth_context(B):
            async with client.stream("GET", f"{sse_origin}/events") as stream:
                assert stream.headers["content-type"] == "text/event-stream"
                stats = pool.stats()["svc"]
                assert stats.streams == 1 and stats.streams_total == 1
                r = await asyncio.wait_for(client.get(f"{sse_origin}/y"), timeout=10)
                assert r.status_code == 200 and r.text == "ok"
                # Served by closing one of A's idle connections (not by one coming back).
                stats = pool.stats()["svc"]
                assert stats.closed_total["affinity"] == 1
                assert stats.streams == 1
        await client.aclose()
        assert pool.stats()["svc"].streams == 0


async def test_pool_timeout_counts_the_waiter_that_timed_out(sse_origin: str) -> None:
    dest = toolpool.Destination("svc", sse_origin, max_connections=1, acquire_timeout=0.3)
    async with toolpool.Pool([dest], warmup=0) as pool:
        client = pool.client()
        with toolpool.auth_context(B):
            async with client.stream("GET", f"{sse_origin}/events"):
                with pytest.raises(toolpool.PoolTimeout) as err:
                    await asyncio.wait_for(client.get(f"{sse_origin}/y"), timeout=10)
        message = str(err.value)
        assert "(1 in use, 1 of them long-lived streams, 1 waiting)" in message, message
        assert err.value.waiting == 1 and err.value.streams == 1
        await client.aclose()
