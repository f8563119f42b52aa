"""A new HTTP/2 connection's first request goes out right after the connection preface,
without waiting a round trip for the server's SETTINGS (RFC 9113 3.4, 6.5); the key's other
requests wait for the SETTINGS (then the server's stream limit governs), as before.

The exact orderings come from `tests._support.h2_raw.ScriptedH2Server`: a server that sends
its SETTINGS only once it has seen a request's HEADERS (a client waiting for the SETTINGS
would wait forever), one that sends GOAWAY(last stream id 0) or drops the connection instead
of its SETTINGS, and one announcing one concurrent stream while two requests of a tenant
race at connect. The test bed (Downstream, TLS + HTTP/2) checks a cold connection's first
request with a body larger than the default window. Every request runs under a hard limit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Any

import h2.connection
import httpx
import pytest
from h2.settings import SettingCodes

import toolpool
from tests._support.h2_raw import ScriptedH2Server, ScriptedStream
from toolpool import _h2io, _h2pool
from toolpool._h2 import ConnectionFailed, StreamNotProcessed
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(120)
HARD_LIMIT = 30.0
TIMEOUT = httpx.Timeout(20.0)
DRIVERS = ["asyncio", "threads"]


def _answer(conn: h2.connection.H2Connection, sid: int, stream: ScriptedStream) -> None:
    if stream.request_ended and not stream.answered:
        body = stream.path.encode()
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"%d" % len(body))])
        conn.send_data(sid, body, end_stream=True)
        stream.answered = True


def _pool(server: ScriptedH2Server, cap: int = 4) -> toolpool.Pool:
    return toolpool.Pool(
        [toolpool.Destination("s", server.url, max_connections=cap, warmup=0.0)],
        verify=server.client_context(),
        http2=True,
        policy=None,  # no retries but the pool's own (a stream the server did not process)
    )


async def _get_all(server: ScriptedH2Server, driver: str, paths: list[str]) -> list[Any]:
    """GET `paths` at once, as one tenant, on `driver`; each result a response or the error."""
    async with _pool(server) as pool:
        if driver == "asyncio":
            client = pool.client()

            async def one(path: str) -> Any:
                with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                    try:
                        return await client.get(server.url + path, timeout=TIMEOUT)
                    except httpx.HTTPError as exc:
                        return exc

            async with asyncio.timeout(HARD_LIMIT):
                return list(await asyncio.gather(*[one(p) for p in paths]))
        sync_client = pool.sync_client()

        def call(path: str) -> Any:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                try:
                    return sync_client.get(server.url + path, timeout=TIMEOUT)
                except httpx.HTTPError as exc:
                    return exc

        with concurrent.futures.ThreadPoolExecutor(len(paths)) as ex:
            futures = [ex.submit(call, p) for p in paths]
            return [f.result(HARD_LIMIT) for f in futures]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_the_first_request_goes_out_before_the_servers_settings(driver: str) -> None:
    """The server sends its SETTINGS only after it has read our HEADERS: the first request
    completes (a client waiting for the SETTINGS first would wait until its timeout)."""
    with ScriptedH2Server(_answer, preface="after_headers") as server:
        (response,) = await _get_all(server, driver, ["/first"])
        assert isinstance(response, httpx.Response), response
        assert (response.status_code, response.content) == (200, b"/first")
        assert response.http_version == "HTTP/2"
        (conn,) = server.connections
        assert [s.path for s in conn.streams.values()] == ["/first"]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_goaway_before_settings_means_not_processed_and_goes_to_a_new_connection(
    driver: str,
) -> None:
    """GOAWAY(last stream id 0) instead of SETTINGS: the first stream was not processed, so
    it is sent once more, on a new connection (which behaves)."""
    with ScriptedH2Server(_answer, preface="goaway", preface_connections=1) as server:
        (response,) = await _get_all(server, driver, ["/x"])
        assert isinstance(response, httpx.Response), response
        assert (response.status_code, response.content) == (200, b"/x")
        first, second = server.connections
        assert [s.path for s in first.streams.values()] == ["/x"]  # it went out early
        assert not first.settings_sent and second.settings_sent
        assert [s.answered for s in second.streams.values()] == [True]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_goaway_before_settings_on_every_connection_fails_as_not_processed(
    driver: str,
) -> None:
    with ScriptedH2Server(_answer, preface="goaway") as server:
        (error,) = await _get_all(server, driver, ["/x"])
        assert isinstance(error, StreamNotProcessed), repr(error)
        assert error.reason == "goaway"
        assert len(server.connections) == 2  # tried once more elsewhere, then given up


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_connection_dropped_before_settings_fails_as_connection_failed(
    driver: str,
) -> None:
    """The server closes the connection (no GOAWAY) once it has read our HEADERS: the
    request may have been processed, so it fails with `ConnectionFailed`, not retried."""
    with ScriptedH2Server(_answer, preface="drop") as server:
        (error,) = await _get_all(server, driver, ["/x"])
        assert isinstance(error, ConnectionFailed), repr(error)
        (conn,) = server.connections
        assert [s.path for s in conn.streams.values()] == ["/x"]


@pytest.mark.parametrize("driver", DRIVERS)
async def test_max_streams_1_while_two_requests_of_a_tenant_race_at_connect(
    driver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests of one tenant arrive together on a cold pool; the server announces one
    concurrent stream, in SETTINGS it sends only once it read the first HEADERS. The
    second request waits for the first one's connect (it opens no connection of its own
    and sends no stream before the SETTINGS), and never a connection carries two streams."""
    gate = threading.Event()
    borrow = _h2pool.KeyConnections.borrow

    def spy(self: _h2pool.KeyConnections, *args: Any) -> Any:
        found = borrow(self, *args)
        _stale, conn, opening, mine = found
        if conn is None and opening is not None and not mine:
            gate.set()  # a request waits for another one's connect: let the server read
        return found

    monkeypatch.setattr(_h2pool.KeyConnections, "borrow", spy)
    settings = {SettingCodes.MAX_CONCURRENT_STREAMS: 1}
    with ScriptedH2Server(
        _answer, settings, preface="after_headers", preface_connections=1, settings_gate=gate
    ) as server:
        responses = await _get_all(server, driver, ["/a", "/b"])
        assert gate.is_set()
        for path, response in zip(["/a", "/b"], responses, strict=True):
            assert isinstance(response, httpx.Response), response
            assert (response.status_code, response.content) == (200, path.encode())
        first = server.connections[0]
        assert len(server.connections) <= 2
        assert next(iter(first.streams)) == 1  # the opener's stream, before the SETTINGS
        assert all(c.most_open <= 1 for c in server.connections)
        assert sum(len(c.streams) for c in server.connections) == 2  # none refused, resent


