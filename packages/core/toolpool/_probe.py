"""`Probe`: what the drivers tell a tracer about one request's time, and nothing more.

The drivers know when a request queued for a connection, how long a connection took to open
(TCP, then TLS) and when the response head arrived; only a tracer cares. A destination's
`probe` is None unless `toolpool.otel` traces the pool, so the request path pays one
attribute test for it; every call below happens only with a probe, and all of them except
`attempt` and `exchanged` only on the slow paths (queued, new connection, token fetch).

Times are `time.monotonic()` readings, the clock of the state machine, so a wait reported
here is exactly the wait `pool.stats()` and the metrics recorded. This module imports no
tracing library: the probe is whatever object `toolpool.otel` installs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from toolpool._runtime import DestinationPool
    from toolpool._state import Waiter

__all__ = ["Probe"]


class Probe(Protocol):
    """Receives timings from the drivers and the auth runtime (see the module docstring)."""

    def attempt(self, dest: DestinationPool, asked: float) -> None:
        """The pooled send of one attempt starts (before it asks for a connection)."""

    def waited(self, dest: DestinationPool, waiter: Waiter, error: BaseException | None) -> None:
        """A queued request was served (`waiter.since` to `waiter.granted_at`), or gave up
        with `error` (then it waited until now)."""

    def connected(
        self,
        dest: DestinationPool,
        started: float,
        tcp_done: float | None,
        done: float,
        error: BaseException | None,
    ) -> None:
        """A connection opened (or failed to): TCP from `started` to `tcp_done`, TLS from
        `tcp_done` to `done` (`tcp_done` None: not known, or plain HTTP)."""

    def exchanged(
        self, dest: DestinationPool, sent: float, status: int | None, error: BaseException | None
    ) -> None:
        """The request went out at `sent` and its response head came in now (`status`), or
        the exchange failed with `error`."""

    def token_fetch(self, dest: DestinationPool, reason: str) -> AbstractContextManager[object]:
        """A scope around one token request of `dest`'s auth provider (reason: "initial",
        "expiry" or "401"), or around a wait for another request's fetch (reason "wait")."""
        ...
