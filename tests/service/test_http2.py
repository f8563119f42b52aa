"""The pool service's downstream side on HTTP/2 (issue 18): the service's own pool speaks h2 to
TLS downstreams that offer it, one multiplexed connection per (destination, tenant), the cap
counted in streams at the downstream; `[pool] http2` and `[destinations.NAME] http2` choose;
`/metrics` says which protocol each destination speaks. Evidence is the test bed's own
counters (protocol, tenants and streams per connection), not the pool's view of itself."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

import toolpool
from tests._support.packet_spy import PacketSpy
from tests._support.pool_service import (
    AGENT_B_TOKEN,
    SERVICE_ENV,
    CountingRelay,
    ServiceProcess,
    ServiceThread,
    service_config,
    wait_ready,
    write_config,
)
from toolpool.service import PoolService, ServiceConfig, load_config
from toolpool.testing import Downstream, HostMap, ServiceSpec

B = {"Authorization": f"Bearer {AGENT_B_TOKEN}"}


@pytest.fixture
def tls_ds() -> Iterator[Downstream]:
    """crm (OAuth per tenant) and search (open, tenant forwarded as X-Tenant), on TLS
    offering h2 and http/1.1 by ALPN (the test bed's default for TLS services)."""
    services = {
        "crm": ServiceSpec(token_latency=0.0),
        "search": ServiceSpec(require_auth=False),
    }
    with Downstream(services, tls=True) as ds:
        for tenant in ("acme", "globex"):
            ds.register_client(
                "crm",
                client_id=f"{tenant}-app",
                client_secret=f"{tenant}-downstream-secret",
                tenant=tenant,
            )
        yield ds


def _config(ds: Downstream, http2: bool | None, **kwargs: str | int) -> str:
    pool = f'verify = "{ds.ca_pem_path}"'
    if http2 is not None:
        pool += f"\nhttp2 = {str(http2).lower()}"
    return service_config(ds, pool=pool, **kwargs)  # type: ignore[arg-type]


def _protocols(metrics: str) -> dict[str, str]:
    """destination -> the protocol `/metrics` says it speaks."""
    out = {}
    for family in text_string_to_metric_families(metrics):
        if family.name == "toolpool_destination_protocol":
            for sample in family.samples:
                if sample.value == 1.0:
                    out[sample.labels["destination"]] = sample.labels["protocol"]
    return out


def _gauge(metrics: str, name: str, destination: str) -> float:
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("destination") == destination:
                return sample.value
    raise AssertionError(f"{name}{{destination={destination!r}}} not in /metrics")


def _spoken(ds: Downstream, name: str) -> set[str]:
    """The protocols the downstream's connections of service `name` spoke."""
    return set(ds.stats(name).connection_protocols.values())


async def test_one_http2_connection_per_tenant_and_the_cap_counted_in_streams(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """Two tenants, 8 concurrent slow requests each, through the service (cap 4 on search):
    the downstream sees exactly one h2 connection per tenant, each carrying only its tenant,
    and never more than 4 streams open across them, which it does reach (4 streams on 2
    connections: the cap counts requests, not connections)."""
    text = _config(tls_ds, True, search_cap=4, search_extra="queue_factor = 10")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        async with toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN) as remote:
            client = remote.client()

            async def burst(tenant: str) -> list[httpx.Response]:
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    search = [client.get(tls_ds.url("search") + "/delay?s=0.5") for _ in range(8)]
                    crm = [client.get(tls_ds.url("crm") + "/anything") for _ in range(3)]
                    return list(await asyncio.gather(*search, *crm))

            acme, globex = await asyncio.wait_for(
                asyncio.gather(burst("acme"), burst("globex")), 60
            )
        metrics = httpx.get(svc.url + "/metrics").text
    for tenant, responses in (("acme", acme), ("globex", globex)):
        assert [r.status_code for r in responses] == [200] * 11
        bodies = [r.json() for r in responses]
        # The service's tenant header became the auth context, then the h2 connection.
        assert {b["tenant"] for b in bodies} == {tenant}
        assert len({b["connection_id"] for b in bodies[:8]}) == 1  # one search connection
        assert len({b["connection_id"] for b in bodies[8:]}) == 1  # one crm connection
        assert {b["client_id"] for b in bodies[8:]} == {f"{tenant}-app"}
    search = tls_ds.stats("search")
    assert set(search.connection_protocols.values()) == {"h2"}
    assert search.connection_tenants == {
        acme[0].json()["connection_id"]: frozenset({"acme"}),
        globex[0].json()["connection_id"]: frozenset({"globex"}),
    }
    assert search.streams_total == 16
    assert search.peak_streams_open == 4
    crm = tls_ds.stats("crm")
    assert set(crm.connection_protocols.values()) == {"h2"}
    assert crm.mixed_connections() == {}
    assert crm.token_requests_by_tenant == {"acme": 1, "globex": 1}
    # The service's metrics say what the downstream saw.
    assert _protocols(metrics) == {"crm": "h2", "search": "h2"}
    assert _gauge(metrics, "toolpool_http2_connections", "search") == 2.0
    assert _gauge(metrics, "toolpool_http2_streams_in_use", "search") == 0.0


@pytest.mark.parametrize(
    ("pool_http2", "search_http2", "expected"),
    [
        (True, False, {"crm": "h2", "search": "http/1.1"}),
        (False, True, {"crm": "http/1.1", "search": "h2"}),
    ],
)
def test_the_http2_keys_of_pool_and_destination_in_the_real_service_process(
    tls_ds: Downstream,
    tmp_path: Path,
    pool_http2: bool,
    search_http2: bool,
    expected: dict[str, str],
) -> None:
    """`toolpool serve` as a child process: `[pool] http2` is the default, a destination's
    own `http2` overrides it; the downstream speaks what `/metrics` says."""
    text = _config(tls_ds, pool_http2, search_extra=f"http2 = {str(search_http2).lower()}")
    with ServiceProcess(write_config(tmp_path, text)) as svc:
        with httpx.Client(timeout=30, headers={**B, "X-Toolpool-Tenant": "acme"}) as client:
            for dest in ("crm", "search", "crm", "search"):
                r = client.get(f"{svc.url}/d/{dest}/anything")
                assert r.status_code == 200, r.text
                assert r.json()["tenant"] == "acme"
            metrics = client.get(svc.url + "/metrics").text
        assert svc.terminate() == 0
    assert _protocols(metrics) == expected
    for dest, protocol in expected.items():
        assert _spoken(tls_ds, dest) == {protocol}
        assert tls_ds.stats(dest).mixed_connections() == {}


async def test_bodies_stream_both_ways_over_http2_with_flow_control(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """A 600 KB chunked upload and a 900 KB download (both beyond HTTP/2's 64 KiB initial
    windows) pass through the service to and from an h2 downstream intact."""
    text = _config(tls_ds, True)
    size = 600_000
    with ServiceThread(write_config(tmp_path, text)) as svc:
        async with httpx.AsyncClient(timeout=30, headers={**B, "X-Toolpool-Tenant": "acme"}) as c:

            async def upload() -> AsyncIterator[bytes]:
                for i in range(size // 10_000):
                    yield bytes([i % 256]) * 10_000

            up = await c.post(svc.url + "/d/search/anything", content=upload())
            down = await c.get(svc.url + "/d/search/bytes?n=900000")
    assert up.status_code == 200 and up.json()["body_size"] == size
    assert down.status_code == 200
    assert down.content == bytes(range(256)) * (900_000 // 256) + bytes(range(900_000 % 256))
    assert _spoken(tls_ds, "search") == {"h2"}
    assert tls_ds.stats("search").streams_total == 2


async def test_an_agent_that_goes_away_resets_its_stream_not_the_connection(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """The agent drops a streaming answer after its first chunk: the service cancels the
    downstream stream (RST_STREAM), keeps the tenant's h2 connection, and gives the stream
    permit back (the next request of the tenant goes on the same connection)."""
    text = _config(tls_ds, True, search_cap=1)
    headers = {**B, "X-Toolpool-Tenant": "acme"}
    with ServiceThread(write_config(tmp_path, text)) as svc:
        async with httpx.AsyncClient(timeout=30, headers=headers) as c:
            url = svc.url + "/d/search/stream?chunks=200&size=1000&delay=0.05"
            async with c.stream("GET", url) as r:
                first = r.headers["x-connection-id"]
                async for _ in r.aiter_raw():
                    break
            # The service learns of it at its next write, then resets the stream.
            await tls_ds.wait_stats_async(
                "search", lambda s: s.streams_reset_by_client >= 1, timeout=30
            )
        # With cap 1, this request needs the permit back.
        async with httpx.AsyncClient(timeout=30, headers=headers) as c:
            again = await c.get(svc.url + "/d/search/anything")
        stats = svc.call(_pool_stats(svc))
    assert again.status_code == 200
    assert str(again.json()["connection_id"]) == first
    search = tls_ds.stats("search")
    assert search.connections_accepted == 1 and search.streams_reset_by_client == 1
    assert (stats.in_use, stats.waiting, stats.protocol) == (0, 0, "h2")


async def _pool_stats(svc: ServiceThread) -> toolpool.DestinationStats:
    pool = svc.app.pool
    assert pool is not None
    return pool.stats()["search"]


# -- hierarchical pools: a local tier on HTTP/2 overflowing to the service ----------------------


def _tier(r: httpx.Response) -> str:
    return str(r.extensions["toolpool"].get("tier", "local"))


async def test_an_http2_local_tier_overflows_to_the_service_and_counts_streams(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """A burst of 40 from one tenant: the local tier (3 streams on one h2 connection) serves
    what it can, the rest goes to the service (its own h2 connection for the tenant, cap 10).
    The downstream tells the tiers apart by the tenant: the local tier sends none (the
    destination is open), the service forwards it as X-Tenant."""
    text = _config(tls_ds, True, search_cap=10, search_extra="queue_factor = 10")
    url = tls_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        pool = toolpool.Pool(
            [toolpool.Destination("search", url, verify=tls_ds.ca_pem_path)],
            local_max_connections=3,
            overflow=remote,
            http2=True,
            warmup=0,
        )
        async with pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                responses = await asyncio.wait_for(
                    asyncio.gather(*[pool.client().get(url + "/delay?s=0.3") for _ in range(40)]),
                    60,
                )
            local = pool.stats()["search"]
    assert [r.status_code for r in responses] == [200] * 40
    tiers = [_tier(r) for r in responses]
    split = remote.overflow_stats()["search"]
    assert split.local_total == tiers.count("local")
    assert split.overflow_total == tiers.count("service")
    assert split.local_total >= 3 and split.overflow_total >= 30 and split.overflow_in_flight == 0
    assert local.protocol == "h2" and local.queued_total == 0
    stats = tls_ds.stats("search")
    assert set(stats.connection_protocols.values()) == {"h2"}
    by_tier: dict[str | None, list[int]] = {}
    for cid, tenants in stats.connection_tenants.items():
        (tenant,) = tenants
        by_tier.setdefault(tenant, []).append(cid)
    # One connection per tier: the local tier's (no tenant) and the service's (acme).
    assert {t: len(c) for t, c in by_tier.items()} == {None: 1, "acme": 1}
    assert stats.peak_connection_streams[by_tier[None][0]] == 3  # the local cap, in streams
    assert stats.peak_connection_streams[by_tier["acme"][0]] <= 10  # the service's cap
    assert stats.connection_streams[by_tier[None][0]] == split.local_total
    assert stats.connection_streams[by_tier["acme"][0]] == split.overflow_total


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
async def test_a_new_tenant_takes_the_idle_local_capacity_on_http2_only(
    tls_ds: Downstream, tmp_path: Path, http2: bool
) -> None:
    """acme leaves 3 idle slots on the local tier (cap 3), then globex sends 3 at once. On
    HTTP/2 an idle slot is a stream permit, free capacity: globex is served locally on its
    own connection, and acme's connection stays open (no churn). On HTTP/1.1 an idle slot is
    acme's connection, which the local tier does not close for another tenant's burst:
    globex's requests go to the service."""
    text = _config(tls_ds, http2, search_cap=10)
    url = tls_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        pool = toolpool.Pool(
            [toolpool.Destination("search", url, verify=tls_ds.ca_pem_path)],
            local_max_connections=3,
            overflow=remote,
            http2=http2,
            warmup=0,
        )
        async with pool:
            client = pool.client()

            async def burst(tenant: str) -> list[httpx.Response]:
                # X-Tenant tells the downstream whose request the local tier sent.
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    calls = [
                        client.get(url + "/delay?s=0.2", headers={"X-Tenant": tenant})
                        for _ in range(3)
                    ]
                    return list(await asyncio.wait_for(asyncio.gather(*calls), 60))

            acme = await burst("acme")
            assert [_tier(r) for r in acme] == ["local"] * 3
            assert pool.stats()["search"].idle == 3
            globex = await burst("globex")
            open_now = tls_ds.stats("search").connections_open
    assert [r.status_code for r in acme + globex] == [200] * 6
    stats = tls_ds.stats("search")
    assert stats.mixed_connections() == {}
    if http2:
        assert [_tier(r) for r in globex] == ["local"] * 3
        assert remote.overflow_stats()["search"].overflow_total == 0
        # One h2 connection per tenant, both still open when globex was done.
        assert sorted(stats.connection_tenants.values(), key=sorted) == [
            frozenset({"acme"}),
            frozenset({"globex"}),
        ]
        assert open_now == 2
    else:
        assert [_tier(r) for r in globex] == ["service"] * 3
        assert remote.overflow_stats()["search"].overflow_total == 3


# -- the agent's hop to the service on HTTP/2 ---------------------------------------------------


class HypercornService:
    """`PoolService` under hypercorn (an ASGI server that speaks HTTP/2 by ALPN) with TLS on
    127.0.0.1, on a thread: the service app unchanged, served over h2."""

    def __init__(self, config_path: Path, cert: Path, key: Path, ca: Path) -> None:
        from hypercorn.config import Config

        self.app = PoolService(load_config(config_path, env=SERVICE_ENV))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self.config = Config()
        self.config.bind = [f"fd://{self.sock.detach()}"]  # hypercorn owns (and closes) it
        self.config.certfile, self.config.keyfile = str(cert), str(key)
        self.config.loglevel = "WARNING"
        self.ca = ssl.create_default_context(cafile=str(ca))
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    async def _serve(self) -> None:
        from hypercorn.asyncio import serve

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        await serve(self.app, self.config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]

    def __enter__(self) -> HypercornService:
        self._thread.start()
        wait_ready(self.url, verify=self.ca)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(20)
        assert not self._thread.is_alive(), "hypercorn did not stop"


def _service_cert(tmp_path: Path) -> tuple[Path, Path, Path]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = tmp_path / "svc.crt", tmp_path / "svc.key", tmp_path / "svc-ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    return paths


async def _tenants_burst(remote: toolpool.RemotePool, url: str) -> list[httpx.Response]:
    client = remote.client()

    async def one(tenant: str) -> httpx.Response:
        with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
            return await client.get(url + "/delay?s=0.3")

    calls = [one(t) for t in ("acme", "globex") for _ in range(10)]
    return list(await asyncio.wait_for(asyncio.gather(*calls), 60))


async def test_the_hop_to_an_http2_service_is_one_connection_for_every_tenant(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """`RemotePool(http2=True)` to the service app served over h2: 20 concurrent requests of
    two tenants share one TCP connection to the service (counted by a relay in front of
    it), while the service still keeps one downstream connection per tenant."""
    cert, key, ca = _service_cert(tmp_path)
    text = _config(tls_ds, True, search_cap=20, search_extra="queue_factor = 10")
    with HypercornService(write_config(tmp_path, text), cert, key, ca) as svc:
        with CountingRelay(svc.port) as relay:
            url = f"https://127.0.0.1:{relay.port}"
            async with toolpool.RemotePool(
                url, token=AGENT_B_TOKEN, verify=str(ca), http2=True
            ) as remote:
                responses = await _tenants_burst(remote, tls_ds.url("search"))
            hop = (relay.accepted, relay.peak)
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.json()["tenant"] for r in responses] == ["acme"] * 10 + ["globex"] * 10
    assert hop == (1, 1)
    search = tls_ds.stats("search")
    assert set(search.connection_protocols.values()) == {"h2"}
    assert sorted(search.connection_tenants.values(), key=sorted) == [
        frozenset({"acme"}),
        frozenset({"globex"}),
    ]


async def test_the_hop_offering_http2_to_toolpool_serve_falls_back_to_http11(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """`toolpool serve` (uvicorn) speaks HTTP/1.1 only: `RemotePool(http2=True)` learns it by
    ALPN on its first connect and sends everything over HTTP/1.1 (concurrent requests on
    as many connections)."""
    cert, key, ca = _service_cert(tmp_path)
    text = _config(
        tls_ds,
        True,
        search_cap=20,
        search_extra="queue_factor = 10",
        service=f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"',
    )
    svc = ServiceThread(write_config(tmp_path, text))
    svc.verify = ssl.create_default_context(cafile=str(ca))
    with svc, CountingRelay(svc.port) as relay:
        url = f"https://127.0.0.1:{relay.port}"
        async with toolpool.RemotePool(url, token=AGENT_B_TOKEN, verify=str(ca), http2=True) as r:
            responses = await _tenants_burst(r, tls_ds.url("search"))
        hop = relay.accepted
    assert [r.status_code for r in responses] == [200] * 20
    assert [r.json()["tenant"] for r in responses] == ["acme"] * 10 + ["globex"] * 10
    assert hop > 1  # HTTP/1.1: one request per connection at a time


def test_threads_on_an_http2_local_tier_take_idle_capacity_too(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """The thread driver, same rule: acme's 3 idle stream permits go to globex's 3 threads,
    which are served locally on globex's own connection; acme's connection stays open."""
    text = _config(tls_ds, True, search_cap=10)
    url = tls_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        with toolpool.Pool(
            [toolpool.Destination("search", url, verify=tls_ds.ca_pem_path)],
            local_max_connections=3,
            overflow=remote,
            http2=True,
            warmup=0,
        ) as pool:
            client = pool.sync_client()

            def burst(tenant: str) -> list[httpx.Response]:
                start = threading.Barrier(3)

                def call(_: int) -> httpx.Response:
                    start.wait(timeout=30)
                    with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                        return client.get(url + "/delay?s=0.2", headers={"X-Tenant": tenant})

                with ThreadPoolExecutor(3) as ex:
                    return list(ex.map(call, range(3)))

            acme = burst("acme")
            assert pool.stats()["search"].idle == 3
            globex = burst("globex")
            open_now = tls_ds.stats("search").connections_open
    assert [_tier(r) for r in acme + globex] == ["local"] * 6
    assert remote.overflow_stats()["search"].overflow_total == 0
    stats = tls_ds.stats("search")
    assert sorted(stats.connection_tenants.values(), key=sorted) == [
        frozenset({"acme"}),
        frozenset({"globex"}),
    ]
    assert open_now == 2


def _overflow_pool(ds: Downstream, remote: toolpool.RemotePool) -> toolpool.Pool:
    return toolpool.Pool(
        [toolpool.Destination("search", ds.url("search"), verify=ds.ca_pem_path)],
        local_max_connections=3,
        overflow=remote,
        http2=True,
        warmup=0,
    )


def _served_once_by_the_service(ds: Downstream, kind: str, response: httpx.Response) -> None:
    """The downstream processed the request once, sent by the service (tenant forwarded as
    X-Tenant); the local tier's two tries were refused unprocessed."""
    assert response.status_code == 200 and _tier(response) == "service"
    assert response.json()["tenant"] == "acme"
    assert response.json()["body"] == "refused twice, then sent by the service"
    stats = ds.wait_stats("search", lambda s: s.streams_open == 0)
    assert stats.faults_fired == {kind: 2}
    assert stats.responses_by_status == {200: 1}
    assert set(stats.connection_protocols.values()) == {"h2"}
    assert stats.mixed_connections() == {}


@pytest.mark.parametrize("kind", ["refused_stream", "goaway"])
async def test_a_local_request_the_server_refused_twice_overflows_to_the_service(
    tls_ds: Downstream, tmp_path: Path, kind: str
) -> None:
    """The local tier's HTTP/2 server does not process a request (REFUSED_STREAM, or GOAWAY
    naming an earlier stream) on its connection, nor on the second one the pool sends it to:
    nothing was processed downstream, so the service takes it instead of the caller getting
    `StreamNotProcessed`. A POST, which the resilience policy does not retry."""
    text = _config(tls_ds, True, search_cap=10)
    url = tls_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        async with _overflow_pool(tls_ds, remote) as pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                tls_ds.set_fault("search", kind, count=2)  # type: ignore[arg-type]
                response = await asyncio.wait_for(
                    pool.client().post(
                        url + "/echo", content=b"refused twice, then sent by the service"
                    ),
                    60,
                )
            local = pool.stats()["search"]
    _served_once_by_the_service(tls_ds, kind, response)
    split = remote.overflow_stats()["search"]
    assert (split.local_total, split.overflow_total, split.overflow_unprocessed_total) == (0, 1, 1)
    assert split.overflow_in_flight == 0
    assert local.in_use == 0 and local.http2_connections_opened == 2  # both tries local


def test_a_local_request_the_server_refused_twice_overflows_to_the_service_threads(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    text = _config(tls_ds, True, search_cap=10)
    url = tls_ds.url("search")
    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        with _overflow_pool(tls_ds, remote) as pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                tls_ds.set_fault("search", "refused_stream", count=2)
                response = pool.sync_client().post(
                    url + "/echo", content=b"refused twice, then sent by the service"
                )
            local = pool.stats()["search"]
    _served_once_by_the_service(tls_ds, "refused_stream", response)
    split = remote.overflow_stats()["search"]
    assert (split.local_total, split.overflow_total, split.overflow_unprocessed_total) == (0, 1, 1)
    assert local.in_use == 0 and local.http2_connections_opened == 2


async def test_a_refused_one_shot_body_is_not_sent_to_the_service(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """A one-shot body (a generator) refused with REFUSED_STREAM was read while it was sent:
    neither the local tier's second connection nor the service can send it again, so the
    caller gets `StreamNotProcessed` (the server processed nothing; the caller may resend)."""
    text = _config(tls_ds, True, search_cap=10)
    url = tls_ds.url("search")

    async def body() -> AsyncIterator[bytes]:
        yield b"one shot"

    with ServiceThread(write_config(tmp_path, text)) as svc:
        remote = toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN)
        async with _overflow_pool(tls_ds, remote) as pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                tls_ds.set_fault("search", "refused_stream", count=1)
                with pytest.raises(httpx.RemoteProtocolError, match="REFUSED_STREAM") as info:
                    await asyncio.wait_for(pool.client().post(url + "/echo", content=body()), 60)
    assert getattr(info.value, "retry_safe", None) is True
    split = remote.overflow_stats()["search"]
    assert (split.local_total, split.overflow_total, split.overflow_unprocessed_total) == (0, 0, 0)
    stats = tls_ds.stats("search")
    assert stats.faults_fired == {"refused_stream": 1} and stats.responses_by_status == {}


def test_sigterm_drains_a_service_whose_downstream_speaks_http2(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """`toolpool serve` with 12 slow requests of two tenants in flight on h2 streams gets
    SIGTERM: every accepted request is answered 200, then the pool closes its connections."""
    text = _config(tls_ds, True, search_cap=12, service="drain_timeout = 20.0")
    with ServiceProcess(write_config(tmp_path, text)) as svc:

        def call(tenant: str) -> int:
            headers = {**B, "X-Toolpool-Tenant": tenant}
            with httpx.Client(timeout=30) as c:
                return c.get(svc.url + "/d/search/delay?s=1.0", headers=headers).status_code

        with ThreadPoolExecutor(12) as ex:
            futures = [ex.submit(call, t) for t in ("acme", "globex") for _ in range(6)]
            tls_ds.wait_stats("search", lambda s: s.streams_open >= 12, timeout=30)
            code = svc.terminate(60)
            statuses = [f.result(30) for f in futures]
    assert code == 0, "".join(svc.stderr_lines)
    assert statuses == [200] * 12
    report = svc.drained()
    assert report["accepted"] == report["answered"] == 12 and report["aborted"] == 0
    stats = tls_ds.wait_stats("search", lambda s: s.connections_open == 0, timeout=30)
    assert set(stats.connection_protocols.values()) == {"h2"}
    assert len(stats.connection_tenants) == 2 and stats.mixed_connections() == {}


def test_the_http2_connect_keeps_the_egress_policy(tmp_path: Path, spy: PacketSpy) -> None:
    """A tenant's h2 connection to a destination whose name then rebinds to a denied
    address: the next tenant's connect (its own connection) is refused 403 egress_denied,
    and nothing connects to the denied address (the spy records every connect)."""
    names = HostMap({"web.test": "127.0.0.1"})
    with Downstream({"web": ServiceSpec(require_auth=False)}, tls=True) as ds:
        port = ds.address("web")[1]
        text = f"""
[service]
allowed_hosts = ["127.0.0.1"]
[service.egress]
deny = ["127.0.0.2"]
[pool]
warmup = 0.0
policy = "off"
http2 = true
[destinations.web]
url = "https://web.test:{port}"
verify = false   # the test bed's certificate names loopback, not web.test
forward_tenant_as = "X-Tenant"
[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
"""

        def configure(config: ServiceConfig) -> ServiceConfig:
            egress = dataclasses.replace(config.service.egress, resolver=names)
            service = dataclasses.replace(config.service, egress=egress)
            return dataclasses.replace(config, service=service)

        with (
            ServiceThread(write_config(tmp_path, text), configure=configure) as svc,
            httpx.Client(base_url=svc.url, headers=B, timeout=30) as agent,
        ):
            first = spy.snapshot()
            ok = agent.get("/d/web/anything", headers={"X-Toolpool-Tenant": "acme"})
            assert ("127.0.0.1", port) in spy.connects_since(first)  # the spy sees h2 connects
            names.set("web.test", "127.0.0.2")
            mark = spy.snapshot()
            refused = agent.get("/d/web/anything", headers={"X-Toolpool-Tenant": "globex"})
            again = agent.get("/d/web/anything", headers={"X-Toolpool-Tenant": "acme"})
            connects = spy.connects_since(mark)
    assert ok.status_code == 200 and ok.json()["tenant"] == "acme"
    assert refused.status_code == 403 and refused.headers["x-toolpool-error"] == "egress_denied"
    assert refused.json()["rule"] == "deny"
    # acme's connection was made before the rebinding: it still carries acme's requests.
    assert again.status_code == 200 and again.json()["connection_id"] == ok.json()["connection_id"]
    assert not [c for c in connects if c[0] == "127.0.0.2"]
    stats = ds.stats("web")
    assert stats.connection_protocols == {ok.json()["connection_id"]: "h2"}
    assert stats.requests_total == 2


async def test_an_agent_cancelling_its_http2_stream_to_the_service_resets_the_downstream_one(
    tls_ds: Downstream, tmp_path: Path
) -> None:
    """HTTP/2 on both hops: the agent closes a streaming answer early, its RST_STREAM reaches
    the service (the app under hypercorn), which resets the downstream stream in turn; both
    connections stay and carry the tenant's next request."""
    cert, key, ca = _service_cert(tmp_path)
    text = _config(tls_ds, True, search_cap=1)
    with HypercornService(write_config(tmp_path, text), cert, key, ca) as svc:
        async with toolpool.RemotePool(
            svc.url, token=AGENT_B_TOKEN, verify=str(ca), http2=True
        ) as remote:
            client = remote.client()
            url = tls_ds.url("search")
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                async with client.stream(
                    "GET", url + "/stream?chunks=200&size=1000&delay=0.05"
                ) as r:
                    first = r.headers["x-connection-id"]
                    async for _ in r.aiter_raw():
                        break
                await tls_ds.wait_stats_async(
                    "search", lambda s: s.streams_reset_by_client >= 1, timeout=30
                )
                again = await client.get(url + "/anything")  # cap 1: needs the permit back
    assert again.status_code == 200 and str(again.json()["connection_id"]) == first
    stats = tls_ds.stats("search")
    assert stats.connections_accepted == 1 and stats.streams_reset_by_client == 1
    assert stats.responses_by_status == {200: 1}  # the abandoned stream was never finished
