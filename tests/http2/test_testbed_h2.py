"""The test bed speaks HTTP/2 by ALPN and counts streams; its HTTP/2 fault kinds."""

from __future__ import annotations

from collections.abc import Callable

import h2.errors
import h2.events
import httpx
import pytest

from tests._support.h2_raw import RawH2
from toolpool.testing import Downstream, ServiceSpec

OPEN = ServiceSpec(require_auth=False)
pytestmark = pytest.mark.timeout(30)


def _ended(sid: int) -> Callable[[list[h2.events.Event]], bool]:
    return lambda events: any(
        isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)) and e.stream_id == sid
        for e in events
    )


def test_alpn_picks_h2_for_a_client_offering_it_and_http11_otherwise() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        with httpx.Client(verify=ds.client_ssl_context(), http2=True) as client:
            r = client.get(ds.url("api") + "/anything", headers={"x-tenant": "acme"})
            assert r.http_version == "HTTP/2"
            assert r.json()["tenant"] == "acme"
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            assert client.get(ds.url("api") + "/anything").http_version == "HTTP/1.1"
        stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
        assert sorted(stats.connection_protocols.values()) == ["h2", "http/1.1"]
        assert stats.http2_connections() == 1
        assert stats.streams_total == 1


def test_http2_false_and_plain_http_never_speak_h2() -> None:
    spec = ServiceSpec(require_auth=False, http2=False)
    with Downstream({"api": spec}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        assert raw.alpn == "http/1.1"
        raw.close()
    with Downstream({"api": OPEN}) as ds, httpx.Client(http2=True) as client:
        assert client.get(ds.url("api") + "/anything").http_version == "HTTP/1.1"


def test_streams_counted_per_connection_and_peak_concurrent_per_destination() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        sids = [raw.request("/delay?s=0.3", {"x-tenant": "acme"}) for _ in range(5)]
        raw.read_until(lambda ev: all(_ended(s)(ev) for s in sids))
        responses = raw.of(h2.events.ResponseReceived)
        assert [dict(r.headers)[":status"] for r in responses] == ["200"] * 5
        stats = ds.stats("api")
        assert stats.connection_streams == {1: 5}
        assert stats.peak_connection_streams == {1: 5}
        assert stats.peak_streams_open == 5
        assert stats.streams_open == 0
        assert stats.connection_tenants == {1: frozenset({"acme"})}
        raw.close()


def test_tenants_per_connection_by_client_certificate_on_h2() -> None:
    spec = ServiceSpec(require_auth=False, mtls=True)
    with Downstream({"api": spec}, tls=True) as ds:
        for tenant in ("acme", "beta"):
            with httpx.Client(verify=ds.client_ssl_context(tenant), http2=True) as client:
                for _ in range(3):
                    assert client.get(ds.url("api") + "/anything").json()["tenant"] == tenant
        stats = ds.wait_stats("api", lambda s: s.connections_open == 0)
        assert stats.connection_tenants == {1: frozenset({"acme"}), 2: frozenset({"beta"})}
        assert stats.connection_streams == {1: 3, 2: 3}


def test_large_bodies_flow_both_ways_under_flow_control() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        with httpx.Client(verify=ds.client_ssl_context(), http2=True) as client:
            body = bytes(range(256)) * 20_000  # 5 MB, far above the 64 KiB initial windows
            assert client.post(ds.url("api") + "/anything", content=body).json()[
                "body_size"
            ] == len(body)
            got = client.get(ds.url("api") + "/bytes?n=6000000").content
            assert got == (bytes(range(256)) * 23438)[:6_000_000]


def test_client_rst_stream_is_counted_and_the_connection_serves_on() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        hanging = raw.request("/hang")
        ds.wait_stats("api", lambda s: s.requests_in_progress == 1)
        raw.conn.reset_stream(hanging, h2.errors.ErrorCodes.CANCEL)
        raw.flush()
        ds.wait_stats("api", lambda s: s.streams_reset_by_client == 1 and s.streams_open == 0)
        assert ds.stats("api").requests_in_progress == 0
        sid = raw.request("/anything")
        raw.read_until(_ended(sid))
        assert ds.stats("api").connections_accepted == 1
        raw.close()


def test_goaway_fault_drains_earlier_streams_and_names_the_last_processed() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        slow = raw.request("/delay?s=0.5")
        ds.wait_stats("api", lambda s: s.requests_in_progress == 1)
        ds.set_fault("api", "goaway", count=1)
        refused = raw.request("/anything")
        raw.read_until(lambda ev: any(isinstance(e, h2.events.ConnectionTerminated) for e in ev))
        (goaway,) = raw.of(h2.events.ConnectionTerminated)
        assert goaway.last_stream_id == slow < refused
        assert goaway.error_code == h2.errors.ErrorCodes.NO_ERROR
        # h2 (the client here) refuses frames after a GOAWAY; read on regardless.
        raw.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        raw.read_until(_ended(slow))
        assert dict(raw.of(h2.events.ResponseReceived, slow)[0].headers)[":status"] == "200"
        assert raw.of(h2.events.ResponseReceived, refused) == []
        stats = ds.wait_stats("api", lambda s: s.connections_open == 0)  # closed once drained
        assert stats.faults_fired == {"goaway": 1}
        raw.close()


@pytest.mark.parametrize(
    ("kind", "code"),
    [
        ("rst_stream", h2.errors.ErrorCodes.INTERNAL_ERROR),
        ("refused_stream", h2.errors.ErrorCodes.REFUSED_STREAM),
    ],
)
def test_stream_reset_faults_reset_one_stream_and_keep_the_connection(kind: str, code: int) -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        ds.set_fault("api", kind, count=1)  # type: ignore[arg-type]
        first = raw.request("/anything")
        raw.read_until(_ended(first))
        (reset,) = raw.of(h2.events.StreamReset, first)
        assert reset.error_code == code
        second = raw.request("/anything")
        raw.read_until(_ended(second))
        assert raw.of(h2.events.StreamEnded, second)
        stats = ds.stats("api")
        assert stats.connections_accepted == 1
        assert stats.faults_fired == {kind: 1}
        assert stats.streams_open == 0
        raw.close()


def test_max_streams_1_fault_announces_one_concurrent_stream() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        ds.set_fault("api", "max_streams_1", count=1)
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        raw.read_until(lambda ev: bool(raw.of(h2.events.RemoteSettingsChanged)))
        assert raw.conn.remote_settings.max_concurrent_streams == 1
        other = RawH2(ds.address("api"), ds.client_ssl_context())  # count=1: only the first
        other.read_until(lambda ev: bool(other.of(h2.events.RemoteSettingsChanged)))
        assert other.conn.remote_settings.max_concurrent_streams == 128
        raw.close()
        other.close()


def test_max_concurrent_streams_spec() -> None:
    with Downstream(
        {"api": ServiceSpec(require_auth=False, max_concurrent_streams=3)}, tls=True
    ) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        raw.read_until(lambda ev: bool(raw.of(h2.events.RemoteSettingsChanged)))
        assert raw.conn.remote_settings.max_concurrent_streams == 3
        raw.close()


def test_silent_fault_leaves_a_ping_unanswered() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        raw.conn.ping(b"12345678")
        raw.flush()
        raw.read_until(lambda ev: bool(raw.of(h2.events.PingAckReceived)))
        ds.set_fault("api", "silent", count=1)
        raw.conn.ping(b"abcdefgh")
        raw.flush()
        with pytest.raises(TimeoutError):
            raw.read_until(lambda ev: len(raw.of(h2.events.PingAckReceived)) == 2, timeout=0.5)
        # The server may read the second PING after our 0.5 s: wait for the fault's count.
        stats = ds.wait_stats("api", lambda s: s.faults_fired == {"silent": 1})
        assert stats.pings_received == 1  # the second never reached the server's h2
        raw.close()


def test_http1_fault_makes_the_server_pick_http11() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        ds.set_fault("api", "http1", count=1)
        with httpx.Client(verify=ds.client_ssl_context(), http2=True) as client:
            assert client.get(ds.url("api") + "/anything").http_version == "HTTP/1.1"
        with httpx.Client(verify=ds.client_ssl_context(), http2=True) as client:
            assert client.get(ds.url("api") + "/anything").http_version == "HTTP/2"
        assert ds.stats("api").faults_fired == {"http1": 1}


def test_h2_faults_do_not_fire_on_http11() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        ds.set_fault("api", "rst_stream")
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            assert client.get(ds.url("api") + "/anything").status_code == 200
        assert ds.stats("api").faults_fired == {}


def test_stats_roundtrip_json_keeps_stream_counters() -> None:
    from toolpool.testing import ServiceStats

    with Downstream({"api": OPEN}, tls=True) as ds:
        with httpx.Client(verify=ds.client_ssl_context(), http2=True) as client:
            client.get(ds.url("api") + "/anything")
        stats = ds.stats("api")
        assert ServiceStats.from_json(stats.to_json()) == stats


def test_client_reset_of_an_answered_stream_blocked_by_flow_control_counts_once() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        raw = RawH2(ds.address("api"), ds.client_ssl_context())
        # 200 KB against the client's 64 KiB window: answered, but not all sent.
        sid = raw.request("/bytes?n=200000")
        raw.read_until(lambda ev: bool(raw.of(h2.events.DataReceived, sid)))
        raw.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
        raw.flush()
        stats = ds.wait_stats("api", lambda s: s.streams_open == 0)
        assert stats.requests_in_progress == 0
        assert stats.responses_by_status == {200: 1}
        raw.close()
