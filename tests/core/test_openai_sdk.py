"""The real `openai` SDK on `pool.client()` (issue 20), against a local OpenAI-compatible
server this test starts on 127.0.0.1: the SDK keeps its own timeouts (a 6 s completion
succeeds, where a 5 s client timeout would have failed it), and SSE streams, early closes and
cancellations leave nothing in use."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from aiohttp import web

import toolpool

# A stream that the test holds open: its chunks come this far apart.
SLOW_CHUNK = 0.2


def _completion(model: str, text: str) -> dict[str, object]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _chunk(model: str, text: str | None, finish: str | None = None) -> bytes:
    delta = {} if text is None else {"content": text}
    body = {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _chat(request: web.Request) -> web.StreamResponse:
    """`model` says how to answer: "slow-<seconds>" waits, "stream-<n>" streams n chunks,
    "drip" streams slowly until the client goes away."""
    body = await request.json()
    model = str(body["model"])
    if not body.get("stream"):
        if model.startswith("slow-"):
            await asyncio.sleep(float(model.removeprefix("slow-")))
        return web.json_response(_completion(model, "pong"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    count = int(model.removeprefix("stream-")) if model.startswith("stream-") else 1000
    for i in range(count):
        await response.write(_chunk(model, f"t{i} "))
        if model == "drip":
            await asyncio.sleep(SLOW_CHUNK)
    await response.write(_chunk(model, None, "stop"))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    # Handlers of requests the client gave up on are cancelled (as a real server would).
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _idle(pool: toolpool.Pool) -> bool:
    s = pool.stats()["llm"]
    return (s.in_use, s.opening, s.waiting) == (0, 0, 0)


async def _until_idle(pool: toolpool.Pool) -> None:
    deadline = time.monotonic() + 10
    while not _idle(pool):
        assert time.monotonic() < deadline, pool.stats()["llm"]
        await asyncio.sleep(0.01)


@pytest.fixture
async def pool(server: str) -> AsyncIterator[toolpool.Pool]:
    async with toolpool.Pool([toolpool.Destination("llm", server, max_connections=4)]) as p:
        yield p


def _sdk(server: str, pool: toolpool.Pool) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server + "/v1", api_key="sk-test", http_client=pool.client(), max_retries=0
    )


async def test_a_six_second_completion_succeeds(server: str, pool: toolpool.Pool) -> None:
    client = pool.client()
    assert client.timeout == httpx.Timeout(5.0)  # httpx's own default, as the SDK checks
    sdk = _sdk(server, pool)
    started = time.monotonic()
    reply = await sdk.chat.completions.create(
        model="slow-6", messages=[{"role": "user", "content": "ping"}]
    )
    assert time.monotonic() - started >= 6.0
    assert reply.choices[0].message.content == "pong"
    await _until_idle(pool)
    assert pool.stats()["llm"].created_total == 1


async def test_sse_streams_and_early_closes_leave_nothing_in_use(
    server: str, pool: toolpool.Pool
) -> None:
    sdk = _sdk(server, pool)
    stream = await sdk.chat.completions.create(
        model="stream-20", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text == "".join(f"t{i} " for i in range(20))
    await _until_idle(pool)
    # Closed after the first chunk, with the server still sending: the connection goes.
    stream = await sdk.chat.completions.create(
        model="drip", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    async for _ in stream:
        assert pool.stats()["llm"].in_use == 1
        break
    await stream.close()
    await _until_idle(pool)

    # Several at once (twice the connections), each read to the end: nothing left over.
    async def read_all() -> int:
        stream = await sdk.chat.completions.create(
            model="stream-5", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return len([c async for c in stream])

    counts = await asyncio.gather(*(read_all() for _ in range(8)))
    assert counts == [6] * 8  # five tokens and the finish chunk each
    await _until_idle(pool)
    assert pool.stats()["llm"].waiting == 0


async def test_cancellations_leave_nothing_in_use(server: str, pool: toolpool.Pool) -> None:
    sdk = _sdk(server, pool)
    # Cancelled while the completion is on its way.
    slow = asyncio.create_task(
        sdk.chat.completions.create(model="slow-30", messages=[{"role": "user", "content": "x"}])
    )
    deadline = time.monotonic() + 10
    while pool.stats()["llm"].in_use == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    slow.cancel()
    with pytest.raises(asyncio.CancelledError):
        await slow
    await _until_idle(pool)

    # Cancelled while reading a stream.
    async def read_forever() -> None:
        stream = await sdk.chat.completions.create(
            model="drip", messages=[{"role": "user", "content": "x"}], stream=True
        )
        async for _ in stream:
            pass

    reader = asyncio.create_task(read_forever())
    while pool.stats()["llm"].in_use == 0:
        assert time.monotonic() < deadline + 10
        await asyncio.sleep(0.01)
    await asyncio.sleep(2 * SLOW_CHUNK)  # a few chunks in
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    await _until_idle(pool)

    # Cancelled while waiting for a connection (4 held by slow completions).
    held = [
        asyncio.create_task(
            sdk.chat.completions.create(
                model="slow-30", messages=[{"role": "user", "content": "x"}]
            )
        )
        for _ in range(4)
    ]
    queued = asyncio.create_task(
        sdk.chat.completions.create(model="slow-30", messages=[{"role": "user", "content": "x"}])
    )
    while pool.stats()["llm"].waiting == 0:
        assert time.monotonic() < deadline + 20
        await asyncio.sleep(0.01)
    for task in [queued, *held]:
        task.cancel()
    for task in [queued, *held]:
        with pytest.raises(asyncio.CancelledError):
            await task
    await _until_idle(pool)
    # The pool still works afterwards.
    reply = await sdk.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "x"}]
    )
    assert reply.choices[0].message.content == "pong"
