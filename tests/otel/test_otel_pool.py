"""The pool's numbers through OpenTelemetry: wait spans of a storm against `pool.stats()`,
meter instruments against the Prometheus exposition of the same run, and what tracing
adds (redaction, hashed tenants, errors, uninstrument)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import prometheus_client
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import toolpool
import toolpool.metrics
import toolpool.otel
from tests._support.otel_spans import (
    SECRETS,
    check_accounted,
    check_protocol,
    children,
    client_spans,
    oauth_pool,
)
from tests._support.prometheus_samples import Samples
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def plain() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False, service_time=0.01)}) as ds:
        yield ds


def _percentile(ordered: list[float], q: float) -> float:
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _check_waits_match_stats(pool: toolpool.Pool, spans: list[ReadableSpan]) -> int:
    waits = [s for s in spans if s.name == "toolpool.pool.wait"]
    stats = pool.stats()["api"]
    assert stats.queued_total > 10, "the storm did not queue"
    # One wait span per queued request, each as long as the wait the pool recorded.
    assert len(waits) == stats.queued_total
    seconds = [(s.end_time - s.start_time) / 1e9 for s in waits]  # type: ignore[operator]
    for s, sec in zip(waits, seconds, strict=True):
        assert abs((s.attributes or {})["toolpool.wait_ms"] - sec * 1000.0) < 0.001
    assert math.isclose(sum(seconds), stats.wait_sum_seconds, rel_tol=1e-6, abs_tol=1e-6)
    # The rest of the acquisitions were served at once (0 s): together they are the window
    # pool.stats() takes its percentiles from.
    assert stats.wait_count == stats.acquired_total
    everything = sorted(seconds + [0.0] * (stats.acquired_total - len(seconds)))
    assert abs(_percentile(everything, 0.5) - stats.wait_p50_seconds) < 1e-6
    assert abs(_percentile(everything, 0.99) - stats.wait_p99_seconds) < 1e-6
    return len(waits)


@pytest.fixture(scope="module")
def tls() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False, service_time=0.01)}, tls=True) as ds:
        yield ds


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1-plain", "h2"])
async def test_async_storm_wait_spans_match_pool_stats(
    plain: Downstream,
    tls: Downstream,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    http2: bool,
) -> None:
    ds = tls if http2 else plain
    pool = toolpool.Pool(
        [toolpool.Destination("api", ds.url("api"), max_connections=4, queue_factor=20)],
        warmup=0.0,
        verify=ds.client_ssl_context() if http2 else True,
        http2=http2,
    )
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    async with pool:
        client = pool.client()
        responses = await asyncio.gather(
            *(client.get(ds.url("api") + "/anything", params={"i": i}) for i in range(60))
        )
        assert {r.status_code for r in responses} == {200}
    spans = list(exporter.get_finished_spans())
    assert len(client_spans(spans)) == 60
    queued = _check_waits_match_stats(pool, spans)
    # 60 requests on 4 connections (HTTP/2: 4 stream permits on one connection)
    assert queued >= 40
    connects = [s for s in spans if s.name == "toolpool.connect"]
    if http2:
        check_protocol(spans, http2=True)
        assert len(connects) == 1 == pool.stats()["api"].http2_connections_opened
    else:
        assert len(connects) == pool.stats()["api"].created_total
    # (No 5 % accounting here: in a storm, a granted request resumes only when the busy
    # event loop gets to it; that scheduling delay is the one gap the spans leave open.)


def test_thread_storm_wait_spans_match_pool_stats(
    plain: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    pool = toolpool.Pool(
        [toolpool.Destination("api", plain.url("api"), max_connections=3, queue_factor=20)],
        warmup=0.0,
    )
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    with pool, pool.sync_client() as client, ThreadPoolExecutor(12) as ex:
        codes = list(
            ex.map(lambda i: client.get(plain.url("api") + "/anything").status_code, range(48))
        )
    assert set(codes) == {200}
    spans = list(exporter.get_finished_spans())
    assert len(client_spans(spans)) == 48
    _check_waits_match_stats(pool, spans)
    # Plain HTTP: connects without a TLS child; every request's children explain it.
    connects = [s for s in spans if s.name == "toolpool.connect"]
    assert len(connects) == pool.stats()["api"].created_total
    assert not [s for s in spans if s.name == "toolpool.tls"]


# ---------------------------------------------------------------------- metrics


def _otel_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    out: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def _value(points: dict[str, list[Any]], name: str, **attrs: str) -> float:
    found = [p.value for p in points[name] if dict(p.attributes) == attrs]
    assert len(found) == 1, (name, attrs, [dict(p.attributes) for p in points[name]])
    return float(found[0])


_ATTRIBUTE = {
    "state": "db.client.connection.state",
    "close": "toolpool.close.reason",
    "src": "toolpool.acquisition.source",
    "rejection": "toolpool.rejection.reason",
    "auth": "toolpool.auth.reason",
    "egress": "toolpool.egress.rule",
}


def _a(kind: str, value: str) -> dict[str, str]:
    return {_ATTRIBUTE[kind]: value}


def _check_histogram(
    points: dict[str, list[Any]], name: str, prom: Samples, prom_name: str, dest: str
) -> int:
    want = {"db.client.connection.pool.name": dest}
    found = [p for p in points[name] if dict(p.attributes) == want]
    assert len(found) == 1, name
    point = found[0]
    assert point.count == prom.get(prom_name + "_count", destination=dest)
    assert math.isclose(point.sum, prom.get(prom_name + "_sum", destination=dest), rel_tol=1e-9)
    cumulative = prom.buckets(prom_name, destination=dest)
    bounds = sorted(cumulative)
    # Same bounds (advised to the SDK), same counts per bucket.
    assert list(point.explicit_bounds) == bounds[:-1]
    running = 0
    for bound, n in zip(bounds, point.bucket_counts, strict=True):
        running += n
        assert running == cumulative[bound], (name, bound)
    return int(point.count)


@pytest.mark.parametrize("http2", [False, True], ids=["http1.1", "h2"])
async def test_meter_numbers_equal_the_prometheus_exposition(
    metric_reader: tuple[MeterProvider, InMemoryMetricReader], http2: bool
) -> None:
    meter_provider, reader = metric_reader
    spec = ServiceSpec(service_time=0.05, token_latency=0.01)
    async with Downstream({"crm": spec}, tls=True) as ds:
        pool = oauth_pool(ds, max_connections=3, queue_factor=2.0, http2=http2)
        registry = prometheus_client.CollectorRegistry()
        toolpool.metrics.register(pool, registry)
        toolpool.otel.instrument(pool, meter_provider=meter_provider, traces=False)
        url = ds.url("crm") + "/anything"
        async with pool:
            for tenant in ("acme", "globex"):
                with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                    client = pool.client()
                    # 12 at once on 3 connections with a queue of 6: some are refused.
                    got = await asyncio.gather(
                        *(client.get(url) for _ in range(12)), return_exceptions=True
                    )
                    assert any(isinstance(g, httpx.Response) for g in got)
                    assert any(isinstance(g, toolpool.PoolSaturated) for g in got)
                    # A short pool timeout behind busy connections: timeouts.
                    slow = [client.get(url) for _ in range(3)]
                    quick = httpx.Timeout(5.0, pool=0.001)
                    late = [client.get(url, timeout=quick) for _ in range(3)]
                    await asyncio.gather(*slow, *late, return_exceptions=True)
            prom = Samples(toolpool.metrics.exposition(registry))
            points = _otel_points(reader)
    d = "crm"
    pool_attr = {"db.client.connection.pool.name": d}
    for state in ("idle", "used", "opening", "closing"):
        count = _value(points, "db.client.connection.count", **pool_attr, **_a("state", state))
        assert count == prom.get("toolpool_connections", destination=d, state=state)
    assert _value(points, "db.client.connection.max", **pool_attr) == prom.get(
        "toolpool_connections_max", destination=d
    )
    assert _value(points, "db.client.connection.pending_requests", **pool_attr) == prom.get(
        "toolpool_pending_requests", destination=d
    )
    assert _value(points, "toolpool.connection.limit", **pool_attr) == prom.get(
        "toolpool_connections_limit", destination=d
    )
    assert _value(points, "toolpool.connection.pending_requests.max", **pool_attr) == prom.get(
        "toolpool_pending_requests_max", destination=d
    )
    timeouts = _value(points, "db.client.connection.timeouts", **pool_attr)
    assert timeouts == prom.get("toolpool_rejections_total", destination=d, reason="timeout")
    assert timeouts > 0
    assert _value(points, "toolpool.connection.created", **pool_attr) == prom.get(
        "toolpool_connections_created_total", destination=d
    )
    for lab, n in prom.series("toolpool_connections_closed_total").items():
        reason = dict(lab)["reason"]
        closed = _value(points, "toolpool.connection.closed", **pool_attr, **_a("close", reason))
        assert closed == n
    for source in ("idle", "new"):
        got = _value(points, "toolpool.connection.acquisitions", **pool_attr, **_a("src", source))
        assert got == prom.get(
            "toolpool_connection_acquisitions_total", destination=d, source=source
        )
    rejections = prom.series("toolpool_rejections_total")
    assert rejections
    for lab, n in rejections.items():
        reason = dict(lab)["reason"]
        refused = _value(points, "toolpool.rejections", **pool_attr, **_a("rejection", reason))
        assert refused == n
    assert prom.get("toolpool_rejections_total", destination=d, reason="queue_full") > 0
    refreshes = prom.series("toolpool_auth_refreshes_total")
    assert refreshes
    for lab, n in refreshes.items():
        reason = dict(lab)["reason"]
        fetched = _value(points, "toolpool.auth.refreshes", **pool_attr, **_a("auth", reason))
        assert fetched == n
    assert prom.get("toolpool_auth_refreshes_total", destination=d, reason="initial") == 2
    if http2:
        for otel_name, prom_name in (
            ("toolpool.http2.connections", "toolpool_http2_connections"),
            ("toolpool.http2.streams.in_use", "toolpool_http2_streams_in_use"),
            ("toolpool.http2.connections.created", "toolpool_http2_connections_created_total"),
            ("toolpool.http2.streams", "toolpool_http2_streams_total"),
            ("toolpool.http2.streams.reset", "toolpool_http2_streams_reset_total"),
        ):
            assert _value(points, otel_name, **pool_attr) == prom.get(prom_name, destination=d)
        # One connection per tenant; token requests and API requests all streams on them.
        assert prom.get("toolpool_http2_connections_created_total", destination=d) == 2
        assert prom.get("toolpool_http2_streams_total", destination=d) > 10
        h2_closed = prom.series("toolpool_http2_connections_closed_total")
        assert h2_closed
        for lab, n in h2_closed.items():
            reason = dict(lab)["reason"]
            got = _value(
                points, "toolpool.http2.connections.closed", **pool_attr, **_a("close", reason)
            )
            assert got == n
    else:
        assert "toolpool.http2.connections" not in points
    for lab, n in prom.series("toolpool_egress_denied_total").items():
        rule = dict(lab)["rule"]
        assert _value(points, "toolpool.egress.denied", **pool_attr, **_a("egress", rule)) == n
    waited = _check_histogram(
        points, "db.client.connection.wait_time", prom, "toolpool_connection_wait_seconds", d
    )
    created = _check_histogram(
        points, "db.client.connection.create_time", prom, "toolpool_connection_create_seconds", d
    )
    used = _check_histogram(
        points, "db.client.connection.use_time", prom, "toolpool_connection_use_seconds", d
    )
    # Connections opened: HTTP/1.1 at least 3 (the cap, by 2 tenants); HTTP/2 one per tenant.
    assert waited > 10 and created >= (2 if http2 else 3) and used > 10
    # One duration per request that entered the pool, refused ones included.
    durations = points["http.client.request.duration"]
    ok = [p for p in durations if dict(p.attributes).get("http.response.status_code") == 200]
    acquired = prom.total("toolpool_connection_acquisitions_total", destination=d)
    # Every acquisition was an answered request, except the two token requests (they skip
    # the send chain: the auth provider sends them on the pooled send itself).
    assert sum(p.count for p in ok) == acquired - 2
    errors = {dict(p.attributes).get("error.type") for p in durations}
    assert "toolpool.errors.PoolSaturated" in errors


# ---------------------------------------------------------------------- attributes


async def test_spans_carry_no_secret_and_only_hashed_tenants(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    labels = toolpool.metrics.TenantLabels(salt="otel-test-salt-1234")
    async with Downstream({"crm": ServiceSpec(token_latency=0.01)}, tls=True) as ds:
        pool = oauth_pool(ds)
        toolpool.otel.instrument(
            pool, tracer_provider=tracer_provider, metrics=False, tenants=labels
        )
        async with pool:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                client = pool.client()
                r = await client.get(
                    ds.url("crm").replace("https://", "https://user:pw@") + "/anything",
                    params={"api_key": "sk-live-123", "q": "acme corp"},
                )
                assert r.status_code == 200
                missing = await client.get(ds.url("crm") + "/status/404")
                assert missing.status_code == 404
    spans = list(exporter.get_finished_spans())
    requests = client_spans(spans)
    assert len(requests) == 2
    ok, nf = sorted(requests, key=lambda s: s.start_time or 0)
    attrs = dict(ok.attributes or {})
    assert attrs["url.full"].endswith("/anything?api_key=REDACTED&q=REDACTED")
    assert "user" not in attrs["url.full"] and "pw@" not in attrs["url.full"]
    assert attrs["toolpool.tenant"] == labels.label("acme") != "acme"
    assert (nf.attributes or {})["error.type"] == "404"
    assert nf.status.status_code.name == "ERROR"
    text = repr([dict(s.attributes or {}) for s in spans]) + repr([s.events for s in spans])
    for secret in ("sk-live-123", "acme corp", "acme-app", SECRETS["acme"], "pw"):
        assert secret not in text, secret
    assert "'acme'" not in text


async def test_failures_end_their_spans_with_the_error(
    plain: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    pool = toolpool.Pool(
        [toolpool.Destination("api", plain.url("api"), max_connections=1, queue_factor=1)],
        warmup=0.0,
        policy=None,
    )
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    async with pool:
        client = pool.client()
        hang = asyncio.ensure_future(client.get(plain.url("api") + "/delay", params={"s": 0.5}))
        await asyncio.sleep(0.05)
        with pytest.raises(toolpool.PoolTimeout):
            await client.get(plain.url("api") + "/anything", timeout=httpx.Timeout(5, pool=0.05))
        await hang
    spans = list(exporter.get_finished_spans())
    waits = [s for s in spans if s.name == "toolpool.pool.wait"]
    assert len(waits) == 1 and waits[0].status.status_code.name == "ERROR"
    assert 0.04 <= (waits[0].end_time - waits[0].start_time) / 1e9 < 1.0  # type: ignore[operator]
    failed = [s for s in client_spans(spans) if s.status.status_code.name == "ERROR"]
    assert len(failed) == 1
    assert (failed[0].attributes or {})["error.type"] == "toolpool.errors.PoolTimeout"


async def test_uninstrument_stops_spans_and_restores_the_send_chain(
    plain: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    pool = toolpool.Pool([toolpool.Destination("api", plain.url("api"))], warmup=0.0)
    before = pool.destination("api").layers
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    with pytest.raises(toolpool.ConfigError):
        toolpool.otel.instrument(pool, tracer_provider=tracer_provider)
    async with pool:
        await pool.request("GET", plain.url("api") + "/anything")
        # A destination pooled on demand after instrument() is traced too.
        other = plain.url("api").replace("127.0.0.1", "localhost")
        await pool.request("GET", other + "/anything")
        assert len(client_spans(exporter.get_finished_spans())) == 2
        assert [layer.role for layer in pool.destination("api").layers] == ["policy", "tracing"]
        toolpool.otel.uninstrument(pool)
        assert pool.destination("api").layers == before
        assert pool.destination("api").probe is None
        exporter.clear()
        await pool.request("GET", plain.url("api") + "/anything")
        await pool.request("GET", other + "/anything")
        assert exporter.get_finished_spans() == ()
        # A layer added since (tenant metrics) stays in the chain; ours leaves it all the same.
        toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
        toolpool.metrics.register(
            pool,
            prometheus_client.CollectorRegistry(),
            tenants=toolpool.metrics.TenantLabels(salt="otel-test-salt-1234"),
        )
        roles = [layer.role for layer in pool.destination("api").layers]
        assert roles == ["policy", "tenant_metrics", "tracing"]
        toolpool.otel.uninstrument(pool)
        roles = [layer.role for layer in pool.destination("api").layers]
        assert roles == ["policy", "tenant_metrics"]
        await pool.request("GET", plain.url("api") + "/anything")
    assert exporter.get_finished_spans() == ()


async def test_pool_tool_span_follows_instrument_and_uninstrument(
    plain: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """`pool.tool_span` (what the LangChain adapter opens around a tool call) is a span
    holding the call's requests while toolpool.otel traces the pool, nothing otherwise;
    metrics-only instrumentation opens none either."""
    pool = toolpool.Pool([toolpool.Destination("api", plain.url("api"))], warmup=0.0)
    async with pool:
        with pool.tool_span("lookup", call_id="call_1", system="langchain") as span:
            await pool.request("GET", plain.url("api") + "/anything")
        assert span is None
        assert exporter.get_finished_spans() == ()

        toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
        with pool.tool_span("lookup", call_id="call_1", system="langchain") as span:
            await pool.request("GET", plain.url("api") + "/anything")
        assert span is not None
        spans = exporter.get_finished_spans()
        (tool,) = [s for s in spans if s.name == "execute_tool lookup"]
        assert dict(tool.attributes or {}) == {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": "lookup",
            "gen_ai.tool.call.id": "call_1",
            "gen_ai.system": "langchain",
        }
        (client,) = client_spans(spans)
        assert client.parent is not None and client.parent.span_id == tool.context.span_id

        toolpool.otel.uninstrument(pool)
        exporter.clear()
        with pool.tool_span("lookup") as span:
            await pool.request("GET", plain.url("api") + "/anything")
        assert span is None
        assert exporter.get_finished_spans() == ()

        toolpool.otel.instrument(pool, tracer_provider=tracer_provider, traces=False)
        with pool.tool_span("lookup") as span:
            await pool.request("GET", plain.url("api") + "/anything")
        assert span is None
        assert exporter.get_finished_spans() == ()
        toolpool.otel.uninstrument(pool)


async def test_admission_wait_spans_name_each_outcome_async_and_sync(
    plain: Downstream, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """A call that waits at the admission gate ends with one `toolpool.admission.wait` span
    naming how the wait ended, from `pool.admit` and `pool.admit_sync` alike: admitted,
    cancelled (its place given up), timeout. A call admitted at once has no wait span."""
    dest = toolpool.Destination("api", plain.url("api"), max_connections=1, queue_factor=1)
    pool = toolpool.Pool([dest], warmup=0.0)
    toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
    runtime = pool.policy_runtime(pool.destination("api"))
    hangs: list[asyncio.Future[httpx.Response]] = []

    def outcomes() -> list[str]:
        spans = exporter.get_finished_spans()
        waits = [s for s in spans if s.name == "toolpool.admission.wait"]
        return [str((s.attributes or {})["toolpool.admission.outcome"]) for s in waits]

    async def until(predicate: Any, what: str) -> None:
        deadline = asyncio.get_running_loop().time() + 15.0
        while not predicate():
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.005)

    async def saturate() -> None:
        """Hanging requests fill the connection and the queue (capacity 2)."""
        while len(hangs) < 2:
            hangs.append(asyncio.ensure_future(client.get(plain.url("api") + "/hang")))
        await until(lambda: pool.saturation("api").state == "saturated", "saturated")

    async def free_one() -> None:
        # Only while no connect is under way (see tests/resilience Hangs.stop_one).
        await until(lambda: pool.stats()["api"].opening == 0, "connects done")
        task = hangs.pop(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def admit() -> None:
        async with pool.admit("api", timeout=30):
            pass

    def admit_sync() -> None:
        with pool.admit_sync("api", timeout=30):
            pass

    async with pool:
        client = pool.client(timeout=httpx.Timeout(60.0, pool=None))
        async with pool.admit("api", timeout=5):
            pass
        assert outcomes() == []  # admitted at once: no wait
        await saturate()
        # Async, cancelled while waiting: its place is given up.
        task = asyncio.ensure_future(admit())
        await until(lambda: runtime.admission.waiting == 1, "queued")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert (runtime.admission.waiting, outcomes()) == (0, ["cancelled"])
        # A thread, out of time.
        with pytest.raises(toolpool.PoolSaturated):
            await asyncio.to_thread(pool.admit_sync("api", timeout=0.05).__enter__)
        assert outcomes() == ["cancelled", "timeout"]
        # Async, then a thread, each admitted once a place frees.
        task = asyncio.ensure_future(admit())
        await until(lambda: runtime.admission.waiting == 1, "queued")
        await free_one()
        await task
        await saturate()
        thread = asyncio.ensure_future(asyncio.to_thread(admit_sync))
        await until(lambda: runtime.admission.waiting == 1, "queued")
        await free_one()
        await thread
        assert outcomes() == ["cancelled", "timeout", "admitted", "admitted"]
        assert (runtime.admission.waiting, runtime.admission.admitted) == (0, 0)
        while hangs:
            await free_one()
        await client.aclose()
    toolpool.otel.uninstrument(pool)


async def test_retries_are_spans_between_attempts(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    from toolpool.resilience import Policy, Retry

    policy = Policy(retry=Retry(backoff=0.02, max_backoff=0.03), breaker=None, adaptive=None)
    async with Downstream({"api": ServiceSpec(require_auth=False, service_time=0.01)}) as ds:
        pool = toolpool.Pool(
            [toolpool.Destination("api", ds.url("api"), policy=policy)], warmup=0.0
        )
        toolpool.otel.instrument(pool, tracer_provider=tracer_provider, metrics=False)
        async with pool:
            ds.set_fault("api", "status", count=2, status=503)
            r = await pool.client().get(ds.url("api") + "/anything")
            assert r.status_code == 200
            # Warm: a request that is only an exchange has no child span...
            assert (await pool.client().get(ds.url("api") + "/anything")).status_code == 200
            # ...until a retry follows it, which draws the first exchange after all.
            ds.set_fault("api", "status", count=1, status=503)
            assert (await pool.client().get(ds.url("api") + "/anything")).status_code == 200
    spans = list(exporter.get_finished_spans())
    request, warm, warm_retried = sorted(client_spans(spans), key=lambda s: s.start_time or 0)
    assert check_accounted(spans, warm) == {}
    names = [k.name for k in sorted(children(spans, warm_retried), key=lambda s: s.start_time or 0)]
    assert names == ["toolpool.response", "toolpool.retry", "toolpool.response"]
    assert (warm_retried.attributes or {})["http.request.resend_count"] == 1
    # Structure, not the 5 % accounting: these requests last a few ms, so one scheduling delay
    # of a loaded machine between two children is already 5 % (the agent tests check that).
    check_accounted(spans, warm_retried, exact=False)
    attrs = request.attributes or {}
    assert attrs["http.request.resend_count"] == 2
    assert attrs["http.response.status_code"] == 200
    kids = sorted(
        (s for s in spans if s.parent and s.parent.span_id == request.context.span_id),
        key=lambda s: s.start_time or 0,
    )
    names = [k.name for k in kids]
    # The first attempt opens the connection; both retries wait out a backoff first.
    assert names == [
        "toolpool.connect",
        "toolpool.response",
        "toolpool.retry",
        "toolpool.response",
        "toolpool.retry",
        "toolpool.response",
    ], names
    statuses = [(k.attributes or {}).get("http.response.status_code") for k in kids[1::2]]
    assert statuses == [503, 503, 200]
    # A retry span runs from the end of the failed attempt to the start of the next one.
    for before, retry, after in zip(kids[1::2], kids[2::2], kids[3::2], strict=False):
        assert retry.start_time == before.end_time
        assert retry.end_time is not None and after.start_time is not None
        assert retry.end_time <= after.start_time
        assert retry.end_time > retry.start_time  # the backoff (jittered, > 0)
    check_accounted(spans, request, exact=False)


async def test_unsampled_requests_cost_no_child_spans(
    plain: Downstream, exporter: InMemorySpanExporter
) -> None:
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    saved = os.environ.pop("OTEL_SDK_DISABLED", None)
    try:
        provider = TracerProvider(sampler=ALWAYS_OFF)
    finally:
        if saved is not None:
            os.environ["OTEL_SDK_DISABLED"] = saved
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    pool = toolpool.Pool(
        [toolpool.Destination("api", plain.url("api"), max_connections=1, queue_factor=4)],
        warmup=0.0,
    )
    toolpool.otel.instrument(pool, tracer_provider=provider, metrics=False)
    async with pool:
        client = pool.client()
        got = await asyncio.gather(*(client.get(plain.url("api") + "/anything") for _ in range(4)))
    assert {r.status_code for r in got} == {200}
    assert pool.stats()["api"].queued_total >= 2  # the probe was asked, and skipped
    assert exporter.get_finished_spans() == ()


def test_toolpool_imports_no_opentelemetry_until_asked() -> None:
    code = (
        "import sys, toolpool, toolpool.metrics, toolpool.auth, toolpool.resilience\n"
        "pool = toolpool.Pool([toolpool.Destination('a', 'http://127.0.0.1:9')])\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
        "import toolpool.otel\n"
        "assert 'opentelemetry.trace' in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("http2", [True, False], ids=["h2", "http1.1"])
def test_the_readme_waterfall_script_runs(tmp_path: Any, http2: bool) -> None:
    """examples/otel_trace.py (the README's pictures: HTTP/2, and --http1) still runs and
    draws the whole run."""
    script = Path(__file__).resolve().parents[2] / "examples" / "otel_trace.py"
    out, spans = tmp_path / "trace.png", tmp_path / "trace.json"
    flags = [] if http2 else ["--http1"]
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(out), "--json", str(spans), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 20_000
    exported = json.loads(spans.read_text())
    names = [s["name"] for s in exported]
    assert names.count("execute_tool crm_lookup") == 4
    # 4 tool calls on 2 permits: the 2 beyond wait at the admission gate.
    for name in ("toolpool.auth.token", "toolpool.admission.wait", "toolpool.connect"):
        assert name in names, name
    assert "toolpool.tls" in names
    requests = [s for s in exported if s["kind"] == "SpanKind.CLIENT" and s["name"] == "GET"]
    assert len(requests) == 4
    versions = {s["attributes"]["network.protocol.version"] for s in requests}
    assert versions == {"2" if http2 else "1.1"}
    alpn = {
        s["attributes"].get("tls.next_protocol") for s in exported if s["name"] == "toolpool.tls"
    }
    if http2:
        # One tenant, one connection: opened for the token request, every call multiplexed
        # onto it as a stream.
        assert names.count("toolpool.connect") == 1 and alpn == {"h2"}
        assert sorted(s["attributes"]["toolpool.http2.stream_id"] for s in requests) == [3, 5, 7, 9]
    else:
        assert names.count("toolpool.connect") == 2 and alpn == {None}


def test_the_readme_metric_table_names_real_instruments() -> None:
    """The README's "OpenTelemetry equivalent" column names instruments toolpool.otel makes."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith("| `toolpool_")]
    named = set()
    for row in rows:
        last = row.rstrip(" |").rsplit("|", 1)[-1]
        named |= set(re.findall(r"`([a-z_.]+)`", last))
    assert named >= {"db.client.connection.count", "db.client.connection.wait_time"}
    assert named <= set(toolpool.otel.INSTRUMENTS), named - set(toolpool.otel.INSTRUMENTS)
