"""Helpers of the core pool's tests: a Destination for a test-bed service (trusting its CA
under TLS), an AuthContext per tenant, and the check that no request leaked a connection."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import toolpool
from toolpool.testing import Downstream


def destination(ds: Downstream, name: str = "api", **kwargs: Any) -> toolpool.Destination:
    """A Destination for service `name` of `ds` (trusting its CA when it runs TLS). For a
    service that refuses HTTP/2 (`ServiceSpec(http2=False)`) the destination is HTTP/1.1
    (`http2=False`): no ALPN probe, so its counts are HTTP/1.1's alone (the fallback from the
    default is tested in tests/http2)."""
    if ds.tls:
        kwargs.setdefault("verify", ds.ca_pem_path)
    if not ds.specs[name].http2:
        kwargs.setdefault("http2", False)
    return toolpool.Destination(name, ds.url(name), **kwargs)


def speaks_h2(ds: Downstream, name: str = "api") -> bool:
    """Whether a pool on its defaults speaks HTTP/2 to service `name` of `ds`: it offers h2
    by ALPN on TLS (plain http:// is HTTP/1.1), and the service's server accepts it."""
    return ds.tls and ds.specs[name].http2


def tenant(name: str) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=name)


def assert_quiet(pool: toolpool.Pool) -> None:
    """Nothing in use, opening or waiting: no request leaked a connection."""
    for stats in pool.stats().values():
        assert (stats.in_use, stats.opening, stats.waiting) == (0, 0, 0), stats


async def assert_quiet_soon(pool: toolpool.Pool, timeout: float = 5.0) -> None:
    """`assert_quiet`, allowing for HTTP/2: the permit of a stream cancelled in flight comes
    back once the server has read its RST_STREAM (a PING round trip), not at once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((s.in_use, s.opening, s.waiting) == (0, 0, 0) for s in pool.stats().values()):
            break
        await asyncio.sleep(0.01)
    assert_quiet(pool)
