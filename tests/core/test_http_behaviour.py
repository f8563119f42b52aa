"""The transports are drop-in httpx transports: httpx's own behaviours work through them."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

import toolpool
from tests._support.pools import assert_quiet, destination, speaks_h2
from toolpool.testing import Downstream


async def test_requests_and_bodies_round_trip(downstream: Downstream) -> None:
    base = downstream.url("api")
    async with toolpool.Pool([destination(downstream)]) as pool:
        client = pool.client()
        r = await client.get(f"{base}/anything?q=1")
        assert r.status_code == 200 and r.json()["path"] == "/anything"
        h2 = speaks_h2(downstream)
        assert r.http_version == ("HTTP/2" if h2 else "HTTP/1.1") and r.reason_phrase == "OK"
        r = await client.post(f"{base}/echo", json={"a": 1})
        assert r.json()["body"] == '{"a":1}'

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(5):
                yield b"x" * (1000 + i)

        r = await client.post(f"{base}/anything", content=chunks())  # chunked upload
        assert r.json()["body_size"] == 5010
        r = await client.get(f"{base}/bytes?n=300000")
        assert len(r.content) == 300000
        r = await client.head(f"{base}/bytes?n=100")
        assert r.status_code == 200 and r.content == b""
        r = await client.get(f"{base}/anything")  # the same connection after all of the above
        assert r.extensions["toolpool"]["reused"]
        await client.aclose()
        assert_quiet(pool)
        stats = pool.stats()["api"]
        accepted = downstream.stats("api").connections_accepted
        if h2:  # one connection (the warm-up's) carried every request, each a stream
            assert stats.protocol == "h2" and stats.http2_connections_opened == accepted == 1
        else:
            assert stats.protocol == "http/1.1" and stats.created_total == accepted


def test_sync_requests_and_bodies_round_trip(downstream: Downstream) -> None:
    base = downstream.url("api")
    with toolpool.Pool([destination(downstream)]) as pool, pool.sync_client() as client:
        assert client.post(f"{base}/echo", content=b"hello").json()["body"] == "hello"

        def chunks() -> Iterator[bytes]:
            yield b"ab"
            yield b"cd"

        assert client.post(f"{base}/anything", content=chunks()).json()["body_size"] == 4
        assert len(client.get(f"{base}/bytes?n=200000").content) == 200000
        assert client.head(f"{base}/anything").content == b""
        assert_quiet(pool)


async def test_streaming_response_releases_on_read_and_closes_on_early_close(
    plain: Downstream,
) -> None:
    base = plain.url("api")
    async with toolpool.Pool([destination(plain)], warmup=0) as pool:
        client = pool.client()
        async with client.stream("GET", f"{base}/stream?chunks=20&size=1000") as r:
            parts = [part async for part in r.aiter_raw()]
        assert sum(map(len, parts)) == 20000
        assert pool.stats()["api"].idle == 1  # read to the end: back in the pool
        async with client.stream("GET", f"{base}/stream?chunks=50&size=10000&delay=0.01") as r:
            async for _ in r.aiter_raw():
                break  # leave early: the rest of the body is unread
        stats = pool.stats()["api"]
        assert stats.closed_total["error"] == 1 and stats.in_use == 0
        assert (await client.get(f"{base}/anything")).status_code == 200
        assert_quiet(pool)


async def test_redirects_cookies_and_status_errors(plain: Downstream) -> None:
    base = plain.url("api")
    async with toolpool.Pool([destination(plain)]) as pool:
        client = pool.client(follow_redirects=True)
        r = await client.get(f"{base}/redirect?to=/anything")
        assert r.json()["path"] == "/anything" and len(r.history) == 1
        await client.get(f"{base}/cookies/set?flavour=oat")
        assert (await client.get(f"{base}/cookies")).json()["cookies"] == {"flavour": "oat"}
        r = await client.get(f"{base}/status/503")
        with pytest.raises(httpx.HTTPStatusError):
            r.raise_for_status()
        assert_quiet(pool)


async def test_read_timeout_closes_the_connection(plain: Downstream) -> None:
    base = plain.url("api")
    async with toolpool.Pool([destination(plain)], warmup=0) as pool:
        client = pool.client(timeout=httpx.Timeout(5.0, read=0.2))
        with pytest.raises(httpx.ReadTimeout):
            await client.get(f"{base}/hang")
        assert_quiet(pool)
        assert pool.stats()["api"].closed_total["error"] == 1
        plain.wait_stats("api", lambda s: s.connections_open == 0)
        assert (await client.get(f"{base}/anything")).status_code == 200


def test_sync_read_timeout(plain: Downstream) -> None:
    base = plain.url("api")
    with toolpool.Pool([destination(plain)], warmup=0) as pool:
        client = pool.sync_client(timeout=httpx.Timeout(5.0, read=0.2))
        with pytest.raises(httpx.ReadTimeout):
            client.get(f"{base}/hang")
        assert_quiet(pool)
        plain.wait_stats("api", lambda s: s.connections_open == 0)


@pytest.fixture
def unaccepting_listener() -> Iterator[tuple[str, int]]:
    """A loopback port whose accept queue is full: connecting to it hangs until timeout."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    port = server.getsockname()[1]
    for _ in range(4):  # fill the (tiny) backlog so further SYNs go unanswered
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield ("127.0.0.1", port)
    for s in fillers:
        s.close()
    server.close()


async def test_connect_timeout_and_refused(unaccepting_listener: tuple[str, int]) -> None:
    host, port = unaccepting_listener
    async with toolpool.Pool(connect_timeout=0.3, warmup=0) as pool:
        with pytest.raises(httpx.ConnectTimeout):
            await pool.client().get(f"http://{host}:{port}/")
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        closed_port = free.getsockname()[1]
        free.close()
        with pytest.raises(httpx.ConnectError):
            await pool.client().get(f"http://127.0.0.1:{closed_port}/")
        assert_quiet(pool)
        assert pool.stats().created_total == 0


