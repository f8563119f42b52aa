"""`requests` inside a tool call goes through the pool (`toolpool.adapters._requests`): the
behaviour tool code relies on (bodies, cookies, redirects, streaming, errors) is kept, and
what the pool must not take over (proxies, a tool's own TLS settings) is left alone."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests
import requests.adapters

import toolpool
from toolpool.adapters import RequestsAdapter, install_requests_patch, tool_call_scope
from toolpool.testing import Downstream, ServiceSpec

ACME = toolpool.AuthContext(tenant="acme")


def wait_for(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for a condition of the pool under test (bounded; fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


@pytest.fixture(scope="module")
def plain() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        yield ds


@pytest.fixture
def api(plain: Downstream) -> Iterator[tuple[Downstream, toolpool.Pool]]:
    plain.reset_stats()
    install_requests_patch()
    with toolpool.Pool(
        [toolpool.Destination("api", plain.url("api"), max_connections=4)], warmup=0
    ) as pool:
        yield plain, pool


def test_requests_get_in_a_tool_call_reuses_one_connection(
    api: tuple[Downstream, toolpool.Pool],
) -> None:
    ds, pool = api
    url = ds.url("api")
    with tool_call_scope(pool, ACME, tool_name="search") as call:
        bodies = [
            requests.get(f"{url}/anything", params={"i": i}, timeout=10).json() for i in range(5)
        ]
        with requests.Session() as session:
            assert isinstance(session.get_adapter(url), RequestsAdapter)
            posted = session.post(f"{url}/echo", json={"a": 1}, timeout=10)
    assert {b["connection_id"] for b in bodies} == {bodies[0]["connection_id"]}
    assert [b["request_on_connection"] for b in bodies] == [1, 2, 3, 4, 5]
    assert posted.status_code == 200 and posted.reason == "OK"
    assert posted.headers["content-type"] == "application/json"
    assert json.loads(posted.json()["body"]) == {"a": 1}
    assert posted.url == f"{url}/echo"
    assert call.destinations == {"api"}
    stats = ds.stats("api")
    assert stats.connections_accepted == 1
    assert pool.stats()["api"].in_use == 0


def test_sessions_outside_a_tool_call_are_untouched(api: tuple[Downstream, toolpool.Pool]) -> None:
    ds, _ = api
    with requests.Session() as session:
        assert type(session.get_adapter(ds.url("api"))) is requests.adapters.HTTPAdapter


def test_bodies_cookies_redirects(api: tuple[Downstream, toolpool.Pool]) -> None:
    ds, pool = api
    url = ds.url("api")
    with tool_call_scope(pool, ACME, tool_name="t"), requests.Session() as session:
        chunked = session.post(f"{url}/echo", data=(part for part in [b"ab", b"cd"]), timeout=10)
        text = session.post(f"{url}/echo", data="héllo", timeout=10)
        session.get(f"{url}/cookies/set?flavour=oat", timeout=10)
        cookies = session.get(f"{url}/cookies", timeout=10).json()["cookies"]
        redirected = session.get(f"{url}/redirect?to=/anything", timeout=10)
    assert chunked.json()["body"] == "abcd"
    assert chunked.json()["headers"]["transfer-encoding"] == "chunked"
    assert text.json()["body"] == "héllo"
    assert cookies == {"flavour": "oat"}
    assert redirected.status_code == 200
    assert [r.status_code for r in redirected.history] == [302]
    assert redirected.json()["path"] == "/anything"
    assert ds.stats("api").connections_accepted == 1


def test_streaming_returns_the_connection(api: tuple[Downstream, toolpool.Pool]) -> None:
    ds, pool = api
    url = ds.url("api")
    with tool_call_scope(pool, ACME, tool_name="t"):
        response = requests.get(f"{url}/stream?chunks=4&size=1000", stream=True, timeout=10)
        assert pool.stats()["api"].in_use == 1  # held while the body is unread
        chunks = list(response.iter_content(chunk_size=1500))
        assert pool.stats()["api"].in_use == 0  # read to the end: back in the pool
        partial = requests.get(f"{url}/bytes?n=100000", stream=True, timeout=10)
        assert len(partial.raw.read(10)) == 10
        partial.close()
        after = requests.get(f"{url}/anything", timeout=10).json()
    assert sum(map(len, chunks)) == 4000
    assert pool.stats()["api"].in_use == 0
    assert after["connection_id"] in ds.stats("api").connection_tenants


def test_busy_errors_propagate_unchanged(api: tuple[Downstream, toolpool.Pool]) -> None:
    """A full pool raises toolpool's own error (the tool wrapper turns it into a busy result),
    not a requests error that a tool's `except requests.RequestException` would swallow."""
    ds, pool = api
    url = ds.url("api")
    client = pool.sync_client()
    held = [
        client.send(
            client.build_request("GET", f"{url}/stream?chunks=2&size=1&delay=30"), stream=True
        )
        for _ in range(4)
    ]
    waiters = [threading.Thread(target=lambda: client.get(f"{url}/anything")) for _ in range(8)]
    for w in waiters:
        w.start()
    dest = pool.destination("api")
    try:
        wait_for(lambda: dest.state.waiting == 8)
        with (
            tool_call_scope(pool, ACME, tool_name="t") as call,
            pytest.raises(toolpool.PoolSaturated) as info,
        ):
            requests.get(f"{url}/anything", timeout=10)
        assert not isinstance(info.value, requests.RequestException)
        assert call.busy is info.value
    finally:
        for r in held:
            r.close()
        for w in waiters:
            w.join(timeout=30)
        client.close()


