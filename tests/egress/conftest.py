"""Fixtures for the egress tests: the packet spy (installed around every test; a test fails
if anything tried to reach a non-loopback address), the test-only names, and a test bed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests._support.packet_spy import hostmap
from toolpool.testing import Downstream, HostMap, ServiceSpec


@pytest.fixture
def names() -> HostMap:
    return hostmap()


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}) as downstream:
        yield downstream
