"""Fixtures of the test-bed tests: a raw HTTP/1.1 socket client, and a thread-leak guard."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests._support.raw_http import RawClient


@pytest.fixture
def raw() -> Iterator[RawClient]:
    client = RawClient()
    yield client
    client.close_all()


def _testbed_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("toolpool-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Every Downstream / LatencyRelay started by a test is stopped and joined by its end."""
    before = set(_testbed_threads())
    yield
    leaked = [t for t in _testbed_threads() if t not in before]
    assert not leaked, f"threads left running: {leaked}"
