"""Every downstream auth type of the config, end to end over TLS, with the service itself on
HTTPS: a bearer token per tenant, an mTLS client certificate per tenant, one shared API key.
The downstream identifies each request's tenant from what the service applied. Both with the
service's pool on HTTP/2 (`[pool] http2 = true`) and on HTTP/1.1."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest
import trustme

import toolpool
from tests._support.pool_service import AGENT_B_TOKEN, SERVICE_ENV, ServiceThread, write_config
from toolpool.testing import Downstream, ServiceSpec


@pytest.mark.parametrize("http2", [True, False], ids=["http2", "http1"])
def test_bearer_mtls_and_api_key_per_tenant_through_an_https_service(
    tmp_path: Path, http2: bool
) -> None:
    services = {
        "crm": ServiceSpec(token_latency=0.0),
        "ledger": ServiceSpec(mtls=True, require_auth=False),
        "search": ServiceSpec(require_auth=False),
    }
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    crt, key, ca_path = tmp_path / "svc.crt", tmp_path / "svc.key", tmp_path / "svc-ca.pem"
    server.cert_chain_pems[0].write_to_path(str(crt))
    server.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_path))
    with Downstream(services, tls=True) as ds:
        tokens = {}
        for tenant in ("acme", "globex"):
            ds.register_client("crm", client_id=f"{tenant}-app", client_secret="s", tenant=tenant)
            grant = httpx.post(
                ds.token_url("crm"),
                data={"grant_type": "client_credentials"},
                auth=(f"{tenant}-app", "s"),
                verify=ds.client_ssl_context(),
            )
            tokens[tenant] = grant.json()["access_token"]
        ds.reset_stats()  # count only the service's connections from here
        certs = {t: ds.client_cert(t) for t in ("acme", "globex")}
        text = f"""
[service]
tls_cert_file = "{crt}"
tls_key_file = "{key}"

[pool]
warmup = 0.0
policy = "off"
http2 = {str(http2).lower()}
verify = "{ds.ca_pem_path}"

[destinations.crm]
url = "{ds.url("crm")}"
[destinations.crm.auth]
type = "bearer"
[destinations.crm.auth.tenants.acme]
token_env = "ACME_TOKEN"
[destinations.crm.auth.tenants.globex]
token_env = "GLOBEX_TOKEN"

[destinations.ledger]
url = "{ds.url("ledger")}"
[destinations.ledger.auth]
type = "mtls"
[destinations.ledger.auth.tenants.acme]
cert = ["{certs["acme"][0]}", "{certs["acme"][1]}"]
[destinations.ledger.auth.tenants.globex]
cert = ["{certs["globex"][0]}", "{certs["globex"][1]}"]

[destinations.search]
url = "{ds.url("search")}"
[destinations.search.auth]
type = "api_key"
header = "X-Api-Key"
key_env = "SEARCH_KEY"

[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
"""
        env = {
            **SERVICE_ENV,
            "ACME_TOKEN": tokens["acme"],
            "GLOBEX_TOKEN": tokens["globex"],
            "SEARCH_KEY": "search-key-123",
        }
        svc = ServiceThread(write_config(tmp_path, text), env=env)
        svc.verify = ssl.create_default_context(cafile=str(ca_path))
        with svc, toolpool.RemotePool(svc.url, token=AGENT_B_TOKEN, verify=str(ca_path)) as remote:
            assert svc.url.startswith("https://")
            with remote.sync_client() as client:
                for tenant in ("acme", "globex", "acme"):
                    with toolpool.auth_context(toolpool.AuthContext(tenant=tenant)):
                        crm = client.get(ds.url("crm") + "/anything").json()
                        ledger = client.get(ds.url("ledger") + "/anything").json()
                        search = client.get(ds.url("search") + "/echo").json()
                    assert (crm["tenant"], crm["client_id"]) == (tenant, f"{tenant}-app")
                    assert ledger["tenant"] == tenant  # the client certificate's CN
                    assert search["headers"]["x-api-key"] == "search-key-123"
            # Plain HTTP to an HTTPS service does not get through.
            plain = svc.url.replace("https://", "http://")
            try:
                status = httpx.get(plain + "/healthz").status_code
            except httpx.HTTPError:
                status = None
            assert status != 200
            metrics = httpx.get(svc.url + "/metrics", verify=svc.verify).text
        for name in ("crm", "ledger"):
            assert ds.stats(name).mixed_connections() == {}
        # Each destination speaks what /metrics says: all three HTTP/2 when it is on (the
        # mTLS one presenting each tenant's certificate on that tenant's h2 connection).
        spoken = {n: set(ds.stats(n).connection_protocols.values()) for n in services}
        said = {
            n: p
            for n in services
            for p in ("h2", "http/1.1")
            if f'toolpool_destination_protocol{{destination="{n}",protocol="{p}"}} 1.0' in metrics
        }
        assert {n: {p} for n, p in said.items()} == spoken
        expected = "h2" if http2 else "http/1.1"
        assert said == dict.fromkeys(services, expected)
