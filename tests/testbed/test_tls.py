"""TLS and mutual TLS: certificates from the test CA, tenant = client certificate CN."""

from __future__ import annotations

import os
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from toolpool.testing import Downstream, LoopName, ServiceSpec

OPEN = ServiceSpec(require_auth=False)
MTLS = ServiceSpec(require_auth=False, mtls=True)


def test_tls_service_is_https_and_trusts_only_the_test_ca() -> None:
    with Downstream({"api": OPEN}, tls=True) as ds:
        assert ds.url("api").startswith("https://127.0.0.1:")
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            assert client.get(ds.url("api") + "/anything").status_code == 200
        from_file = ssl.create_default_context(cafile=ds.ca_pem_path)
        port = ds.address("api")[1]
        with httpx.Client(verify=from_file) as client:  # the name "localhost" is valid too
            assert client.get(f"https://localhost:{port}/anything").status_code == 200
        with httpx.Client() as client, pytest.raises(httpx.ConnectError):
            client.get(ds.url("api") + "/anything")  # the system trust store does not know it
        ca_path = ds.ca_pem_path
        assert os.path.exists(ca_path)
    assert not os.path.exists(ca_path)  # the Downstream removes its files


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_mtls_identifies_the_tenant_by_certificate_common_name(loop: LoopName) -> None:
    with Downstream({"api": MTLS}, tls=True, loop=loop) as ds:
        url = ds.url("api") + "/anything"
        for tenant in ("acme", "beta"):
            with httpx.Client(verify=ds.client_ssl_context(tenant)) as client:
                infos = [client.get(url).json() for _ in range(2)]
            assert [i["tenant"] for i in infos] == [tenant, tenant]
        stats = ds.stats("api")
        assert sorted(stats.connection_tenants.values(), key=sorted) == [
            frozenset({"acme"}),
            frozenset({"beta"}),
        ]


def test_mtls_refuses_a_client_without_certificate() -> None:
    with Downstream({"api": MTLS}, tls=True) as ds:
        with httpx.Client(verify=ds.client_ssl_context()) as client:
            with pytest.raises(httpx.TransportError):
                client.get(ds.url("api") + "/anything")
        with httpx.Client(verify=ds.client_ssl_context("acme")) as client:
            assert client.get(ds.url("api") + "/anything").status_code == 200
        # Only the completed handshake became a connection.
        assert ds.stats("api").connections_accepted == 1


def test_client_cert_files_carry_the_tenant_as_common_name() -> None:
    with Downstream({"api": MTLS}, tls=True) as ds:
        cert_path, key_path = ds.client_cert("acme")
        assert ds.client_cert("acme") == (cert_path, key_path)  # issued once
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "acme"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(ds.ca_pem_path)
        ctx.load_cert_chain(cert_path, key_path)
        with httpx.Client(verify=ctx) as client:
            assert client.get(ds.url("api") + "/anything").json()["tenant"] == "acme"


def test_mtls_with_auth_binds_the_token_to_the_certificate_tenant() -> None:
    with Downstream({"api": ServiceSpec(mtls=True, token_latency=0.0)}, tls=True) as ds:
        url = ds.url("api")
        grant = {"grant_type": "client_credentials"}
        with httpx.Client(verify=ds.client_ssl_context("acme")) as acme:
            # RFC 8705 tls_client_auth: the certificate alone authenticates the client.
            token = acme.post(ds.token_url("api"), data=grant).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            assert acme.get(url + "/anything", headers=auth).json()["tenant"] == "acme"
        with httpx.Client(verify=ds.client_ssl_context("beta")) as beta:
            assert beta.get(url + "/anything", headers=auth).status_code == 401


def test_tls_surface_needs_tls() -> None:
    with pytest.raises(ValueError, match="tls=True"):
        Downstream({"api": MTLS})
    with Downstream({"api": OPEN}) as ds:
        with pytest.raises(RuntimeError, match="plain HTTP"):
            ds.ca_pem_path  # noqa: B018
        with pytest.raises(RuntimeError, match="plain HTTP"):
            ds.client_ssl_context()
