"""The pool's admission API (`Pool.saturation`, `admit`, `admit_sync`, `on_saturation`):
find a destination's policy runtime, binding `Policy.off()` to one that runs without a
policy, and keep the pool's saturation subscribers."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from toolpool._config import origin_of
from toolpool.resilience._admission import Saturation, SaturationHub
from toolpool.resilience._gate import AsyncAdmission, SyncAdmission
from toolpool.resilience._policy import Policy
from toolpool.resilience._runtime import PolicyRuntime

if TYPE_CHECKING:
    from toolpool._pool import Pool
    from toolpool._runtime import DestinationPool

__all__ = ["admit", "admit_sync", "on_saturation", "runtime_for", "runtime_of", "saturation"]


def _destination(pool: Pool, destination: str) -> DestinationPool:
    try:
        return pool.destination(destination)
    except KeyError:
        # An origin not seen yet: the pool creates its destination on first use, and so
        # does admission (or raises UnknownDestination when the pool rejects unknown ones).
        try:
            origin = origin_of(destination)
        except Exception:
            raise KeyError(
                f"no destination named or located at {destination!r} "
                f"(known: {', '.join(pool.destinations) or 'none'})"
            ) from None
        if origin[0] not in ("http", "https") or not origin[1]:
            raise
        return pool._route(httpx.URL(destination))


def runtime_of(pool: Pool, destination: str) -> PolicyRuntime:
    """The policy runtime of `destination` (a name or URL)."""
    return runtime_for(_destination(pool, destination))


def runtime_for(dest: DestinationPool) -> PolicyRuntime:
    """The policy runtime of a destination's run-time pool (`Policy.off()` bound if none)."""
    pool = dest.pool
    runtime = dest.policy
    if runtime is None:
        with pool._registry_lock:
            runtime = dest.policy
            if runtime is None:
                # A destination without a policy (Pool(policy=None)) still gets admission.
                runtime = Policy.off().bind(dest)
    if not isinstance(runtime, PolicyRuntime):
        raise TypeError(
            f"destination {dest.name!r} has a policy of type {type(runtime).__name__}, "
            f"not a toolpool.resilience.Policy; admission needs the latter"
        )
    return runtime


def _timeout(runtime: PolicyRuntime, timeout: float | None) -> float:
    if timeout is None:
        return runtime.policy.max_wait
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or math.isnan(timeout):
        raise ValueError(f"timeout must be a number of seconds or None, got {timeout!r}")
    return max(0.0, float(timeout))


def saturation(pool: Pool, destination: str) -> Saturation:
    return runtime_of(pool, destination).saturation()


def admit(pool: Pool, destination: str, timeout: float | None) -> AsyncAdmission:
    runtime = runtime_of(pool, destination)
    return AsyncAdmission(runtime, _timeout(runtime, timeout))


def admit_sync(pool: Pool, destination: str, timeout: float | None) -> SyncAdmission:
    runtime = runtime_of(pool, destination)
    return SyncAdmission(runtime, _timeout(runtime, timeout))


def hub_of(pool: Pool) -> SaturationHub:
    hub: SaturationHub | None = pool._saturation_hub
    if hub is None:
        with pool._registry_lock:
            hub = pool._saturation_hub
            if hub is None:
                hub = SaturationHub()
                pool._saturation_hub = hub
    return hub


def on_saturation(pool: Pool, callback: Callable[[Saturation], object]) -> Callable[[], None]:
    return hub_of(pool).subscribe(callback)
