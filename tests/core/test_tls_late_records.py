"""A TLS 1.3 server sends its session tickets after the handshake: they reach a fresh
warm-up (or preconnected) connection while it waits, as TLS records that carry no data. The
stale check before its first reuse must not take them for stray bytes (that cost a second
handshake, and made the pool count a connection created beyond its acquisitions: the flaky
`test_async_tls_storm_metrics_agree_with_server` under load). Data or EOF on an idle
connection still make it stale (tests/core/test_hostile_servers.py)."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator

import pytest

import toolpool
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream({"crm": ServiceSpec(require_auth=False)}, tls=True) as downstream:
        yield downstream


def _pool(ds: Downstream) -> toolpool.Pool:
    ctx = ssl.create_default_context(cafile=ds.ca_pem_path)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # tickets after the handshake
    dest = toolpool.Destination("crm", ds.url("crm"), max_connections=2, warmup=0.5, verify=ctx)
    return toolpool.Pool([dest], http2=False)


def _late_records_arrived(ds: Downstream) -> None:
    # The server's tickets follow its view of the finished handshake by a moment; the
    # caller does not run the event loop meanwhile, so they wait in the socket unread.
    ds.wait_stats("crm", lambda s: s.connections_accepted == 1)
    time.sleep(0.3)


def _check(pool: toolpool.Pool, ds: Downstream) -> None:
    stats = pool.stats()["crm"]
    assert stats.created_total == 1, stats
    assert stats.closed_total["health"] == 0
    assert stats.reused_total == 1  # the warm connection carried the request
    assert ds.stats("crm").connections_accepted == 1


async def test_asyncio_driver_reuses_a_warm_connection_with_tickets_unread(
    ds: Downstream,
) -> None:
    async with _pool(ds) as pool:
        assert pool.stats()["crm"].created_total == 1  # warm-up: one connection
        _late_records_arrived(ds)  # blocks this event loop on purpose
        response = await pool.client().get(ds.url("crm") + "/anything")
        assert response.status_code == 200
        _check(pool, ds)
        # Still a healthy connection: the next request reuses it too.
        assert (await pool.client().get(ds.url("crm") + "/anything")).status_code == 200
        assert pool.stats()["crm"].created_total == 1


def test_thread_driver_reuses_a_warm_connection_with_tickets_unread(ds: Downstream) -> None:
    with _pool(ds) as pool, pool.sync_client() as client:
        assert pool.stats()["crm"].created_total == 1
        _late_records_arrived(ds)
        assert client.get(ds.url("crm") + "/anything").status_code == 200
        _check(pool, ds)
        assert client.get(ds.url("crm") + "/anything").status_code == 200
        assert pool.stats()["crm"].created_total == 1


async def test_a_request_cancelled_while_its_connection_is_checked_releases_it(
    ds: Downstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check of a reused connection awaits (`settled`: the loop reads the TLS records);
    a request cancelled there gave its slot back to nobody, so the pool counted a connection
    in use forever (the randomized affinity storm's `in_use=1` under load in CI).

    Which bytes wait on the socket is the server's timing, so the probe is told to find
    some (then `settled` runs, as for late records), and `settled` is held by an event."""
    from toolpool._async import connection as async_connection
    from toolpool._async import request as async_request

    original = async_request.settled
    entered = asyncio.Event()
    gate = asyncio.Event()  # never set: the request is cancelled inside the check

    async def held(conn: object) -> bool:
        entered.set()
        await gate.wait()
        return await original(conn)

    async with _pool(ds) as pool:
        assert pool.stats()["crm"].idle == 1  # the warm connection: the request reuses it
        monkeypatch.setattr(async_connection.AsyncConnection, "probe", lambda self: False)
        monkeypatch.setattr(async_request, "settled", held)
        task = asyncio.ensure_future(pool.client().get(ds.url("crm") + "/anything"))
        async with asyncio.timeout(30):
            await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = pool.stats()["crm"]
        assert (stats.in_use, stats.opening, stats.waiting) == (0, 0, 0), stats
        monkeypatch.undo()
        assert (await pool.client().get(ds.url("crm") + "/anything")).status_code == 200
        assert pool.stats()["crm"].in_use == 0