def test_transport_errors_become_requests_errors(api: tuple[Downstream, toolpool.Pool]) -> None:
    ds, pool = api
    url = ds.url("api")
    # A listening socket that never accepts: connects hang in the backlog -> connect timeout.
    with socket.socket() as closed_port:
        closed_port.bind(("127.0.0.1", 0))
        refused_url = f"http://127.0.0.1:{closed_port.getsockname()[1]}"
    with socket.create_server(("127.0.0.1", 0), backlog=0) as silent:
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        fillers = []
        for _ in range(8):  # fill the accept backlog so further connects cannot complete
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(silent.getsockname())
            fillers.append(s)
        try:
            with tool_call_scope(pool, ACME, tool_name="t"):
                with pytest.raises(requests.exceptions.ReadTimeout):
                    requests.get(f"{url}/delay?s=5", timeout=(5, 0.2))
                with pytest.raises(requests.exceptions.ConnectionError):
                    requests.get(f"{refused_url}/anything", timeout=5)
                with pytest.raises(requests.exceptions.ConnectTimeout):
                    requests.get(f"{silent_url}/anything", timeout=(0.2, 5))
        finally:
            for s in fillers:
                s.close()
    assert pool.stats()["api"].in_use == 0


def test_tls_settings_of_the_tool_are_left_alone(
    ds: Downstream, pool: toolpool.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify= its own CA or False, or a client cert: urllib3 as before (not pooled). The CA
    bundle requests reads from REQUESTS_CA_BUNDLE is process configuration: pooled."""
    from tests._support.crewai_crews import tenant_ctx

    url = ds.url("search")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    install_requests_patch()
    with tool_call_scope(pool, tenant_ctx("acme"), tool_name="t"):
        pooled = requests.get(f"{url}/anything", timeout=10)
        own_ca = requests.get(f"{url}/anything", verify=ds.ca_pem_path, timeout=10)
        with pytest.warns(Warning, match="Unverified HTTPS request"):
            unverified = requests.get(f"{url}/anything", verify=False, timeout=10)
    assert pooled.status_code == 200 and pooled.json()["tenant"] == "acme"  # token from the pool
    assert (own_ca.status_code, unverified.status_code) == (401, 401)  # direct: no token
    assert pool.stats()["search"].acquired_total == 2  # the token request and `pooled`


def test_adapter_close_keeps_the_pool(api: tuple[Downstream, toolpool.Pool]) -> None:
    ds, pool = api
    adapter = RequestsAdapter(pool)
    with requests.Session() as session:
        session.mount("http://", adapter)
        with toolpool.auth_context(ACME):
            assert session.get(f"{ds.url('api')}/anything", timeout=10).status_code == 200
    adapter.close()
    assert not pool.closed
    with pool.sync_client() as client:
        assert client.get(f"{ds.url('api')}/anything").status_code == 200
