"""One HTTP/2 connection (toolpool._h2 + toolpool._h2io) against the test bed over TLS + ALPN.

Each rule of the connection is checked from both ends: what the client saw, and what the
server counted (streams, resets, PINGs, connections), on the asyncio and the thread driver.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests._support.h2_raw import open_tls, open_tls_sync
from toolpool._h2 import StreamNotProcessed, StreamReset
from toolpool._h2io import AsyncH2Connection, NoNewStream, SyncH2Connection
from toolpool.testing import Downstream, ServiceSpec

OPEN = ServiceSpec(require_auth=False)
PATTERN = bytes(range(256))
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream(
        {"api": OPEN, "two": ServiceSpec(require_auth=False, max_concurrent_streams=2)}, tls=True
    ) as downstream:
        yield downstream


async def _connect(ds: Downstream, name: str = "api") -> AsyncH2Connection:
    chosen, transport = await open_tls(*ds.address(name), ds.client_ssl_context(), timeout=5)
    assert chosen == "h2"
    conn = AsyncH2Connection.adopt(transport)
    await conn.settings(5)  # the server's stream limit; until then one stream at a time
    return conn


def _connect_sync(ds: Downstream, name: str = "api") -> SyncH2Connection:
    chosen, sock = open_tls_sync(*ds.address(name), ds.client_ssl_context(), timeout=5)
    assert chosen == "h2"
    conn = SyncH2Connection(sock)
    conn.settings(5)
    return conn


def _req(ds: Downstream, path: str, name: str = "api", **kwargs: object) -> httpx.Request:
    return httpx.Request(
        "GET" if "content" not in kwargs else "POST", ds.url(name) + path, **kwargs
    )  # type: ignore[arg-type]


def test_one_stream_until_the_servers_settings_arrive() -> None:
    """Sans I/O: before the server's SETTINGS its stream limit is unknown, so one stream."""
    import h2.config
    import h2.connection

    from toolpool._h2 import H2Client

    client = H2Client()
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.receive_data(client.initiate())
    assert client.accepting
    client.open_stream(b"GET", b"https", b"x.test", b"/", [], end_stream=True)
    assert not client.accepting  # a second stream could exceed a limit not yet known
    server.initiate_connection()
    server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 3})
    client.receive(server.data_to_send())
    assert client.settings_received
    assert client.max_streams == 3
    assert client.accepting


# -- basics and flow control ----------------------------------------------------------------


async def test_concurrent_streams_and_large_bodies_both_ways_async(ds: Downstream) -> None:
    conn = await _connect(ds)
    upload = PATTERN * 12_000  # 3 MB: far above the 64 KiB default window
    responses = await asyncio.gather(
        *[conn.handle_async_request(_req(ds, "/anything", content=upload)) for _ in range(4)],
        conn.handle_async_request(_req(ds, "/bytes?n=7000000")),
    )
    for r in responses[:4]:
        assert r.extensions["http_version"] == b"HTTP/2"
        assert (await r.aread()).count(b'"body_size":3072000') == 1
    assert await responses[4].aread() == (PATTERN * 27344)[:7_000_000]
    conn.close()
    stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert stats.connections_accepted == 1
    assert stats.connection_streams == {1: 5}
    assert stats.peak_connection_streams[1] >= 2


def test_concurrent_streams_from_threads_and_large_bodies_sync(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    upload = PATTERN * 8_000

    def call(i: int) -> bytes:
        if i % 2:
            return conn.handle_request(_req(ds, "/anything", content=upload)).read()
        return conn.handle_request(_req(ds, "/bytes?n=3000000")).read()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(call, range(16)))
    for i, body in enumerate(bodies):
        if i % 2:
            assert b'"body_size":2048000' in body
        else:
            assert body == (PATTERN * 11719)[:3_000_000]
    conn.close()
    stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert stats.connections_accepted == 1
    assert stats.connection_streams == {1: 16}
    assert stats.streams_open == 0


async def test_streaming_response_arrives_chunk_by_chunk(ds: Downstream) -> None:
    conn = await _connect(ds)
    response = await conn.handle_async_request(_req(ds, "/stream?chunks=4&size=1000&delay=0.05"))
    seen = 0
    chunks = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        chunks += 1
        if chunks == 1:  # the first chunk came before the server finished the response
            assert ds.stats("api").requests_in_progress == 1
    assert seen == 4000
    assert conn.state.streams == {}
    conn.close()


# -- server SETTINGS --------------------------------------------------------------------------


