"""The token endpoint (client credentials, RFC 8693 exchange) and bearer checks on API routes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from toolpool.testing import Downstream, ServiceSpec

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
FAST = ServiceSpec(token_latency=0.0)


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream({"crm": FAST, "erp": FAST}) as d:
        d.register_client("crm", client_id="acme-app", client_secret="s3cret", tenant="acme")
        d.register_client("crm", client_id="beta-app", client_secret="b3ta", tenant="beta")
        d.register_client("erp", client_id="acme-app", client_secret="s3cret", tenant="acme")
        yield d


def _token(client: httpx.Client, ds: Downstream, service: str, **form: str) -> httpx.Response:
    return client.post(ds.token_url(service), data=form)


def _cc(client: httpx.Client, ds: Downstream, service: str = "crm", app: str = "acme-app") -> str:
    secret = {"acme-app": "s3cret", "beta-app": "b3ta"}[app]
    response = _token(
        client, ds, service, grant_type="client_credentials", client_id=app, client_secret=secret
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _get(client: httpx.Client, url: str, token: str | None) -> httpx.Response:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    return client.get(url + "/anything", headers=headers)


def test_client_credentials_in_form_and_basic_auth(ds: Downstream) -> None:
    with httpx.Client() as client:
        form = _token(
            client,
            ds,
            "crm",
            grant_type="client_credentials",
            client_id="acme-app",
            client_secret="s3cret",
        ).json()
        assert form["token_type"] == "Bearer"
        assert form["expires_in"] == 3600
        basic = client.post(
            ds.token_url("crm"),
            data={"grant_type": "client_credentials"},
            auth=("acme-app", "s3cret"),
        )
        assert basic.status_code == 200
        assert basic.headers["cache-control"] == "no-store"
        info = _get(client, ds.url("crm"), basic.json()["access_token"]).json()
        assert (info["tenant"], info["client_id"], info["subject"]) == ("acme", "acme-app", None)


@pytest.mark.parametrize(
    ("client_id", "secret"), [("acme-app", "wrong"), ("nobody", "s3cret"), ("acme-app", "")]
)
def test_unknown_client_or_wrong_secret_is_401_invalid_client(
    ds: Downstream, client_id: str, secret: str
) -> None:
    with httpx.Client() as client:
        response = _token(
            client,
            ds,
            "crm",
            grant_type="client_credentials",
            client_id=client_id,
            client_secret=secret,
        )
        assert (response.status_code, response.json()) == (401, {"error": "invalid_client"})
        basic = client.post(
            ds.token_url("crm"), data={"grant_type": "client_credentials"}, auth=(client_id, secret)
        )
        assert basic.status_code == 401
        assert basic.headers["www-authenticate"].startswith("Basic")
    assert ds.stats("crm").token_requests_by_tenant == {}


def test_grant_errors(ds: Downstream) -> None:
    with httpx.Client() as client:
        assert _token(client, ds, "crm", grant_type="client_credentials").status_code == 401
        bad = _token(client, ds, "crm", grant_type="password")
        assert (bad.status_code, bad.json()["error"]) == (400, "unsupported_grant_type")
        assert client.get(ds.token_url("crm")).status_code == 405


def test_token_exchange_with_subject_token(ds: Downstream) -> None:
    subject_token = ds.subject_token(tenant="acme", subject="u1")
    with httpx.Client() as client:
        response = _token(
            client,
            ds,
            "erp",
            grant_type=EXCHANGE,
            subject_token=subject_token,
            subject_token_type=ACCESS,
        )
        assert response.status_code == 200
        grant = response.json()
        assert grant["issued_token_type"] == ACCESS
        info = _get(client, ds.url("erp"), grant["access_token"]).json()
        assert (info["tenant"], info["subject"]) == ("acme", "u1")
        unknown = _token(
            client, ds, "erp", grant_type=EXCHANGE, subject_token="x", subject_token_type=ACCESS
        )
        assert (unknown.status_code, unknown.json()["error"]) == (400, "invalid_grant")
        wrong_type = _token(
            client,
            ds,
            "erp",
            grant_type=EXCHANGE,
            subject_token=subject_token,
            subject_token_type="urn:ietf:params:oauth:token-type:id_token",
        )
        assert (wrong_type.status_code, wrong_type.json()["error"]) == (400, "invalid_request")
        bad_client = _token(
            client,
            ds,
            "erp",
            grant_type=EXCHANGE,
            subject_token=subject_token,
            subject_token_type=ACCESS,
            client_id="acme-app",
            client_secret="nope",
        )
        assert bad_client.status_code == 401
    assert ds.stats("erp").token_requests_by_tenant == {"acme": 1}


def test_api_needs_a_live_token_of_this_service(ds: Downstream) -> None:
    with httpx.Client() as client:
        crm_token = _cc(client, ds, "crm")
        assert _get(client, ds.url("crm"), crm_token).status_code == 200
        for url, token in [
            (ds.url("crm"), None),
            (ds.url("crm"), "tb-access-forged"),
            (ds.url("erp"), crm_token),  # issued by another service
        ]:
            response = _get(client, url, token)
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        basic = client.get(ds.url("crm") + "/anything", auth=("acme-app", "s3cret"))
        assert basic.status_code == 401
    assert ds.stats("crm").http_401 == 3
    assert ds.stats("erp").http_401 == 1


def test_revoke_all_or_one_tenant(ds: Downstream) -> None:
    with httpx.Client() as client:
        acme, beta = _cc(client, ds, app="acme-app"), _cc(client, ds, app="beta-app")
        assert ds.revoke_tokens("crm", tenant="acme") == 1
        assert _get(client, ds.url("crm"), acme).status_code == 401
        assert _get(client, ds.url("crm"), beta).status_code == 200
        fresh = _cc(client, ds, app="acme-app")
        assert _get(client, ds.url("crm"), fresh).status_code == 200
        assert ds.revoke_tokens("crm") == 2
        assert _get(client, ds.url("crm"), beta).status_code == 401
        assert _get(client, ds.url("crm"), fresh).status_code == 401


def test_tokens_expire_after_token_ttl() -> None:
    with Downstream({"crm": ServiceSpec(token_latency=0.0, token_ttl=0.3)}) as ds:
        ds.register_client("crm", client_id="app", client_secret="s", tenant="acme")
        with httpx.Client() as client:
            grant = client.post(
                ds.token_url("crm"), data={"grant_type": "client_credentials"}, auth=("app", "s")
            ).json()
            issued = time.monotonic()
            assert grant["expires_in"] == 0.3
            assert _get(client, ds.url("crm"), grant["access_token"]).status_code == 200
            time.sleep(max(0.0, issued + 0.35 - time.monotonic()))  # strictly past the ttl
            assert _get(client, ds.url("crm"), grant["access_token"]).status_code == 401


async def test_token_latency_is_applied_and_does_not_block_other_requests() -> None:
    async with Downstream({"idp": ServiceSpec(token_latency=1.0, require_auth=False)}) as ds:
        ds.register_client("idp", client_id="app", client_secret="s", tenant="acme")
        async with httpx.AsyncClient() as client:
            started = time.monotonic()

            async def token() -> float:
                form = {"grant_type": "client_credentials"}
                response = await client.post(ds.token_url("idp"), data=form, auth=("app", "s"))
                assert response.status_code == 200
                return time.monotonic() - started

            async def api() -> float:
                assert (await client.get(ds.url("idp") + "/anything")).status_code == 200
                return time.monotonic() - started

            token_elapsed, api_elapsed = await asyncio.gather(token(), api())
    assert token_elapsed >= 1.0
    # Served while the token request waited on its timer: a server that blocked on it would
    # answer the API request after the token, however fast or slow the machine.
    assert api_elapsed < token_elapsed


def test_counts_token_requests_per_tenant_and_records_connection_tenants(ds: Downstream) -> None:
    with httpx.Client() as acme_client, httpx.Client() as beta_client:
        for _ in range(3):
            _cc(acme_client, ds, app="acme-app")
        token = _cc(beta_client, ds, app="beta-app")
        _get(beta_client, ds.url("crm"), token)
    stats = ds.stats("crm")
    assert stats.token_requests == 4
    assert stats.token_requests_by_tenant == {"acme": 3, "beta": 1}
    assert sorted(stats.connection_tenants.values(), key=sorted) == [
        frozenset({"acme"}),
        frozenset({"beta"}),
    ]
    assert stats.mixed_connections() == {}


def test_a_connection_carrying_two_tenants_is_visible(ds: Downstream) -> None:
    with httpx.Client() as client:  # one connection, two tenants: what the pool must never do
        acme, beta = _cc(client, ds, app="acme-app"), _cc(client, ds, app="beta-app")
        _get(client, ds.url("crm"), acme)
        _get(client, ds.url("crm"), beta)
    mixed = ds.stats("crm").mixed_connections()
    assert list(mixed.values()) == [frozenset({"acme", "beta"})]


def test_secrets_and_tokens_never_show_in_reprs(ds: Downstream) -> None:
    with httpx.Client() as client:
        token = _cc(client, ds)
    service = ds._service("crm")
    texts = [repr(ds), repr(service.tokens), repr(service.tokens._clients), repr(ds.stats("crm"))]
    for text in texts:
        assert "s3cret" not in text
        assert token not in text
