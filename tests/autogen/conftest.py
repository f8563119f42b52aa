"""Fixtures for the AutoGen adapter's tests: telemetry off, a loopback downstream, a pool."""

from __future__ import annotations

import os

# Before anything imports an agent framework: nothing may phone home.
for _name, _value in {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "OTEL_SDK_DISABLED": "true",
    "ANONYMIZED_TELEMETRY": "false",
    "AUTOGEN_DISABLE_RUNTIME_TRACING": "true",
}.items():
    os.environ[_name] = _value

from collections.abc import AsyncIterator  # noqa: E402

import pytest  # noqa: E402

import toolpool  # noqa: E402
from toolpool.testing import Downstream, ServiceSpec  # noqa: E402


@pytest.fixture
async def downstream() -> AsyncIterator[Downstream]:
    """One open service "crm" (no auth: the tenant comes from the X-Tenant header)."""
    async with Downstream({"crm": ServiceSpec(require_auth=False)}) as ds:
        yield ds


@pytest.fixture
async def pool(downstream: Downstream) -> AsyncIterator[toolpool.Pool]:
    """A pool with the downstream's "crm" service as destination "crm"."""
    async with toolpool.Pool([toolpool.Destination("crm", downstream.url("crm"))]) as p:
        yield p
