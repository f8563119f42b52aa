"""Fixtures of the LangChain adapter tests: a loopback downstream and a pool in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

import toolpool
from tests._support.langchain_tools import make_pool
from toolpool.testing import Downstream, ServiceSpec


@pytest.fixture(scope="module")
def downstream() -> Iterator[Downstream]:
    """Two services on 127.0.0.1; a request's tenant is its X-Tenant header."""
    with Downstream(
        {"crm": ServiceSpec(require_auth=False), "search": ServiceSpec(require_auth=False)}
    ) as ds:
        yield ds


@pytest.fixture
def ds(downstream: Downstream) -> Downstream:
    downstream.reset_stats()
    return downstream


@pytest.fixture
async def pool(ds: Downstream) -> AsyncIterator[toolpool.Pool]:
    p = make_pool(ds)
    async with p:
        yield p
