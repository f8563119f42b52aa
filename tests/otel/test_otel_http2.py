"""What a trace shows of the HTTP/2 path, against the test bed's HTTP/2 servers: the connect
(TCP, TLS with ALPN's choice, the server's SETTINGS), requests multiplexed onto their
context's connection or waiting for it to open, the PING of an idle connection, streams the
server did not process sent again (an event with the reason), a cancelled stream reset while
its connection stays, the fallback to HTTP/1.1, and both drivers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import h2.connection
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import toolpool
import toolpool.otel
from tests._support.h2_raw import ScriptedH2Server, ScriptedStream
from tests._support.otel_spans import (
    check_accounted,
    check_protocol,
    children,
    client_spans,
    tls_children,
)
from toolpool import _h2pool
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(60)
OPEN = ServiceSpec(require_auth=False)


@pytest.fixture
def ds() -> Iterator[Downstream]:
    services = {"api": OPEN, "old": ServiceSpec(require_auth=False, http2=False)}
    with Downstream(services, tls=True) as downstream:
        yield downstream


def _pool(ds: Downstream, tracer_provider: TracerProvider, name: str = "api", **kw: Any) -> Any:
    pool = toolpool.Pool(
        [toolpool.Destination(name, ds.url(name), max_connections=4, warmup=0.0, **kw)],
        verify=ds.client_ssl_context(),
        http2=True,
    )
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    return pool


async def _get(client: httpx.AsyncClient, url: str, tenant: str = "acme") -> httpx.Response:
    with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
        return await client.get(url)


def _in_order(spans: list[ReadableSpan]) -> list[ReadableSpan]:
    return sorted(client_spans(spans), key=lambda s: s.start_time or 0)


def _kids(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted(children(spans, parent), key=lambda s: s.start_time or 0)


async def test_one_connect_for_a_contexts_first_requests_the_others_wait_for_it(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with _pool(ds, tracer_provider) as pool:
        client = pool.client()
        url = ds.url("api") + "/delay?s=0.05"
        first = await asyncio.gather(*(_get(client, url) for _ in range(4)))
        assert {r.http_version for r in first} == {"HTTP/2"}
        again = await asyncio.gather(*(_get(client, url) for _ in range(4)))
        assert {r.status_code for r in again} == {200}
    spans = list(exporter.get_finished_spans())
    check_protocol(spans, http2=True)
    connects = [s for s in spans if s.name == "toolpool.connect"]
    assert len(connects) == 1  # one connection for the context, opened by one request
    assert ds.stats("api").connections_accepted == 1
    requests = _in_order(spans)
    cold, warm = requests[:4], requests[4:]
    opener = [r for r in cold if any(k.name == "toolpool.connect" for k in children(spans, r))]
    assert len(opener) == 1
    waited = [r for r in cold if any(k.name == "toolpool.connect.wait" for k in children(spans, r))]
    # The three others found the connect under way and waited for it (not a connect each).
    assert len(waited) == 3 and opener[0] not in waited
    # For all four the connection is new: none found it ready when it looked.
    assert not [r for r in cold if (r.attributes or {})["toolpool.connection.reused"]]
    for req in waited:
        (wait,) = [k for k in children(spans, req) if k.name == "toolpool.connect.wait"]
        ms = (wait.end_time - wait.start_time) / 1e6  # type: ignore[operator]
        assert abs((wait.attributes or {})["toolpool.wait_ms"] - ms) < 0.01
        check_accounted(spans, req, exact=False)
    # Warm: four streams at once on the one connection, stream ids 9, 11, 13, 15.
    assert sorted((r.attributes or {})["toolpool.http2.stream_id"] for r in warm) == [9, 11, 13, 15]
    assert max((r.attributes or {})["toolpool.http2.streams"] for r in warm) >= 2
    for req in warm:
        assert (req.attributes or {})["toolpool.connection.reused"] is True
        assert not [k for k in children(spans, req) if k.name == "toolpool.connect"]


def _answer(conn: h2.connection.H2Connection, sid: int, stream: ScriptedStream) -> None:
    if stream.request_ended and not stream.answered:
        conn.send_headers(sid, [(b":status", b"200"), (b"content-length", b"0")], end_stream=True)
        stream.answered = True


async def test_the_opening_request_sends_its_stream_before_the_settings_arrive(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A server that sends its SETTINGS only once it has read a request's HEADERS: the
    connect span ends before the opening request's exchange starts, and its
    `toolpool.http2.settings_ms` (handshake to SETTINGS) reaches beyond that start."""
    with ScriptedH2Server(_answer, preface="after_headers") as server:
        pool = toolpool.Pool(
            [toolpool.Destination("s", server.url, max_connections=2, warmup=0.0)],
            verify=server.client_context(),
            http2=True,
        )
        toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
        async with pool:
            async with asyncio.timeout(30):
                response = await _get(pool.client(), server.url + "/x")
        assert (response.status_code, response.http_version) == (200, "HTTP/2")
    spans = list(exporter.get_finished_spans())
    check_protocol(spans, http2=True)
    (request,) = client_spans(spans)
    (connect,) = [k for k in children(spans, request) if k.name == "toolpool.connect"]
    (exchange,) = [k for k in children(spans, request) if k.name == "toolpool.response"]
    (tls,) = tls_children(spans, connect)
    settings_ms = (connect.attributes or {})["toolpool.http2.settings_ms"]
    assert connect.end_time is not None and tls.end_time is not None
    assert exchange.start_time is not None and connect.end_time <= exchange.start_time
    assert exchange.start_time < tls.end_time + settings_ms * 1e6


