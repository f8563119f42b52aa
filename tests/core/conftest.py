"""Fixtures for the core pool's tests: test-bed downstreams, plain and TLS (the helpers that
are not fixtures live in tests/_support/pools.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture(params=["plain", "tls"])
def downstream(request: pytest.FixtureRequest) -> Iterator[Downstream]:
    """One open service ("api", no auth: the tenant comes from X-Tenant), plain and TLS."""
    with Downstream({"api": ServiceSpec(require_auth=False)}, tls=request.param == "tls") as ds:
        yield ds


@pytest.fixture
def plain() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        yield ds
