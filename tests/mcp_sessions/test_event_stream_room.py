"""An MCP session's GET event stream (`toolpool.mcp.SessionTransport`) never queues ahead of
requests, yet is not lost to a busy moment: it waits, outside the queue, until its destination
has room, then opens. (The MCP client retries a refused GET only twice, a second apart, and
then never: a session started while other tenants' connections filled the cap, or closed, lost
its notifications for good.)"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import eventually
from toolpool.mcp._transport import SessionTransport
from toolpool.testing import Downstream, ServiceSpec

A = toolpool.AuthContext(tenant="acme")
B = toolpool.AuthContext(tenant="globex")
HARD = 30.0


@pytest.fixture
async def api() -> AsyncIterator[tuple[Downstream, toolpool.Pool]]:
    """A plain test-bed service behind a pool of 2 connections."""
    async with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        dest = toolpool.Destination("api", ds.url("api"), max_connections=2, warmup=0.0)
        async with toolpool.Pool([dest]) as pool:
            yield ds, pool


async def _hang(pool: toolpool.Pool, ds: Downstream, ctx: toolpool.AuthContext) -> asyncio.Task:
    """A request of `ctx` that holds a connection until cancelled (the server never answers)."""
    client = pool.client()

    async def call() -> None:
        async with client:
            with toolpool.auth_context(ctx):
                await client.get(ds.url("api") + "/hang", timeout=None)

    task = asyncio.get_running_loop().create_task(call())
    return task


async def test_a_stream_needing_room_made_opens_once_it_is_made(
    api: tuple[Downstream, toolpool.Pool],
) -> None:
    """acme's two idle connections take the cap: globex's GET needs one of them closed first.
    It does not wait in the queue for that, and is not refused for good either: it opens as
    soon as the room is there."""
    ds, pool = api
    async with pool.client() as client:
        with toolpool.auth_context(A):
            pair = [client.get(ds.url("api") + "/delay?s=0.2") for _ in range(2)]
            assert [r.status_code for r in await asyncio.gather(*pair)] == [200, 200]
    st = pool.stats()["api"]
    assert (st.idle, st.in_use, st.waiting) == (2, 0, 0)  # the cap is taken, by acme
    listened: list[int] = []
    transport = SessionTransport(pool, B, on_listen=listened.append)
    get = httpx.Request("GET", ds.url("api") + "/anything")
    response = await asyncio.wait_for(transport.handle_async_request(get), HARD)
    try:
        assert response.status_code == 200
        assert listened == [1]
        assert "connection_id" in json.loads(await response.aread())  # the server answered
    finally:
        await response.aclose()
    assert listened == [1, -1]
    # One of acme's idle connections made the room; never more than the cap at the server.
    assert pool.stats()["api"].closed_total["affinity"] == 1
    assert ds.stats("api").peak_connections <= 2


async def test_a_stream_waits_outside_the_queue_while_the_cap_is_in_use(
    api: tuple[Downstream, toolpool.Pool],
) -> None:
    """Both connections in use: the GET neither queues (a request arriving meanwhile is
    served first) nor gives up; it opens once a connection is free and nobody waits."""
    ds, pool = api
    first, second = await _hang(pool, ds, A), await _hang(pool, ds, A)
    listened: list[int] = []
    transport = SessionTransport(pool, B, on_listen=listened.append)
    get = httpx.Request("GET", ds.url("api") + "/anything")
    stream = asyncio.get_running_loop().create_task(transport.handle_async_request(get))
    try:
        await eventually(lambda: pool.stats()["api"].in_use == 2, "acme's two requests in flight")
        done, _ = await asyncio.wait({stream}, timeout=0.3)
        assert not done, "the GET gave up (or jumped the cap) instead of waiting for room"
        assert pool.stats()["api"].waiting == 0  # not in the queue
        # A request of globex arriving now queues, and is served before the stream.
        async with pool.client() as client:
            with toolpool.auth_context(B):
                served = asyncio.get_running_loop().create_task(
                    client.get(ds.url("api") + "/anything")
                )
                await eventually(lambda: pool.stats()["api"].waiting == 1, "the request queued")
                first.cancel()
                response = await asyncio.wait_for(served, HARD)
                assert response.status_code == 200
        assert listened == []  # still waiting: the freed connection went to the request
        opened = await asyncio.wait_for(stream, HARD)
        try:
            assert opened.status_code == 200 and listened == [1]
        finally:
            await opened.aclose()
    finally:
        for task in (first, second, stream):
            task.cancel()
        await asyncio.gather(first, second, stream, return_exceptions=True)
