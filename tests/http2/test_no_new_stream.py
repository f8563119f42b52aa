"""The pool's `NoNewStream` retry, forced deterministically on both drivers.

A request picks its tenant's HTTP/2 connection while it has room; before the request opens
its stream there, the connection stops taking new ones:

- ``stream_taken``: another request of the tenant took the connection's last stream (the
  server allows one per connection);
- ``goaway``: the server sent GOAWAY on it (another request carried the test bed's ``goaway``
  fault, was refused and went to a new connection).

Nothing of the request was sent, so the pool sends it on another connection whatever its
body: here a one-shot generator, which must be read exactly once and reach the server once.
The hook sits in the pool's request path (`toolpool._async.h2.connection` /
`toolpool._sync.h2.connection`, which the generated `send` calls by name): it lets the
request pick its connection, then runs the other request to the point where the connection
can take no new stream, and only then lets the request go on. No sleeps, no timing luck.
What the pool counts is checked against what the test bed counted, and the OpenTelemetry
span of the request shows one resend with the reason ``no_new_stream``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import toolpool
import toolpool.otel
from tests._support.otel_spans import client_spans
from toolpool import _h2io
from toolpool._async import h2 as async_h2
from toolpool._sync import h2 as sync_h2
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(90)
PARTS = [b"part-one;", b"part-two;", b"part-three"]
TENANT = {"x-tenant": "acme"}


@pytest.fixture
def ds() -> Iterator[Downstream]:
    # One stream per connection: a connection with a request on it takes no other.
    spec = ServiceSpec(require_auth=False, max_concurrent_streams=1)
    with Downstream({"api": spec}, tls=True) as downstream:
        yield downstream


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> tuple[TracerProvider, InMemorySpanExporter]:
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)  # the Makefile disables the SDK
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _pool(ds: Downstream, provider: TracerProvider) -> toolpool.Pool:
    # No resilience policy: nothing may hide a failure of the pool's own retry.
    pool = toolpool.Pool(
        [toolpool.Destination("api", ds.url("api"), max_connections=4, warmup=0.0)],
        verify=ds.client_ssl_context(),
        http2=True,
        policy=None,
    )
    toolpool.otel.instrument(pool, tracer_provider=provider, metrics=False)
    return pool


def _other_request(ds: Downstream, cause: str) -> tuple[str, dict[str, str]]:
    """What the other request asks: a stream it keeps open (its body is read only at the
    end), or, meeting the test bed's GOAWAY fault (armed for one request), nothing: the
    server refuses it and goes away, and it is answered on a new connection."""
    if cause == "stream_taken":
        return ds.url("api") + "/stream?chunks=2&size=100", TENANT
    ds.set_fault("api", "goaway", count=1)
    return ds.url("api") + "/anything", TENANT


def _check(ds: Downstream, pool_stats: Any, exporter: InMemorySpanExporter, cause: str) -> None:
    served = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert served.connections_accepted == 2  # the request went to a second connection
    assert served.mixed_connections() == {}
    # The first request, the other one (and its resend on the new connection after the
    # GOAWAY), and ours once: no stream of ours on the first connection.
    assert served.streams_total == (3 if cause == "stream_taken" else 4)
    assert served.faults_fired == ({} if cause == "stream_taken" else {"goaway": 1})
    assert pool_stats.http2_connections_opened == served.connections_accepted
    assert pool_stats.http2_streams_total == served.streams_total
    assert pool_stats.http2_streams_reset_total == 0
    assert pool_stats.in_use == 0
    (post,) = [
        s
        for s in client_spans(exporter.get_finished_spans())
        if (s.attributes or {}).get("http.request.method") == "POST"
    ]
    attrs = post.attributes or {}
    assert attrs["http.request.resend_count"] == 1
    assert attrs["http.response.status_code"] == 200
    (event,) = [e for e in post.events if e.name == "toolpool.resend"]
    assert (event.attributes or {})["toolpool.resend.reason"] == "no_new_stream"


@pytest.mark.parametrize("cause", ["stream_taken", "goaway"])
async def test_no_new_stream_goes_to_another_connection_body_sent_once_asyncio(
    ds: Downstream,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
    cause: str,
) -> None:
    provider, exporter = spans
    original = async_h2.connection
    armed = [True]
    picked: list[_h2io.AsyncH2Connection] = []
    other: list[httpx.Response] = []
    read = []

    async def body() -> AsyncIterator[bytes]:
        for part in PARTS:
            read.append(part)
            yield part

    async with _pool(ds, provider) as pool:
        client = pool.client()

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            conn, fresh, pending = await original(*args, **kwargs)
            if armed:  # our request (the first call once armed): it picked `conn`
                armed.clear()
                assert conn.is_available
                picked.append(conn)
                url, headers = _other_request(ds, cause)
                # Same tenant (the auth context is inherited), so the same connection.
                response = await client.send(
                    client.build_request("GET", url, headers=headers), stream=True
                )
                if cause == "goaway":
                    await response.aread()  # refused here, answered on a new connection
                other.append(response)
                assert not conn.is_available  # our request can no longer open a stream
            return conn, fresh, pending

        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            first = await client.get(ds.url("api") + "/anything", headers=TENANT)
            assert first.status_code == 200
            monkeypatch.setattr(async_h2, "connection", hooked)
            async with asyncio.timeout(30):
                response = await client.post(
                    ds.url("api") + "/echo", content=body(), headers=TENANT
                )
            monkeypatch.setattr(async_h2, "connection", original)
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        assert response.json()["body"] == b"".join(PARTS).decode()
        assert read == PARTS  # the one-shot body was read once
        assert response.json()["connection_id"] != first.json()["connection_id"]
        (taker,) = other
        await taker.aread()
        assert taker.status_code == 200
        stats = pool.stats()["api"]
    assert len(picked) == 1
    _check(ds, stats, exporter, cause)


@pytest.mark.parametrize("cause", ["stream_taken", "goaway"])
def test_no_new_stream_goes_to_another_connection_body_sent_once_threads(
    ds: Downstream,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    monkeypatch: pytest.MonkeyPatch,
    cause: str,
) -> None:
    provider, exporter = spans
    original = sync_h2.connection
    armed = [True]
    picked: list[_h2io.SyncH2Connection] = []
    other: list[httpx.Response] = []
    read = []

    def body() -> Iterator[bytes]:
        for part in PARTS:
            read.append(part)
            yield part

    with _pool(ds, provider) as pool, concurrent.futures.ThreadPoolExecutor(1) as executor:
        client = pool.sync_client()

        def take(url: str, headers: dict[str, str]) -> httpx.Response:
            # Another thread, same tenant: the same connection.
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                response = client.send(
                    client.build_request("GET", url, headers=headers), stream=True
                )
                if cause == "goaway":
                    response.read()  # refused here, answered on a new connection
                return response

        def hooked(*args: Any, **kwargs: Any) -> Any:
            conn, fresh, pending = original(*args, **kwargs)
            if armed:
                armed.clear()
                assert conn.is_available
                picked.append(conn)
                other.append(executor.submit(take, *_other_request(ds, cause)).result(30))
                assert not conn.is_available
            return conn, fresh, pending

        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            first = client.get(ds.url("api") + "/anything", headers=TENANT)
            assert first.status_code == 200
            monkeypatch.setattr(sync_h2, "connection", hooked)
            response = client.post(ds.url("api") + "/echo", content=body(), headers=TENANT)
            monkeypatch.setattr(sync_h2, "connection", original)
        assert response.status_code == 200 and response.http_version == "HTTP/2"
        assert response.json()["body"] == b"".join(PARTS).decode()
        assert read == PARTS
        assert response.json()["connection_id"] != first.json()["connection_id"]
        (taker,) = other
        taker.read()
        assert taker.status_code == 200
        stats = pool.stats()["api"]
    assert len(picked) == 1
    _check(ds, stats, exporter, cause)
