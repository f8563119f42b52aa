"""Helpers of the OpenTelemetry tests: span trees from the in-memory exporter, and the
accounting check (a request's child spans explain its duration)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

import toolpool

# What the pool's child spans may be; "accounted" time is the union of their intervals.
POOL_CHILDREN = {
    "toolpool.pool.wait",
    "toolpool.connect",
    "toolpool.auth.token",
    "toolpool.auth.wait",
    "toolpool.retry",
    "toolpool.response",
    # HTTP/2 only: waiting for the context's connection another request is opening, and the
    # PING of a connection idle for a while before it carries the stream.
    "toolpool.connect.wait",
    "toolpool.ping",
}
#: `network.protocol.version` by the pool's `http2` option (on a TLS test bed, which offers h2).
VERSIONS = {False: "1.1", True: "2"}
TENANTS = ["acme", "globex"]


def client_spans(spans: Sequence[ReadableSpan]) -> list[ReadableSpan]:
    """toolpool's request spans (kind CLIENT, from the "toolpool" tracer)."""
    return [
        s
        for s in spans
        if s.kind == SpanKind.CLIENT
        and s.instrumentation_scope is not None
        and s.instrumentation_scope.name == "toolpool"
    ]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    pid = parent.context.span_id
    return [s for s in spans if s.parent is not None and s.parent.span_id == pid]


def by_id(spans: Sequence[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def union_ns(intervals: list[tuple[int, int]]) -> int:
    total = 0
    end = None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def check_accounted(
    spans: Sequence[ReadableSpan], client: ReadableSpan, exact: bool = True
) -> dict[str, float]:
    """Assert that the request's child spans lie inside it and (with `exact`) together
    explain its duration within 5 %; return the milliseconds per kind of child."""
    assert client.start_time is not None and client.end_time is not None
    kids = children(spans, client)
    names = {k.name for k in kids}
    assert names <= POOL_CHILDREN, names - POOL_CHILDREN
    if not kids:
        # Only an exchange on a ready connection: the request's span is that exchange.
        attrs = client.attributes or {}
        assert attrs["toolpool.wait_ms"] == 0.0 and attrs["toolpool.connection.reused"] is True
        assert "http.request.resend_count" not in attrs
        return {}
    assert "toolpool.response" in names, names
    start, end = client.start_time, client.end_time
    duration = end - start
    intervals = []
    per: dict[str, float] = {}
    for k in kids:
        assert k.start_time is not None and k.end_time is not None
        # Children are stamped from the same clock reading offset as their parent.
        assert start <= k.start_time <= k.end_time <= end, (k.name, start, k.start_time, end)
        intervals.append((k.start_time, k.end_time))
        per[k.name] = per.get(k.name, 0.0) + (k.end_time - k.start_time) / 1e6
    covered = union_ns(intervals)
    assert covered >= (0.95 if exact else 0.0) * duration, (
        f"children explain {covered / 1e6:.2f} of {duration / 1e6:.2f} ms: "
        + ", ".join(
            f"{k.name} {(k.start_time - start) / 1e6:.2f}..{(k.end_time - start) / 1e6:.2f}"
            for k in sorted(kids, key=lambda k: k.start_time or 0)
        )
    )
    return per


def tls_children(spans: Sequence[ReadableSpan], connect: ReadableSpan) -> list[ReadableSpan]:
    return [s for s in children(spans, connect) if s.name == "toolpool.tls"]


def check_protocol(spans: Sequence[ReadableSpan], http2: bool) -> None:
    """Every request and connect span of the run says the protocol it spoke, the TLS
    handshake what ALPN chose; on HTTP/2 each request names its stream; and the requests
    marked as not reused are exactly those that opened a connection themselves or (HTTP/2)
    waited for another request to open it."""
    version = VERSIONS[http2]
    requests = client_spans(spans)
    for req in requests:
        attrs = req.attributes or {}
        assert attrs["network.protocol.version"] == version, attrs
        if http2:
            assert attrs["toolpool.http2.stream_id"] % 2 == 1  # client streams are odd
            assert attrs["toolpool.http2.streams"] >= 1
        else:
            assert "toolpool.http2.stream_id" not in attrs
    connects = [s for s in spans if s.name == "toolpool.connect"]
    assert connects
    for connect in connects:
        attrs = connect.attributes or {}
        assert attrs["network.protocol.version"] == version
        (tls,) = tls_children(spans, connect)
        if http2:
            assert (tls.attributes or {})["tls.next_protocol"] == "h2"
            assert attrs["toolpool.http2.settings_ms"] >= 0.0
    new = {"toolpool.connect", "toolpool.connect.wait"}
    opened = [r for r in requests if any(k.name in new for k in children(spans, r))]
    fresh = [r for r in requests if not (r.attributes or {})["toolpool.connection.reused"]]
    assert sorted(r.context.span_id for r in opened) == sorted(r.context.span_id for r in fresh)


def oauth_pool(ds: Any, **dest: object) -> toolpool.Pool:
    """A pool with "crm" behind OAuth client credentials per tenant (TLS, no warm-up)."""
    for tenant in TENANTS:
        secret = SECRETS[tenant]
        ds.register_client("crm", client_id=f"{tenant}-app", client_secret=secret, tenant=tenant)

    def creds(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
        assert ctx is not None and ctx.tenant is not None
        return f"{ctx.tenant}-app", SECRETS[ctx.tenant]

    auth = toolpool.auth.OAuth2ClientCredentials(ds.token_url("crm"), credentials=creds)
    return toolpool.Pool(
        [
            toolpool.Destination(
                "crm", ds.url("crm"), verify=ds.ca_pem_path, warmup=0.0, auth=auth, **dest
            )
        ]
    )


SECRETS = {t: f"cs-{t}-otel-secret" for t in TENANTS}
