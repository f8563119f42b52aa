"""Fixtures for the core pool's tests: test-bed downstreams and pools pointed at them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import toolpool
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


def destination(ds: Downstream, name: str = "api", **kwargs: Any) -> toolpool.Destination:
    """A Destination for service `name` of `ds` (trusting its CA when it runs TLS)."""
    if ds.tls:
        kwargs.setdefault("verify", ds.ca_pem_path)
    return toolpool.Destination(name, ds.url(name), **kwargs)


def tenant(name: str) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=name)


def assert_quiet(pool: toolpool.Pool) -> None:
    """Nothing in use, opening or waiting: no request leaked a connection."""
    for stats in pool.stats().values():
        assert (stats.in_use, stats.opening, stats.waiting) == (0, 0, 0), stats
