"""The test bed in another process: the serve command line and spawn_downstream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolpool.testing import ServiceSpec, spawn_downstream
from toolpool.testing._loadgen import measure

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_spawn_downstream_has_the_downstream_surface_across_processes() -> None:
    services = {
        "crm": ServiceSpec(token_latency=0.0),
        "search": ServiceSpec(require_auth=False, concurrency_limit=30, service_time=(0.0, 0.01)),
    }
    with spawn_downstream(services, tls=True, latency=0.01, seed=1) as ds:
        assert ds.pid != os.getpid()
        assert ds.token_url("crm") == ds.url("crm") + "/oauth/token"
        ds.register_client("crm", client_id="acme-app", client_secret="s3cret", tenant="acme")
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            grant = client.post(
                ds.token_url("crm"),
                data={"grant_type": "client_credentials"},
                auth=("acme-app", "s3cret"),
            ).json()
            auth = {"Authorization": f"Bearer {grant['access_token']}"}
            info = client.get(ds.url("crm") + "/anything", headers=auth).json()
            assert (info["service"], info["tenant"]) == ("crm", "acme")
            exchanged = client.post(
                ds.token_url("crm"),
                data={
                    "grant_type": EXCHANGE,
                    "subject_token": ds.subject_token(tenant="acme", subject="u1"),
                    "subject_token_type": ACCESS,
                },
            ).json()
            auth_u1 = {"Authorization": f"Bearer {exchanged['access_token']}"}
            assert client.get(ds.url("crm") + "/x", headers=auth_u1).json()["subject"] == "u1"
            assert ds.revoke_tokens("crm", tenant="acme") == 2
            assert client.get(ds.url("crm") + "/x", headers=auth).status_code == 401

            ds.set_fault("search", "status", count=1, status=429, retry_after=1)
            assert client.get(ds.url("search") + "/x").status_code == 429
            assert client.get(ds.url("search") + "/x").status_code == 200
            ds.set_fault("search", "status")
            assert client.get(ds.url("search") + "/x").status_code == 503
            ds.clear_faults("search")
            assert client.get(ds.url("search") + "/x").status_code == 200

        stats = ds.wait_stats("crm", lambda s: s.connections_open == 0)
        assert stats.token_requests_by_tenant == {"acme": 2}
        assert stats.responses_by_status == {200: 4, 401: 1}
        assert list(stats.connection_tenants.values()) == [frozenset({"acme"})]
        search = ds.stats("search")
        assert (search.http_429, search.http_503, search.faults_fired) == (
            1,
            1,
            {"status": 2},
        )
        ds.reset_stats()
        assert ds.stats("crm").requests_total == 0
        with pytest.raises(KeyError):
            ds.stats("nope")
        with pytest.raises(ValueError, match="unknown fault kind"):
            ds.set_fault("crm", "melt")  # type: ignore[arg-type]
        pid = ds.pid
    assert _gone(pid)


def test_spawn_downstream_mtls_client_certificates() -> None:
    spec = ServiceSpec(require_auth=False, mtls=True)
    with spawn_downstream({"vault": spec}, tls=True) as ds:
        cert, key = ds.client_cert("acme")
        assert os.path.exists(cert)
        assert os.path.exists(key)
        with httpx.Client(verify=ds.client_ssl_context("acme")) as client:
            assert client.get(ds.url("vault") + "/anything").json()["tenant"] == "acme"


def _serve(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "toolpool.testing", "serve", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_serve_prints_one_json_line_and_stops_on_sigterm() -> None:
    proc = _serve(
        "--service",
        "crm:token_latency=0",
        "--service",
        "search:require_auth=false,concurrency_limit=30",
        "--latency",
        "0.005",
        "--register-client",
        "crm:acme-app:s3cret:acme",
        "--loop",
        "asyncio",
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["pid"] == proc.pid
        assert set(info["services"]) == {"crm", "search"}
        assert info["ca_pem_path"] is None
        crm = info["services"]["crm"]
        assert crm["token_url"] == crm["url"] + "/oauth/token"
        response = httpx.post(
            crm["token_url"], data={"grant_type": "client_credentials"}, auth=("acme-app", "s3cret")
        )
        assert response.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert proc.stdout.read() == b""  # exactly one line
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_serve_stops_when_stdin_closes() -> None:
    proc = _serve("--service", "api:require_auth=false", "--tls")
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        info = json.loads(proc.stdout.readline())
        assert os.path.exists(info["ca_pem_path"])
        proc.stdin.close()
        assert proc.wait(timeout=15) == 0
        assert not os.path.exists(info["ca_pem_path"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_serve_rejects_bad_options() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "toolpool.testing", "serve", "--service", "api:colour=blue"],
        capture_output=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode != 0
    assert b"colour" in result.stderr
    assert result.stdout == b""


_seconds = st.floats(min_value=0, max_value=1e4, allow_nan=False, allow_infinity=False)


@given(
    service_time=_seconds | st.tuples(_seconds, _seconds).map(lambda t: (min(t), max(t))),
    concurrency_limit=st.none() | st.integers(min_value=1, max_value=10_000),
    keepalive_timeout=st.floats(min_value=1e-3, max_value=1e4),
    require_auth=st.booleans(),
    token_latency=_seconds,
    token_ttl=_seconds,
    mtls=st.booleans(),
)
def test_service_spec_text_form_round_trips(**fields: object) -> None:
    spec = ServiceSpec(**fields)  # type: ignore[arg-type]
    assert ServiceSpec.from_text(spec.to_text()) == spec


def test_bench_measures_throughput_and_the_server_counts_every_request() -> None:
    result = measure(connections=4, seconds=0.5, server_loop="auto")
    assert result.requests > 100
    assert result.errors == 0
    assert result.server_requests == result.requests  # exact across processes
    assert result.requests_per_second > 0
