"""Operations and the agent side: /readyz follows warm-up, /metrics and /healthz, streaming
responses, the access log, the GlobalLimit plug-in, and `RemoteTransport`'s mapping of URLs
and of the service's errors onto the exceptions an in-process pool raises."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

import toolpool
from tests._support.pool_service import (
    AGENT_A_TOKEN,
    AGENT_B_TOKEN,
    ServiceThread,
    service_config,
    write_config,
)
from toolpool.testing import Downstream

B = {"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "acme"}


class HoldServer:
    """Accepts TCP connections and never answers: a TLS warm-up against it hangs until the
    test releases (closes) the held sockets."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)
            self.accepted.set()

    def release(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


def test_readyz_waits_for_warm_up_and_healthz_does_not(ds: Downstream, tmp_path: Path) -> None:
    hold = HoldServer()
    extra = f"""
[destinations.slow]
url = "https://127.0.0.1:{hold.port}"
max_connections = 2
warmup = 0.5
connect_timeout = 60
"""
    text = service_config(ds, service="warmup_timeout = 60", extra=extra)
    try:
        with ServiceThread(write_config(tmp_path, text), wait=False) as svc:
            assert hold.accepted.wait(20), "warm-up never connected"
            r = httpx.get(svc.url + "/readyz")
            assert (r.status_code, r.json()) == (503, {"ready": False, "state": "warming up"})
            assert httpx.get(svc.url + "/healthz").status_code == 200
            # Requests are served while warming up.
            assert httpx.get(svc.url + "/d/search/anything", headers=B).status_code == 200
            hold.release()  # the handshake fails: warm-up is over (failed, logged)
            deadline = time.monotonic() + 20
            while httpx.get(svc.url + "/readyz").status_code != 200:
                assert time.monotonic() < deadline, "never ready"
                time.sleep(0.02)
    finally:
        hold.release()


def test_metrics_expose_the_pool_and_the_service(service: ServiceThread) -> None:
    assert httpx.get(service.url + "/d/search/anything", headers=B).status_code == 200
    assert httpx.get(service.url + "/d/nowhere/x", headers=B).status_code == 404
    text = httpx.get(service.url + "/metrics").text
    assert 'toolpool_service_requests_total{destination="search",status="200"} 1.0' in text
    assert 'toolpool_service_refusals_total{reason="unknown_destination"} 1.0' in text
    assert 'toolpool_connections_created_total{destination="search"} 1.0' in text
    assert "toolpool_service_ready 1.0" in text
    assert AGENT_B_TOKEN not in text and "nowhere" not in text  # refused names never labelled


def test_responses_stream_through_while_the_downstream_still_sends(
    service: ServiceThread, ds: Downstream
) -> None:
    with httpx.stream(
        "GET", service.url + "/d/search/stream?chunks=3&size=1000&delay=0.5", headers=B
    ) as r:
        chunks = r.iter_raw()
        first = next(chunks)
        # The first bytes arrived while the downstream has not finished its answer.
        assert ds.stats("search").requests_in_progress == 1
        rest = b"".join(chunks)
    assert len(first) + len(rest) == 3000
    assert ds.stats("search").requests_in_progress == 0


def test_access_log_is_json_without_secrets(
    service: ServiceThread, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="toolpool.service.access"):
        httpx.get(service.url + "/d/crm/anything?api_key=leaky", headers=B)
        httpx.get(
            service.url + "/d/crm/anything",
            headers={"Authorization": f"Bearer {AGENT_A_TOKEN}", "X-Toolpool-Tenant": "globex"},
        )
        # A record is written once the response is sent, on the service's thread.
        deadline = time.monotonic() + 10
        while sum(r.name.endswith("access") for r in caplog.records) < 2:
            assert time.monotonic() < deadline, caplog.records
            time.sleep(0.01)
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name.endswith("access")]
    assert [(r["agent"], r["tenant"], r["destination"], r["status"]) for r in records] == [
        ("agent-b", "acme", "crm", 200),
        ("agent-a", None, "crm", 403),
    ]
    assert records[0]["path"] == "/anything" and records[1]["error"] == "forbidden_tenant"
    dump = json.dumps(records)
    for secret in ("leaky", AGENT_A_TOKEN, AGENT_B_TOKEN, "downstream-secret", "Bearer"):
        assert secret not in dump


async def test_a_fleet_coordinator_plugs_in_as_the_global_limit(
    ds: Downstream, tmp_path: Path
) -> None:
    text = service_config(ds).replace(
        "[pool]",
        '[limits]\nprovider = "tests._support.pool_service:OnePermitLimit"\npermits = 1\n\n[pool]',
    )
    with ServiceThread(write_config(tmp_path, text)) as svc:
        limit = svc.config.limit
        async with httpx.AsyncClient() as client:
            first = asyncio.ensure_future(client.get(svc.url + "/d/search/delay?s=0.5", headers=B))
            await ds.wait_stats_async("search", lambda s: s.requests_in_progress == 1)
            second = await client.get(svc.url + "/d/search/anything", headers=B)
            assert (await first).status_code == 200
        third = httpx.get(svc.url + "/d/search/anything", headers=B)
    assert second.status_code == 503 and second.json()["reason"] == "fleet_limit"
    assert second.headers["retry-after"] == "1"
    assert third.status_code == 200
    assert (limit.granted, limit.held) == (2, 0)  # type: ignore[attr-defined]


def test_remote_transport_maps_urls_and_errors(service: ServiceThread, ds: Downstream) -> None:
    acme = toolpool.AuthContext(tenant="acme")
    with httpx.Client(
        transport=toolpool.RemoteTransport(service.url, token=AGENT_A_TOKEN)
    ) as client:
        with toolpool.auth_context(acme):
            r = client.post(ds.url("search") + "/echo?x=1", content=b"body")
        assert r.status_code == 200 and r.json()["body"] == "body" and r.json()["query"] == "x=1"
        assert r.extensions["toolpool"]["tier"] == "service"
        assert not any(k.lower().startswith("x-toolpool") for k in r.headers)
        # No context: agent-a has one tenant, which the service uses.
        assert client.get(ds.url("crm") + "/anything").json()["tenant"] == "acme"
        with toolpool.auth_context(toolpool.AuthContext(tenant="globex")):
            with pytest.raises(toolpool.AuthError, match="may not act for this tenant"):
                client.get(ds.url("crm") + "/anything")
        with pytest.raises(toolpool.UnknownDestination):
            client.get("http://127.0.0.1:9/anything")
        # A path the service refuses stays an HTTP answer.
        assert client.get(ds.url("search") + "/a/%2e%2e/b").status_code == 400
    bad = toolpool.RemotePool(service.url, token="not-an-agent-token-000")
    with httpx.Client(transport=bad.transport()) as client:
        with pytest.raises(toolpool.AuthError, match="token is not valid"):
            client.get(ds.url("search") + "/anything")
    bad.close()
    assert "not-an-agent" not in repr(bad)


async def test_remote_pool_client_async_with_explicit_destinations(
    service: ServiceThread, ds: Downstream
) -> None:
    async with toolpool.RemotePool(
        service.url, token=AGENT_B_TOKEN, destinations={"search": ds.url("search")}
    ) as remote:
        async with remote.client() as client:
            with toolpool.auth_context(toolpool.AuthContext(tenant="globex")):
                rs = await asyncio.gather(
                    *[client.get(ds.url("search") + "/anything") for _ in range(10)]
                )
    assert {r.json()["tenant"] for r in rs} == {"globex"}
