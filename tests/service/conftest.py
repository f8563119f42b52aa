"""Fixtures for the pool service tests: a test-bed downstream with an OAuth-protected `crm`
(one client per tenant) and an open `search`, and service configs pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service.support import ServiceThread, write_config
from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture
def ds() -> Iterator[Downstream]:
    services = {
        "crm": ServiceSpec(token_latency=0.0),
        "search": ServiceSpec(require_auth=False),
    }
    with Downstream(services) as downstream:
        downstream.register_client(
            "crm", client_id="acme-app", client_secret="acme-downstream-secret", tenant="acme"
        )
        downstream.register_client(
            "crm", client_id="globex-app", client_secret="globex-downstream-secret", tenant="globex"
        )
        yield downstream


def service_config(
    ds: Downstream,
    *,
    crm_cap: int = 4,
    search_cap: int = 8,
    service: str = "",
    extra: str = "",
    search_extra: str = "",
    crm_extra: str = "",
) -> str:
    """A config for `ds`: crm with OAuth per tenant, search open (tenant forwarded as X-Tenant),
    agent-a (acme only) and agent-b (acme and globex)."""
    return f"""
[service]
allowed_hosts = ["127.0.0.1", "localhost"]
max_request_body = 1048576
max_response_body = 1048576
{service}

[pool]
warmup = 0.0
# Counted tests: no retries or adaptive limit between the service and the test bed (the
# suite also passes with "default"; examples/toolpool.toml uses it).
policy = "off"

[destinations.crm]
url = "{ds.url("crm")}"
max_connections = {crm_cap}
{crm_extra}

[destinations.crm.auth]
type = "oauth2_client_credentials"
token_url = "{ds.token_url("crm")}"

[destinations.crm.auth.tenants.acme]
client_id = "acme-app"
client_secret_env = "CRM_ACME_SECRET"

[destinations.crm.auth.tenants.globex]
client_id = "globex-app"
client_secret_env = "CRM_GLOBEX_SECRET"

[destinations.search]
url = "{ds.url("search")}"
max_connections = {search_cap}
forward_tenant_as = "X-Tenant"
{search_extra}

[agents.agent-a]
token_env = "AGENT_A_TOKEN"
tenants = ["acme"]

[agents.agent-b]
token_env = "AGENT_B_TOKEN"
tenants = ["acme", "globex"]
{extra}
"""


@pytest.fixture
def service(ds: Downstream, tmp_path: Path) -> Iterator[ServiceThread]:
    with ServiceThread(write_config(tmp_path, service_config(ds))) as svc:
        yield svc
