"""Fixtures of the resilience tests: loopback downstreams, and a guard that closing a pool
stops its policy timers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._support.resilience_probes import eventually_sync, resilience_threads
from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture
def ds() -> Iterator[Downstream]:
    """Two open services on 127.0.0.1 (the tenant of a request is its X-Tenant header)."""
    specs = {"crm": ServiceSpec(require_auth=False), "search": ServiceSpec(require_auth=False)}
    with Downstream(specs) as downstream:
        yield downstream


@pytest.fixture(autouse=True)
def no_leaked_timers() -> Iterator[None]:
    """Closing a pool stops the policy timers (breaker rests, Retry-After pauses)."""
    yield
    eventually_sync(lambda: not resilience_threads(), "policy timers stopped", timeout=5.0)