@pytest.mark.parametrize("kind", ["refused_stream", "goaway"])
async def test_an_unprocessed_stream_is_a_resend_event_with_its_reason(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter, kind: str
) -> None:
    async with _pool(ds, tracer_provider) as pool:
        client = pool.client()
        url = ds.url("api") + "/anything"
        assert (await _get(client, url)).status_code == 200
        ds.set_fault("api", kind, count=1)  # type: ignore[arg-type]
        assert (await _get(client, url)).status_code == 200
    spans = list(exporter.get_finished_spans())
    check_protocol(spans, http2=True)
    _, resent = _in_order(spans)
    attrs = resent.attributes or {}
    assert attrs["http.request.resend_count"] == 1
    assert attrs["toolpool.connection.reused"] is False  # sent again on a new connection
    (event,) = resent.events
    assert event.name == "toolpool.resend"
    assert (event.attributes or {})["toolpool.resend.reason"] == kind
    names = [k.name for k in _kids(spans, resent)]
    assert names == ["toolpool.response", "toolpool.connect", "toolpool.response"], names
    refused, _, answered = _kids(spans, resent)
    assert refused.status.status_code.name == "ERROR"
    assert (refused.attributes or {})["error.type"] == "toolpool._h2.StreamNotProcessed"
    assert (answered.attributes or {})["http.response.status_code"] == 200
    assert resent.events[0].timestamp >= refused.end_time  # type: ignore[operator]
    check_accounted(spans, resent, exact=False)


