"""Fixtures for the pool service tests: a test-bed downstream with an OAuth-protected `crm`
(one client per tenant) and an open `search`, and service configs pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._support.pool_service import ServiceThread, service_config, write_config
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


@pytest.fixture
def service(ds: Downstream, tmp_path: Path) -> Iterator[ServiceThread]:
    with ServiceThread(write_config(tmp_path, service_config(ds))) as svc:
        yield svc