async def test_server_max_concurrent_streams_is_honoured(ds: Downstream) -> None:
    conn = await _connect(ds, "two")
    assert conn.state.max_streams == 2
    # The heads come at once, the bodies later: both streams stay open meanwhile.
    first = await conn.handle_async_request(_req(ds, "/stream?chunks=2&delay=0.2", "two"))
    second = await conn.handle_async_request(_req(ds, "/stream?chunks=2&delay=0.2", "two"))
    assert not conn.is_available  # a third would exceed the server's limit
    with pytest.raises(NoNewStream, match="no new stream"):
        await conn.handle_async_request(_req(ds, "/anything", "two"))
    await first.aread()
    assert conn.is_available
    await second.aread()
    assert ds.stats("two").peak_connection_streams == {1: 2}
    conn.close()


def test_max_streams_1_fault_limits_the_connection_sync(ds: Downstream) -> None:
    ds.set_fault("api", "max_streams_1", count=1)
    conn = _connect_sync(ds)
    assert conn.state.max_streams == 1
    response = conn.handle_request(_req(ds, "/stream?chunks=2&delay=0.1"))
    assert not conn.is_available
    response.read()
    assert conn.is_available
    conn.close()


# -- cancellation and timeouts ----------------------------------------------------------------


async def test_cancelled_request_resets_its_stream_and_keeps_the_connection(
    ds: Downstream,
) -> None:
    conn = await _connect(ds)
    task = asyncio.ensure_future(conn.handle_async_request(_req(ds, "/hang")))
    await ds.wait_stats_async("api", lambda s: s.requests_in_progress == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ds.wait_stats_async(
        "api", lambda s: s.streams_reset_by_client == 1 and s.requests_in_progress == 0
    )
    response = await conn.handle_async_request(_req(ds, "/anything"))
    assert response.status_code == 200
    await response.aread()
    assert ds.stats("api").connections_accepted == 1
    assert conn.state.streams == {}
    conn.close()


async def test_closing_a_response_early_resets_the_stream_only(ds: Downstream) -> None:
    conn = await _connect(ds)
    response = await conn.handle_async_request(_req(ds, "/stream?chunks=50&size=1000&delay=0.05"))
    async for _ in response.aiter_raw():
        break
    await response.aclose()
    await ds.wait_stats_async("api", lambda s: s.streams_reset_by_client == 1)
    again = await conn.handle_async_request(_req(ds, "/anything"))
    assert again.status_code == 200
    await again.aread()
    assert ds.stats("api").connections_accepted == 1
    conn.close()


def test_read_timeout_resets_the_stream_and_keeps_the_connection_sync(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    request = _req(ds, "/hang", extensions={"timeout": {"read": 0.2}})
    with pytest.raises(httpx.ReadTimeout):
        conn.handle_request(request)
    ds.wait_stats("api", lambda s: s.streams_reset_by_client == 1)
    assert conn.handle_request(_req(ds, "/anything")).read()
    assert ds.stats("api").connections_accepted == 1
    conn.close()


# -- server resets and GOAWAY -------------------------------------------------------------------


async def test_refused_stream_is_retry_safe_and_other_resets_are_not(ds: Downstream) -> None:
    conn = await _connect(ds)
    ds.set_fault("api", "refused_stream", count=1)
    with pytest.raises(StreamNotProcessed) as refused:
        await conn.handle_async_request(_req(ds, "/anything"))
    assert refused.value.retry_safe
    ds.set_fault("api", "rst_stream", count=1)
    with pytest.raises(StreamReset) as reset:
        await conn.handle_async_request(_req(ds, "/anything"))
    assert not reset.value.retry_safe
    assert "INTERNAL_ERROR" in str(reset.value)
    response = await conn.handle_async_request(_req(ds, "/anything"))
    assert response.status_code == 200  # the connection survived both
    await response.aread()
    conn.close()


async def test_goaway_drains_in_flight_streams_and_refuses_newer_ones(ds: Downstream) -> None:
    conn = await _connect(ds)
    slow = await asyncio.wait_for(
        asyncio.ensure_future(conn.handle_async_request(_req(ds, "/stream?chunks=3&delay=0.2"))),
        5,
    )
    ds.set_fault("api", "goaway", count=1)
    with pytest.raises(StreamNotProcessed, match="GOAWAY"):
        await conn.handle_async_request(_req(ds, "/anything"))
    assert conn.state.goaway_received
    assert not conn.is_available
    assert len(await slow.aread()) == 3 * 1024  # the earlier stream finished
    await ds.wait_stats_async("api", lambda s: s.connections_open == 0)
    assert conn.is_closed


def test_goaway_drains_sync(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    slow = conn.handle_request(_req(ds, "/stream?chunks=3&delay=0.2"))
    ds.set_fault("api", "goaway", count=1)
    with pytest.raises(StreamNotProcessed):
        conn.handle_request(_req(ds, "/anything"))
    assert not conn.is_available
    assert len(slow.read()) == 3 * 1024
    ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert conn.is_closed


# -- PING and lifetime ------------------------------------------------------------------------


async def test_ping_answered_and_silent_connection_detected(ds: Downstream) -> None:
    conn = await _connect(ds)
    assert await conn.ping(5.0)
    ds.set_fault("api", "silent", count=1)
    assert not await conn.ping(0.3)
    conn.close()
    # Unanswered after 0.3 s need not mean the server has read the PING yet: wait for it.
    await ds.wait_stats_async("api", lambda s: s.faults_fired == {"silent": 1})


def test_ping_sync(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    assert conn.ping(5.0)
    ds.set_fault("api", "silent", count=1)
    assert not conn.ping(0.3)
    conn.close()


async def test_fence_waits_for_the_ping_and_closes_a_silent_connection(ds: Downstream) -> None:
    """A cancelled stream's permit comes back through `fence`: once the server answered a
    PING (it read the RST_STREAM), or, without an answer within the timeout, once the
    connection is closed (as the thread driver's fence does)."""
    conn = await _connect(ds)
    answered = asyncio.Event()
    conn.fence(answered.set, 5.0)
    await asyncio.wait_for(answered.wait(), 5)
    assert not conn.is_closed
    ds.set_fault("api", "silent", count=1)
    given_back = asyncio.Event()
    conn.fence(given_back.set, 0.3)
    await asyncio.wait_for(given_back.wait(), 5)
    assert conn.is_closed
    await ds.wait_stats_async("api", lambda s: s.faults_fired == {"silent": 1})


def test_fence_sync(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    calls: list[str] = []
    conn.fence(lambda: calls.append("answered"), 5.0)
    assert calls == ["answered"]
    assert not conn.is_closed
    ds.set_fault("api", "silent", count=1)
    conn.fence(lambda: calls.append("closed"), 0.3)
    assert calls == ["answered", "closed"]
    assert conn.is_closed


async def test_drain_lets_open_streams_finish_then_closes(ds: Downstream) -> None:
    conn = await _connect(ds)
    slow = await conn.handle_async_request(_req(ds, "/stream?chunks=3&delay=0.1"))
    conn.drain()
    assert not conn.is_available
    assert not conn.is_closed
    assert len(await slow.aread()) == 3 * 1024
    assert conn.is_closed
    await ds.wait_stats_async("api", lambda s: s.connections_open == 0)


# -- errors stay on their connection ----------------------------------------------------------


async def test_a_connection_error_fails_only_its_own_streams(ds: Downstream) -> None:
    doomed = await _connect(ds)
    healthy = await _connect(ds)
    on_healthy = await healthy.handle_async_request(_req(ds, "/stream?chunks=3&delay=0.1"))
    on_doomed = asyncio.ensure_future(doomed.handle_async_request(_req(ds, "/hang")))
    await ds.wait_stats_async("api", lambda s: s.requests_in_progress == 2)
    assert doomed.transport is not None
    doomed.transport.abort()  # the connection breaks under its stream
    with pytest.raises(httpx.RemoteProtocolError):
        await asyncio.wait_for(on_doomed, 5)
    assert len(await on_healthy.aread()) == 3 * 1024
    assert healthy.is_available
    healthy.close()


async def test_server_reset_fails_the_streams_of_that_connection(ds: Downstream) -> None:
    doomed = await _connect(ds)
    healthy = await _connect(ds)
    on_healthy = await healthy.handle_async_request(_req(ds, "/stream?chunks=3&delay=0.1"))
    waiting = asyncio.ensure_future(doomed.handle_async_request(_req(ds, "/hang")))
    await ds.wait_stats_async("api", lambda s: s.requests_in_progress == 2)
    with pytest.raises(httpx.RemoteProtocolError):
        await doomed.handle_async_request(
            _req(ds, "/anything", headers={"x-testbed-fault": "reset"})
        )
    with pytest.raises(httpx.RemoteProtocolError):
        await asyncio.wait_for(waiting, 5)
    assert doomed.is_closed
    assert len(await on_healthy.aread()) == 3 * 1024
    assert healthy.is_available
    healthy.close()


def test_threads_waiting_on_one_connection_all_wake_on_its_loss(ds: Downstream) -> None:
    conn = _connect_sync(ds)
    errors: list[BaseException] = []

    def hang() -> None:
        try:
            conn.handle_request(_req(ds, "/hang"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hang) for _ in range(3)]
    for t in threads:
        t.start()
    ds.wait_stats("api", lambda s: s.requests_in_progress == 3)
    with pytest.raises(httpx.RemoteProtocolError):
        conn.handle_request(_req(ds, "/anything", headers={"x-testbed-fault": "reset"}))
    for t in threads:
        t.join(10)
    assert len(errors) == 3
    assert all(isinstance(e, httpx.RemoteProtocolError) for e in errors)


async def test_async_iterable_request_body(ds: Downstream) -> None:
    conn = await _connect(ds)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield PATTERN * 1000

    response = await conn.handle_async_request(_req(ds, "/anything", content=body()))
    assert b'"body_size":2560000' in await response.aread()
    conn.close()