def test_sync_connect_timeout(unaccepting_listener: tuple[str, int]) -> None:
    host, port = unaccepting_listener
    with toolpool.Pool(connect_timeout=0.3, warmup=0) as pool:
        with pytest.raises(httpx.ConnectTimeout):
            pool.sync_client().get(f"http://{host}:{port}/")
        assert_quiet(pool)


async def test_closing_a_client_does_not_close_the_pool(plain: Downstream) -> None:
    base = plain.url("api")
    async with toolpool.Pool([destination(plain)], warmup=0) as pool:
        for _ in range(3):
            async with httpx.AsyncClient(transport=toolpool.AsyncTransport(pool)) as client:
                assert (await client.get(f"{base}/anything")).status_code == 200
        with httpx.Client(transport=toolpool.Transport(pool)) as sync_client:
            assert sync_client.get(f"{base}/anything").status_code == 200
        assert not pool.closed
        # One connection per driver carried everything.
        assert plain.stats("api").connections_accepted == 2
    assert pool.closed
    with pytest.raises(toolpool.PoolClosed):
        await pool.client().get(f"{base}/anything")


async def test_tls_with_an_untrusted_certificate_fails_to_connect() -> None:
    from toolpool.testing import ServiceSpec

    async with Downstream({"api": ServiceSpec(require_auth=False)}, tls=True) as ds:
        async with toolpool.Pool(warmup=0) as pool:  # trusts certifi's CAs, not the test CA
            with pytest.raises(httpx.ConnectError, match="TLS handshake"):
                await pool.client().get(ds.url("api") + "/anything")
            assert_quiet(pool)


def test_unknown_destinations_can_be_rejected(plain: Downstream) -> None:
    pool = toolpool.Pool([destination(plain)], unknown_destinations="reject")
    with pool, pool.sync_client() as client:
        assert client.get(plain.url("api") + "/anything").status_code == 200
        with pytest.raises(toolpool.UnknownDestination, match="not a configured destination"):
            client.get("http://127.0.0.2:9/anything")


def test_sync_transport_is_safe_from_many_threads(plain: Downstream) -> None:
    base = plain.url("api")
    errors: list[BaseException] = []
    with toolpool.Pool([destination(plain, max_connections=4, queue_factor=10)]) as pool:
        client = pool.sync_client()

        def work(i: int) -> None:
            name = f"t{i % 4}"
            try:
                with toolpool.auth_context(toolpool.AuthContext(tenant=name)):
                    for _ in range(40):
                        r = client.get(f"{base}/anything", headers={"X-Tenant": name})
                        assert r.json()["tenant"] == name
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[:3]
        assert_quiet(pool)
    stats = plain.stats("api")
    assert stats.requests_total == 16 * 40
    assert stats.peak_connections <= 4
    assert stats.mixed_connections() == {}


async def test_event_loop_and_threads_share_the_cap(plain: Downstream) -> None:
    base = plain.url("api")
    async with toolpool.Pool([destination(plain, max_connections=3, queue_factor=50)]) as pool:
        client, sync_client = pool.client(), pool.sync_client()

        def sync_work() -> None:
            for _ in range(30):
                sync_client.get(f"{base}/delay?s=0.002")

        threads = [asyncio.to_thread(sync_work) for _ in range(4)]
        calls = [client.get(f"{base}/delay?s=0.002") for _ in range(120)]
        await asyncio.gather(*threads, *calls)
        assert_quiet(pool)
    assert plain.stats("api").peak_connections <= 3


def test_connections_of_a_finished_event_loop_close_with_the_pool(plain: Downstream) -> None:
    """asyncio.run() returns and closes its loop; the pool's connections on that loop are
    then closed without it, from this thread or the maintenance thread."""
    url = plain.url("api") + "/anything"
    pool = toolpool.Pool([destination(plain)], warmup=0)

    async def use() -> None:
        r = await pool.client().get(url)
        assert r.status_code == 200

    asyncio.run(use())
    asyncio.run(use())  # a second loop: its own connection
    assert pool.stats()["api"].idle == 2
    pool.close()
    stats = pool.stats()["api"]
    assert (stats.idle, stats.closing, stats.in_use) == (0, 0, 0)
    plain.wait_stats("api", lambda s: s.connections_open == 0)


async def test_lean_request_path(plain: Downstream) -> None:
    """pool.request(): the pool without httpx's client layer, body read, errors raisable."""
    base = plain.url("api")
    async with toolpool.Pool([destination(plain)], warmup=0) as pool:
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            r = await pool.request(
                "GET", f"{base}/anything", params={"q": "1"}, headers={"X-Tenant": "acme"}
            )
            assert r.json()["tenant"] == "acme"
            assert r.json()["query"] == "q=1"
            r = await pool.request(
                "POST", f"{base}/echo", json={"a": 1}, headers={"X-Tenant": "acme"}
            )
            assert r.json()["body"] == '{"a":1}'
        r = await pool.request("GET", f"{base}/status/404")
        with pytest.raises(httpx.HTTPStatusError):
            r.raise_for_status()
        with pytest.raises(httpx.ReadTimeout):
            await pool.request("GET", f"{base}/hang", timeout=0.2)
        r = await asyncio.to_thread(pool.request_sync, "GET", f"{base}/anything")
        assert r.status_code == 200
        assert_quiet(pool)
    # acme's requests and the anonymous ones never shared a connection.
    assert plain.stats("api").mixed_connections() == {}
