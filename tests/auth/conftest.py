"""Fixtures for the auth registry tests: a TLS test bed with registered OAuth clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._support.oauth_tenants import TENANTS, register
from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture
def crm() -> Iterator[Downstream]:
    """One TLS service "crm" that requires its own bearer tokens; quick token endpoint."""
    with Downstream({"crm": ServiceSpec(token_latency=0.01)}, tls=True) as ds:
        register(ds, "crm", TENANTS)
        yield ds