@pytest.mark.parametrize("driver", DRIVERS)
async def test_a_cold_connections_first_request_sends_a_body_beyond_the_default_window(
    driver: str,
) -> None:
    """On the test bed: the first request of a new connection posts 200 KB (more than the
    65,535 bytes the client may send before the server's SETTINGS and WINDOW_UPDATEs):
    the body arrives whole, on one connection."""
    body = b"0123456789abcdef" * 12_800
    with Downstream({"api": ServiceSpec(require_auth=False)}, tls=True) as ds:
        pool = toolpool.Pool(
            [toolpool.Destination("api", ds.url("api"), max_connections=4, warmup=0.0)],
            verify=ds.client_ssl_context(),
            http2=True,
        )
        url = ds.url("api") + "/echo"
        async with pool:
            if driver == "asyncio":
                async with asyncio.timeout(HARD_LIMIT):
                    response = await pool.client().post(url, content=body, timeout=TIMEOUT)
            else:

                def call() -> httpx.Response:
                    return pool.sync_client().post(url, content=body, timeout=TIMEOUT)

                response = await asyncio.wait_for(asyncio.to_thread(call), HARD_LIMIT)
            assert (response.status_code, response.http_version) == (200, "HTTP/2")
            assert response.json()["body"] == body.decode()
            stats = pool.stats()["api"]
            assert stats.http2_connections_opened == 1  # type: ignore[attr-defined]


def _answer_b(conn: h2.connection.H2Connection, sid: int, stream: ScriptedStream) -> None:
    if stream.path == "/b":  # "/a" is never answered: its caller gives up
        _answer(conn, sid, stream)


async def test_an_opener_cancelled_before_the_settings_lets_its_waiters_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request that opened the connection is cancelled while the server has read
    nothing (no SETTINGS yet) and another request of the tenant waits for that connect:
    the waiter goes on, on the same connection (its only stream now), and is answered."""
    gate = threading.Event()
    waiting = asyncio.Event()
    borrow = _h2pool.KeyConnections.borrow

    def spy(self: _h2pool.KeyConnections, *args: Any) -> Any:
        found = borrow(self, *args)
        _stale, conn, opening, mine = found
        if conn is None and opening is not None and not mine:
            waiting.set()
        elif conn is not None and waiting.is_set():
            gate.set()  # the waiter got the connection: let the server read
        return found

    monkeypatch.setattr(_h2pool.KeyConnections, "borrow", spy)
    streaming = asyncio.Event()
    handle = _h2io.AsyncH2Connection.handle_async_request

    async def handle_spy(
        self: _h2io.AsyncH2Connection, request: httpx.Request, trace: Any = None
    ) -> httpx.Response:
        streaming.set()  # the stream opens before this task can be interrupted
        return await handle(self, request, trace)

    monkeypatch.setattr(_h2io.AsyncH2Connection, "handle_async_request", handle_spy)
    with ScriptedH2Server(_answer_b, preface="after_headers", settings_gate=gate) as server:
        async with _pool(server) as pool:
            client = pool.client()

            async def get(path: str) -> httpx.Response:
                with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                    return await client.get(server.url + path, timeout=TIMEOUT)

            async with asyncio.timeout(HARD_LIMIT):
                opener = asyncio.create_task(get("/a"))
                await streaming.wait()  # its stream went out, no SETTINGS yet
                waiter = asyncio.create_task(get("/b"))
                await waiting.wait()
                opener.cancel()
                response = await waiter
                with pytest.raises(asyncio.CancelledError):
                    await opener
            assert (response.status_code, response.content) == (200, b"/b")
        (conn,) = server.connections
        assert [s.path for s in conn.streams.values()] == ["/a", "/b"]
        assert conn.most_open <= 2  # /a reset (CANCEL) on the same read as /b's HEADERS
