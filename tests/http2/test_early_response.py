"""RFC 9113 8.1: a server may answer in full before it has read the request body, and keep
its flow-control window for that body closed. The client stops sending (the rest of the body
is dropped unread, our half of the stream closes with RST_STREAM(NO_ERROR)) and returns the
response at once, instead of waiting for a window until its write timeout.

The server is `tests._support.h2_raw.ScriptedH2Server` with SETTINGS_INITIAL_WINDOW_SIZE 0
(not one byte of request body may be sent), answering ``/early`` as soon as the request's
HEADERS arrive. The write timeout is 120 s; each request runs under a hard 20 s limit.
A first GET lets the server's SETTINGS in: a request that opens a connection may send
body bytes within the default window before they arrive (RFC 9113 3.4, 6.5.3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterator

import h2.connection
import h2.errors
import httpx
import pytest
from h2.settings import SettingCodes

import toolpool
from tests._support.h2_raw import ScriptedH2Server, ScriptedStream

pytestmark = pytest.mark.timeout(90)
CHUNKS = [bytes([i]) * (128 * 1024) for i in range(8)]  # 1 MiB, above the send high water
TIMEOUT = httpx.Timeout(10.0, write=120.0)
HARD_LIMIT = 20.0


def _script(server_resets: bool):  # type: ignore[no-untyped-def]
    def script(conn: h2.connection.H2Connection, sid: int, stream: ScriptedStream) -> None:
        if stream.answered:
            return
        if stream.path == "/early" and not stream.request_ended:
            body = b"early answer"
            head = [(b":status", b"200"), (b"content-length", str(len(body)).encode())]
            conn.send_headers(sid, head)
            conn.send_data(sid, body, end_stream=True)
            if server_resets:  # what RFC 9113 8.1 suggests; our client must not need it
                conn.reset_stream(sid, h2.errors.ErrorCodes.NO_ERROR)
            stream.answered = True
        elif stream.path == "/after" and stream.request_ended:
            conn.send_headers(sid, [(b":status", b"200")])
            conn.send_data(sid, b"after", end_stream=True)
            stream.answered = True

    return script


def _server(server_resets: bool) -> ScriptedH2Server:
    return ScriptedH2Server(_script(server_resets), {SettingCodes.INITIAL_WINDOW_SIZE: 0})


def _pool(server: ScriptedH2Server) -> toolpool.Pool:
    return toolpool.Pool(
        [toolpool.Destination("early", server.url, max_connections=2, warmup=0.0)],
        verify=server.client_context(),
        http2=True,
        policy=None,
    )


def _check(server: ScriptedH2Server, server_resets: bool, read: list[bytes], stats: object) -> None:
    assert 0 < len(read) < len(CHUNKS)  # the body stopped being read once answered
    (conn,) = server.connections  # the follow-up request used the same connection
    first, early, after = conn.streams.values()
    assert (first.path, early.path, after.path) == ("/after", "/early", "/after")
    assert early.received == 0 and not early.request_ended  # window 0: no body went out
    if server_resets:
        # Crossed by the server's own reset: ours is refused by h2 locally, or is NO_ERROR.
        assert early.reset_code in (None, h2.errors.ErrorCodes.NO_ERROR)
    else:
        server.wait(lambda: early.reset_code is not None)
        assert early.reset_code == h2.errors.ErrorCodes.NO_ERROR  # "done", not CANCEL
    assert after.reset_code is None
    assert stats.in_use == 0  # type: ignore[attr-defined]
    assert stats.http2_streams_reset_total == 0  # type: ignore[attr-defined]
    assert stats.http2_connections_opened == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("server_resets", [False, True], ids=["no_rst", "server_rst"])
async def test_an_early_complete_response_stops_the_body_asyncio(server_resets: bool) -> None:
    read: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        for chunk in CHUNKS:
            read.append(chunk)
            yield chunk

    with _server(server_resets) as server:
        async with _pool(server) as pool:
            client = pool.client()
            async with asyncio.timeout(HARD_LIMIT):
                first = await client.get(server.url + "/after", timeout=TIMEOUT)
                assert first.content == b"after"  # the server's SETTINGS are in
                response = await client.post(server.url + "/early", content=body(), timeout=TIMEOUT)
                assert (response.status_code, response.content) == (200, b"early answer")
                after = await client.get(server.url + "/after", timeout=TIMEOUT)
                assert after.content == b"after"
            stats = pool.stats()["early"]
        _check(server, server_resets, read, stats)


@pytest.mark.parametrize("server_resets", [False, True], ids=["no_rst", "server_rst"])
def test_an_early_complete_response_stops_the_body_threads(server_resets: bool) -> None:
    read: list[bytes] = []

    def body() -> Iterator[bytes]:
        for chunk in CHUNKS:
            read.append(chunk)
            yield chunk

    with (
        _server(server_resets) as server,
        _pool(server) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as executor,
    ):
        client = pool.sync_client()

        def calls() -> tuple[httpx.Response, httpx.Response]:
            assert client.get(server.url + "/after", timeout=TIMEOUT).content == b"after"
            response = client.post(server.url + "/early", content=body(), timeout=TIMEOUT)
            return response, client.get(server.url + "/after", timeout=TIMEOUT)

        response, after = executor.submit(calls).result(HARD_LIMIT)
        assert (response.status_code, response.content) == (200, b"early answer")
        assert after.content == b"after"
        stats = pool.stats()["early"]
        _check(server, server_resets, read, stats)
