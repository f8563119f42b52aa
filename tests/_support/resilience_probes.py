"""Helpers of the resilience tests: waiting for a condition (never for a fixed time),
percentiles, a destination's policy runtime."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable

import pytest

import toolpool


async def eventually(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait until `predicate()` holds, checking every 5 ms; fail after a generous timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s: {what}")
        await asyncio.sleep(0.005)


def eventually_sync(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not reached within {timeout} s: {what}")
        time.sleep(0.005)


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def policy_of(pool: toolpool.Pool, name: str) -> toolpool.resilience.PolicyRuntime:
    runtime = pool.destination(name).policy
    assert isinstance(runtime, toolpool.resilience.PolicyRuntime)
    return runtime


def resilience_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("toolpool-resilience")]
