"""Fixtures for the core pool's tests: test-bed downstreams, plain and TLS (the helpers that
are not fixtures live in tests/_support/pools.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture(params=["plain", "tls-http1.1", "tls-h2"])
def downstream(request: pytest.FixtureRequest) -> Iterator[Downstream]:
    """One open service ("api", no auth: the tenant comes from X-Tenant): plain HTTP, TLS on
    HTTP/1.1 (the server refuses h2, the destination has `http2=False`: see
    `tests._support.pools.destination`), and TLS on HTTP/2 (the pool's default where the
    server offers it)."""
    spec = ServiceSpec(require_auth=False, http2=request.param == "tls-h2")
    with Downstream({"api": spec}, tls=request.param != "plain") as ds:
        yield ds


@pytest.fixture
def plain() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as ds:
        yield ds
