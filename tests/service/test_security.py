"""The service is no open proxy: a table of attempts to reach anything outside the allowlist,
each refused before any connection is made (a connect spy records every outgoing connect of
this process and refuses non-loopback ones), plus header stripping and size limits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._support.pool_service import (
    AGENT_A_TOKEN,
    AGENT_B_TOKEN,
    ConnectSpy,
    ServiceThread,
    raw_request,
    service_config,
    sha256,
    write_config,
)
from toolpool.service._security import check_path, request_headers, response_headers, split_target
from toolpool.testing import Downstream

AGENT_C_TOKEN = "agent-c-any-tenant-0123456789"
AGENT_C = f"""
[agents.agent-c]
token_sha256 = "{sha256(AGENT_C_TOKEN)}"
tenants = ["*"]
"""


@pytest.fixture
def guarded(ds: Downstream, tmp_path: Path) -> Iterator[tuple[ServiceThread, ConnectSpy]]:
    spy = ConnectSpy()
    with (
        spy.installed(),
        ServiceThread(write_config(tmp_path, service_config(ds, extra=AGENT_C))) as svc,
    ):
        yield svc, spy


def _req(target: str, *headers: str, method: str = "GET", host: str = "127.0.0.1") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *([f"Host: {host}"] if host else []), *headers]
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1")


B = f"Authorization: Bearer {AGENT_B_TOKEN}"
TENANT = "X-Toolpool-Tenant: acme"

# (what, request bytes, expected status, expected X-Toolpool-Error; None: refused by h11)
ATTEMPTS = [
    (
        "absolute-form to metadata",
        _req("http://169.254.169.254/latest/meta-data/", B, TENANT),
        400,
        "bad_target",
    ),
    (
        "absolute-form to our own path",
        _req("http://127.0.0.1/d/search/anything", B, TENANT),
        400,
        "bad_target",
    ),
    (
        "absolute-form https",
        _req("https://169.254.169.254/d/search/x", B, TENANT),
        400,
        "bad_target",
    ),
    (
        "authority-form CONNECT",
        _req("169.254.169.254:80", B, TENANT, method="CONNECT"),
        400,
        "bad_target",
    ),
    (
        "metadata as destination name",
        _req("/d/169.254.169.254/latest/meta-data", B, TENANT),
        404,
        "unknown_destination",
    ),
    (
        "unlisted destination",
        _req("/d/metadata/computeMetadata/v1/", B, TENANT),
        404,
        "unknown_destination",
    ),
    (
        "userinfo trick in name",
        _req("/d/search@169.254.169.254/x", B, TENANT),
        404,
        "unknown_destination",
    ),
    ("percent-encoded name", _req("/d/%73earch/anything", B, TENANT), 404, "unknown_destination"),
    ("dot-dot out of a destination", _req("/d/search/../crm/anything", B, TENANT), 400, "bad_path"),
    ("encoded dot-dot", _req("/d/search/%2e%2e/crm/anything", B, TENANT), 400, "bad_path"),
    ("double-encoded dot-dot", _req("/d/search/%252e%252e/crm", B, TENANT), 400, "bad_path"),
    ("encoded slash", _req("/d/search/a/..%2fcrm", B, TENANT), 400, "bad_path"),
    ("encoded backslash", _req("/d/search/%5c..%5ccrm", B, TENANT), 400, "bad_path"),
    ("dot-dot with params", _req("/d/search/..;/crm", B, TENANT), 400, "bad_path"),
    (
        "network-path reference",
        _req("/d/search//169.254.169.254/latest", B, TENANT),
        400,
        "bad_path",
    ),
    (
        "Host of the metadata service",
        _req("/d/search/anything", B, TENANT, host="169.254.169.254"),
        421,
        "host_not_allowed",
    ),
    (
        "Host with userinfo",
        _req("/d/search/x", B, TENANT, host="127.0.0.1@169.254.169.254"),
        421,
        "host_not_allowed",
    ),
    (
        "two Host headers",
        _req("/d/search/x", "Host: 169.254.169.254", B, TENANT),
        400,
        None,
    ),  # h11 refuses it
    ("no agent token", _req("/d/search/anything", TENANT), 401, "unauthenticated"),
    (
        "wrong agent token",
        _req("/d/search/anything", "Authorization: Bearer not-a-real-agent-token", TENANT),
        401,
        "unauthenticated",
    ),
    (
        "two agent tokens",
        _req("/d/search/anything", B, f"Authorization: Bearer {AGENT_A_TOKEN}", TENANT),
        401,
        "unauthenticated",
    ),
    (
        "tenant the agent may not act for",
        _req(
            "/d/crm/anything", f"Authorization: Bearer {AGENT_A_TOKEN}", "X-Toolpool-Tenant: globex"
        ),
        403,
        "forbidden_tenant",
    ),
    (
        "tenant without downstream credentials",
        _req(
            "/d/crm/anything",
            f"Authorization: Bearer {AGENT_C_TOKEN}",
            "X-Toolpool-Tenant: initech",
        ),
        403,
        "forbidden_tenant",
    ),
    ("no tenant, several allowed", _req("/d/search/anything", B), 400, "missing_tenant"),
    (
        "malformed tenant",
        _req("/d/search/anything", B, "X-Toolpool-Tenant: acme/../globex"),
        400,
        "bad_tenant",
    ),
    ("TRACE", _req("/d/search/anything", B, TENANT, method="TRACE"), 405, "method_not_allowed"),
    (
        "body over max_request_body",
        _req("/d/search/anything", B, TENANT, "Content-Length: 2000000", method="POST"),
        413,
        "request_too_large",
    ),
]


def test_every_attempt_outside_the_allowlist_is_refused_before_any_connect(
    guarded: tuple[ServiceThread, ConnectSpy], ds: Downstream
) -> None:
    svc, spy = guarded
    downstream_ports = {int(ds.url(n).rsplit(":", 1)[1]) for n in ("crm", "search")}

    def pool_connects() -> int:
        return sum(1 for host, port in spy.attempts if port != svc.port)

    before = pool_connects()
    for what, data, status, code in ATTEMPTS:
        got, headers, body = raw_request(svc.port, data)
        assert (got, headers.get("x-toolpool-error")) == (status, code), (what, got, body)
        if code is not None:
            assert json.loads(body)["error"] == code, what
        assert pool_connects() == before, f"{what}: a connection was attempted"
    assert spy.refused == []
    assert all(port in downstream_ports or port == svc.port for _, port in spy.attempts)
    # The pool only ever knew the configured destinations, and opened nothing.
    pool = svc.app.pool
    assert pool is not None
    assert sorted(pool.destinations) == ["crm", "search"]
    assert all(s.created_total == 0 for s in pool.stats().values())
    assert ds.stats("search").requests_total == 0 and ds.stats("crm").requests_total == 0
    # A legitimate request right after goes through (the refusals were not a broken service).
    got, _, body = raw_request(svc.port, _req("/d/search/anything", B, TENANT))
    assert got == 200 and json.loads(body)["tenant"] == "acme"


def test_hop_by_hop_headers_and_the_agents_credentials_never_cross(
    service: ServiceThread, ds: Downstream
) -> None:
    headers = {
        "Authorization": f"Bearer {AGENT_B_TOKEN}",
        "X-Toolpool-Tenant": "globex",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic c2VjcmV0",
        "TE": "trailers",
        "X-Forwarded-For": "169.254.169.254",
        "Forwarded": "for=169.254.169.254",
        "X-Tenant": "acme",  # a forged tenant for the downstream: replaced by the service
        "X-Custom": "kept",
    }
    r = httpx.post(service.url + "/d/search/echo", headers=headers, content=b"payload")
    assert r.status_code == 200, r.text
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    for gone in (
        "authorization",
        "x-toolpool-tenant",
        "x-drop-me",
        "keep-alive",
        "proxy-authorization",
        "te",
        "x-forwarded-for",
        "forwarded",
    ):
        assert gone not in seen, gone
    assert seen["x-custom"] == "kept"
    assert seen["x-tenant"] == "globex"
    assert seen["host"] == ds.url("search").split("://", 1)[1]
    assert r.json()["body"] == "payload"
    # On the OAuth destination the downstream sees the service's token for the tenant, never
    # the agent's: the credential is applied by the service.
    r = httpx.get(
        service.url + "/d/crm/echo",
        headers={"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "globex"},
    )
    auth = r.json()["headers"]["authorization"]
    assert r.json()["tenant"] == "globex"
    assert auth.startswith("Bearer ") and AGENT_B_TOKEN not in auth


def test_streamed_body_over_the_limit_is_cut_and_never_reaches_the_downstream(
    service: ServiceThread, ds: Downstream
) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536  # 2.5 MiB, over the 1 MiB limit, chunked

    headers = {"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "acme"}
    with httpx.Client() as client:
        try:
            r = client.post(service.url + "/d/search/anything", headers=headers, content=chunks())
        except httpx.HTTPError:
            r = None  # the service may answer 413 and close before the upload finished
    if r is not None:
        assert r.status_code == 413 and r.headers["x-toolpool-error"] == "request_too_large"
    assert ds.stats("search").requests_total == 0
    # A body within the limit goes through, streamed (chunked) to the downstream.
    r = httpx.post(
        service.url + "/d/search/echo",
        headers=headers,
        content=iter([b"a" * 1000, b"b" * 1000]),
    )
    assert r.status_code == 200 and r.json()["body"] == "a" * 1000 + "b" * 1000
    assert r.json()["headers"].get("transfer-encoding") == "chunked"


def test_response_over_the_limit_is_refused(service: ServiceThread) -> None:
    headers = {"Authorization": f"Bearer {AGENT_B_TOKEN}", "X-Toolpool-Tenant": "acme"}
    r = httpx.get(service.url + "/d/search/bytes?n=2000000", headers=headers)
    assert r.status_code == 502 and r.headers["x-toolpool-error"] == "response_too_large"
    r = httpx.get(service.url + "/d/search/bytes?n=1000", headers=headers)
    assert r.status_code == 200 and len(r.content) == 1000


@pytest.mark.parametrize(
    "rest",
    [
        b"/a/../b",
        b"/./a",
        b"/a/%2E%2e/b",
        b"/%25252e%25252e/x",
        b"/a%00b",
        b"/a//b",
        b"/a\\b",
        b"/..;x/y",
    ],
)
def test_check_path_refuses(rest: bytes) -> None:
    assert check_path(rest) is not None


@pytest.mark.parametrize(
    "rest", [b"", b"/", b"/a/b/", b"/a.b/..c/c..", b"/%7euser/x%20y", b"/a;v=1/b"]
)
def test_check_path_allows(rest: bytes) -> None:
    assert check_path(rest) is None


def test_split_target_and_header_filters() -> None:
    assert split_target(b"/d/crm/x/y") == ("crm", b"/x/y")
    assert split_target(b"/d/crm") == ("crm", b"")
    assert split_target(b"http://h/d/crm/x") != ("crm", b"/x")
    kept = request_headers(
        [(b"Connection", b"x-a"), (b"X-A", b"1"), (b"X-Toolpool-Tenant", b"t"), (b"Accept", b"*/*")]
    )
    assert kept == [(b"Accept", b"*/*")]
    back = response_headers(
        [(b"x-toolpool-error", b"saturated"), (b"Transfer-Encoding", b"chunked"), (b"ETag", b"1")]
    )
    assert back == [(b"ETag", b"1")]