async def test_a_cancelled_stream_is_reset_and_the_connection_kept(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with _pool(ds, tracer_provider) as pool:
        client = pool.client()
        assert (await _get(client, ds.url("api") + "/anything")).status_code == 200
        task = asyncio.ensure_future(_get(client, ds.url("api") + "/hang"))
        await ds.wait_stats_async("api", lambda s: s.requests_in_progress == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await ds.wait_stats_async("api", lambda s: s.streams_reset_by_client == 1)
        after = await _get(client, ds.url("api") + "/anything")
        assert after.status_code == 200
    spans = list(exporter.get_finished_spans())
    _, cancelled, later = _in_order(spans)
    assert (cancelled.attributes or {})["error.type"] == "asyncio.exceptions.CancelledError"
    assert (cancelled.attributes or {})["network.protocol.version"] == "2"
    (exchange,) = [k for k in children(spans, cancelled) if k.name == "toolpool.response"]
    assert exchange.status.status_code.name == "ERROR"
    (reset,) = exchange.events
    assert reset.name == "toolpool.stream.reset"
    assert (reset.attributes or {})["toolpool.http2.error_code"] == "CANCEL"
    # The connection stayed: the next request reused it without a connect.
    assert (later.attributes or {})["toolpool.connection.reused"] is True
    assert not children(spans, later)
    assert ds.stats("api").connections_accepted == 1


async def test_an_idle_connection_is_pinged_in_the_trace_and_a_silent_one_replaced(
    ds: Downstream,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_h2pool, "BORROW_CHECK_AFTER", 0.0)  # PING on every borrow
    monkeypatch.setattr(_h2pool, "PING_TIMEOUT", 0.3)
    async with _pool(ds, tracer_provider) as pool:
        client = pool.client()
        url = ds.url("api") + "/anything"
        assert (await _get(client, url)).status_code == 200
        assert (await _get(client, url)).status_code == 200
        ds.set_fault("api", "silent", count=1)
        assert (await _get(client, url)).status_code == 200
    spans = list(exporter.get_finished_spans())
    _, pinged, replaced = _in_order(spans)
    ping, exchange = _kids(spans, pinged)
    assert (ping.name, exchange.name) == ("toolpool.ping", "toolpool.response")
    assert ping.end_time <= exchange.start_time  # type: ignore[operator]
    assert (ping.attributes or {})["toolpool.ping.answered"] is True
    names = [k.name for k in _kids(spans, replaced)]
    assert names == ["toolpool.ping", "toolpool.connect", "toolpool.response"], names
    dead = _kids(spans, replaced)[0]
    assert (dead.attributes or {})["toolpool.ping.answered"] is False
    assert dead.status.status_code.name == "ERROR"
    assert (dead.end_time - dead.start_time) / 1e9 >= 0.29  # type: ignore[operator]
    assert (replaced.attributes or {})["toolpool.connection.reused"] is False
    check_accounted(spans, replaced, exact=False)


async def test_a_server_picking_http11_shows_both_connects_and_no_retry(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async with _pool(ds, tracer_provider, "old") as pool:
        response = await _get(pool.client(), ds.url("old") + "/anything")
        assert response.http_version == "HTTP/1.1"
    spans = list(exporter.get_finished_spans())
    (request,) = client_spans(spans)
    attrs = request.attributes or {}
    assert attrs["network.protocol.version"] == "1.1"
    assert "http.request.resend_count" not in attrs  # one attempt, not a retry
    names = [k.name for k in _kids(spans, request)]
    assert names == ["toolpool.connect", "toolpool.connect", "toolpool.response"], names
    offered, used = _kids(spans, request)[:2]
    # The first connect offered h2 and the server chose http/1.1; that connection is closed
    # and the HTTP/1.1 driver opens its own.
    (alpn,) = tls_children(spans, offered)
    assert (alpn.attributes or {})["tls.next_protocol"] == "http/1.1"
    assert (offered.attributes or {})["network.protocol.version"] == "1.1"
    assert (used.attributes or {})["network.protocol.version"] == "1.1"
    assert len(tls_children(spans, used)) == 1
    assert ds.stats("old").connections_accepted == 2


async def test_a_request_body_held_by_flow_control_says_when_it_was_sent(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    body = b"x" * (1024 * 1024)  # far beyond the 64 KiB initial window: flow-controlled
    async with _pool(ds, tracer_provider) as pool:
        client = pool.client()
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            warm = await client.get(ds.url("api") + "/anything")
            assert warm.status_code == 200
            posted = await client.post(ds.url("api") + "/echo", content=body)
        assert posted.status_code == 200 and len(posted.content) >= len(body)
    spans = list(exporter.get_finished_spans())
    _, post = _in_order(spans)
    # A warm request that is only an exchange: the event sits on the request span itself.
    assert not children(spans, post)
    (sent,) = [e for e in post.events if e.name == "toolpool.request.sent"]
    assert post.start_time < sent.timestamp <= post.end_time  # type: ignore[operator]
    # GETs have no body: no such event.
    assert not [e for s in spans for e in s.events if e.name == "toolpool.request.sent"][1:]


def test_the_thread_driver_traces_the_same_spans(
    ds: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    pool = _pool(ds, tracer_provider)

    def call(i: int) -> int:
        with toolpool.auth_context(toolpool.AuthContext(tenant=f"t{i % 2}")):
            return client.get(ds.url("api") + "/delay?s=0.02").status_code

    with pool, pool.sync_client() as client, ThreadPoolExecutor(8) as ex:
        assert set(ex.map(call, range(24))) == {200}
    spans = list(exporter.get_finished_spans())
    assert len(client_spans(spans)) == 24
    check_protocol(spans, http2=True)
    # One connection per tenant; the cap (4 streams) made the others queue for a permit.
    assert len([s for s in spans if s.name == "toolpool.connect"]) == 2
    assert ds.stats("api").connections_accepted == 2
    waits = [s for s in spans if s.name == "toolpool.pool.wait"]
    assert len(waits) == pool.stats()["api"].queued_total > 0
    for req in client_spans(spans):
        check_accounted(spans, req, exact=False)


async def test_a_failed_http2_connect_is_an_error_span(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"https://127.0.0.1:{port}"
    pool = toolpool.Pool([toolpool.Destination("gone", url, warmup=0.0)], http2=True, policy=None)
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    async with pool:
        with pytest.raises(httpx.ConnectError):
            await pool.client().get(url + "/anything")
    spans = list(exporter.get_finished_spans())
    (request,) = client_spans(spans)
    assert request.status.status_code.name == "ERROR"
    (connect,) = children(spans, request)
    assert connect.name == "toolpool.connect"
    assert connect.status.status_code.name == "ERROR"
    assert (connect.attributes or {})["error.type"] == "httpx.ConnectError"
    assert "network.protocol.version" not in (connect.attributes or {})  # nothing negotiated
    assert not tls_children(spans, connect)  # TCP failed: no handshake began
