"""Helpers of the core pool's tests: a Destination for a test-bed service (trusting its CA
under TLS), an AuthContext per tenant, and the check that no request leaked a connection."""

from __future__ import annotations

from typing import Any

import toolpool
from toolpool.testing import Downstream


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
