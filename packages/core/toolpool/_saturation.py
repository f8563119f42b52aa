"""How busy a destination is (`Saturation`) and the delivery of its changes to the pool's
`on_saturation` subscribers (`SaturationHub`).

Plain data and a subscriber list, below the pool and the layers: the resilience layer
computes the readings (`toolpool.resilience._admission_rules.assess`), layers above it may adjust
them (the hierarchical overflow), and the pool owns the hub its subscribers register with.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

__all__ = ["Saturation", "SaturationHub", "SaturationOverlay"]

log = logging.getLogger("toolpool.resilience")


@dataclass(frozen=True)
class Saturation:
    """How busy one destination is right now (`pool.saturation(destination)`).

    `state` is "ok", "busy" (utilization >= 80 % or calls queued) or "saturated" (a new call
    would be refused or would wait: queue full, breaker open, or the server asked for a
    pause). `retry_after` estimates the seconds until a new call would start (0 when it would
    start now). `reason` says what made it busy or saturated: "utilization", "queued",
    "queue_full", "breaker_open" or "rate_limited" ("" when ok).
    """

    destination: str
    utilization: float
    in_use: int
    queued: int
    queue_limit: int
    effective_limit: int
    max_connections: int
    retry_after: float
    state: Literal["ok", "busy", "saturated"]
    reason: str = ""


@runtime_checkable
class SaturationOverlay(Protocol):
    """A send layer that changes its destination's saturation reading (the hierarchical
    overflow: saturated while both tiers are full). `pool.saturation()` passes the resilience
    layer's reading through every such layer of the chain, innermost first."""

    def adjust_saturation(self, reading: Saturation) -> Saturation:
        """The reading as seen through this layer."""
        ...


# ---------------------------------------------------------------------- callbacks


class SaturationHub:
    """The pool's `on_saturation` subscribers and an ordered delivery of changes to them.

    Changes are queued under the publishing runtime's lock (so their order is the order in
    which they happened) and delivered by whichever thread finds the queue idle, with no lock
    held, so callbacks may call back into the pool.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: tuple[Callable[[Saturation], object], ...] = ()
        self._pending: deque[Saturation] = deque()
        self._delivering = False

    @property
    def active(self) -> bool:
        return bool(self._callbacks)

    def subscribe(self, callback: Callable[[Saturation], object]) -> Callable[[], None]:
        if not callable(callback):
            raise TypeError(f"on_saturation needs a callable, got {type(callback).__name__}")
        entry = _Subscription(callback)
        with self._lock:
            self._callbacks = (*self._callbacks, entry)

        def unsubscribe() -> None:
            with self._lock:
                self._callbacks = tuple(c for c in self._callbacks if c is not entry)

        return unsubscribe

    def queue(self, change: Saturation) -> None:
        """Queue a change (call with the publishing runtime's lock held)."""
        if self._callbacks:
            with self._lock:
                self._pending.append(change)

    def deliver(self) -> None:
        """Deliver queued changes (call with no lock held)."""
        with self._lock:
            if self._delivering or not self._pending:
                return
            self._delivering = True
        while True:
            with self._lock:
                if not self._pending:
                    self._delivering = False
                    return
                change = self._pending.popleft()
                callbacks = self._callbacks
            for callback in callbacks:
                try:
                    callback(change)
                except Exception:
                    log.exception("on_saturation callback %r failed", callback)


class _Subscription:
    """A subscribed callback (its own object, so the same function can subscribe twice)."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[Saturation], object]) -> None:
        self.callback = callback

    def __call__(self, change: Saturation) -> object:
        return self.callback(change)

    def __repr__(self) -> str:
        return repr(self.callback)
