"""The credential cache's rules, with no I/O: for one destination, whether a request uses,
waits for, fetches or refreshes the credential of its auth context.

Everything that decides when a credential is fetched lives in this file. The sync and async
paths (`auth/_header.py`) carry out its decisions (send the token request, wake waiters) and
report back; neither decides anything itself. Every method takes `now` (a monotonic clock
reading); none blocks or touches a socket. The caller serialises calls (one lock per cache).

Theory of operation
-------------------
One `Entry` per auth-context fingerprint ("" stands for the provider's shared identity, used by
requests made outside any auth context). An entry holds at most one cached credential
(`Cached`: the header to set, and when to refresh it and when it expires), at most one fetch
under way (a `Flight`, which the other requests of that context wait for: single-flight per
(destination, context), and independent across contexts), and the last failure with the time
until which it stands (the negative cache).

`lookup(key, now)` answers, in this order:

    USE      the credential is before its refresh point; or past it but not expired while a
             refresh is already under way or recently failed (the old one is still good)
    REFRESH  past its refresh point, not expired, nothing under way: use it *and* run the
             returned flight in the background, so no request waits for the refresh
    WAIT     no usable credential and a fetch is under way: wait for that flight
    FAIL     no usable credential and the last fetch failed less than `negative_ttl` ago
    LEAD     no usable credential: the caller fetches (the returned flight); others wait

The request path checks USE itself (a dict lookup and a comparison, no lock) and calls in
here only when it does not hold.

`rejected(key, cached, now)`: the destination answered 401 to `cached`. It is dropped if it is
still the entry's credential (a newer one fetched meanwhile is kept and used), then the answer
is as for `lookup`, and a fetch it starts has reason "401".

`finish(flight, now, cached=..., failure=...)`: a fetch ended with a credential, a failure, or
neither (cancelled: abandoned). It returns the flight's waiters for the caller to wake; they
take the flight's outcome (a failure too, so a failed fetch is not repeated once per waiter)
and look up again only if it was abandoned.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.auth._stats import EXPIRY, INITIAL, REJECTED, AuthCounters

__all__ = ["FAIL", "LEAD", "REFRESH", "USE", "WAIT", "Cached", "Decision", "Flight", "TokenCache"]

USE, REFRESH, WAIT, FAIL, LEAD = range(5)


class Cached:
    """A credential as cached: the header to set, and its refresh and expiry times."""

    __slots__ = ("credential", "expires_at", "header", "refresh_at", "value")

    def __init__(self, credential: Credential, requested_at: float, policy: TokenPolicy) -> None:
        self.credential = credential
        self.header = credential.header
        self.value = credential.header_value
        lifetime = credential.expires_in
        if lifetime is None:
            self.refresh_at = self.expires_at = math.inf
        else:
            # Times count from when the credential was requested: a conservative start.
            self.expires_at = requested_at + lifetime
            self.refresh_at = requested_at + policy.refresh_after(lifetime)

    def __repr__(self) -> str:
        return f"<Cached {self.header} expires_at={self.expires_at:.3f} value=<redacted>>"


class Flight:
    """One fetch under way for one context; the requests of that context wait for it."""

    __slots__ = ("cached", "done", "failure", "key", "reason", "retry_after", "started", "waiters")

    def __init__(self, key: str, reason: str, started: float) -> None:
        self.key = key
        self.reason = reason
        self.started = started
        self.done = False
        self.cached: Cached | None = None
        # What went wrong, secret-free (it becomes an AuthError's detail).
        self.failure: str | None = None
        self.retry_after = 0.0
        self.waiters: list[Callable[[], None]] = []

    def add_waiter(self, wake: Callable[[], None]) -> bool:
        """Wake `wake()` when the flight ends; False if it has ended already."""
        if self.done:
            return False
        self.waiters.append(wake)
        return True


class Entry:
    """One context's state: its credential, the fetch under way, the last failure."""

    __slots__ = ("cached", "failed_until", "failure", "flight", "next_reason")

    def __init__(self) -> None:
        self.cached: Cached | None = None
        self.flight: Flight | None = None
        self.failure: str | None = None
        self.failed_until = -math.inf
        self.next_reason = INITIAL


class Decision(NamedTuple):
    """What the request should do; see the module docstring."""

    kind: int
    cached: Cached | None = None
    flight: Flight | None = None
    failure: str | None = None
    retry_in: float = 0.0


class TokenCache:
    """One destination's credential cache. Not thread-safe by itself: the caller serialises
    calls, except reads of `entries[key].cached`, which the request path makes without a lock."""

    def __init__(self, policy: TokenPolicy) -> None:
        self.policy = policy
        self.entries: dict[str, Entry] = {}
        self.counters = AuthCounters()

    # ------------------------------------------------------------------ decisions

    def lookup(self, key: str, now: float) -> Decision:
        entry = self.entries.get(key)
        if entry is None:
            entry = self._new_entry(key, now)
        cached = entry.cached
        if cached is not None and now < cached.expires_at:
            if now < cached.refresh_at or entry.flight is not None or now < entry.failed_until:
                return Decision(USE, cached)
            flight = self._start(entry, key, EXPIRY, now)
            self.counters.background_refreshes_total += 1
            return Decision(REFRESH, cached, flight)
        return self._without_credential(entry, key, now)

    def rejected(self, key: str, cached: Cached, now: float) -> Decision:
        """The destination answered 401 to a request that carried `cached`."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self._new_entry(key, now)
        if entry.cached is cached:
            entry.cached = None
            entry.next_reason = REJECTED
        current = entry.cached
        if current is not None and now < current.expires_at:
            return Decision(USE, current)
        return self._without_credential(entry, key, now)

    def invalidate(self, key: str, cached: Cached, reason: str = REJECTED) -> None:
        """Drop `cached` (rejected with 401, or forgotten on request) without fetching now;
        the next request fetches, with `reason`."""
        entry = self.entries.get(key)
        if entry is not None and entry.cached is cached:
            entry.cached = None
            entry.next_reason = reason

    def hold_failure(self, key: str, failure: str, now: float) -> None:
        """Make the context's requests fail at once with `failure` for `negative_ttl`
        (a fresh credential was rejected: fetching again at once would not help)."""
        entry = self.entries.get(key)
        if entry is None:
            entry = self._new_entry(key, now)
        entry.cached = None
        entry.next_reason = REJECTED
        entry.failure = failure
        entry.failed_until = now + self.policy.negative_ttl

    def finish(
        self,
        flight: Flight,
        now: float,
        cached: Cached | None = None,
        failure: str | None = None,
        retry_after: float = 0.0,
    ) -> list[Callable[[], None]]:
        """A fetch ended: store its outcome; return the waiters to wake (outside any lock)."""
        flight.done = True
        flight.cached = cached
        flight.failure = failure
        flight.retry_after = retry_after
        counters = self.counters
        if cached is None and failure is None:
            counters.abandoned_total += 1
        else:
            counters.observe(max(0.0, now - flight.started), failed=cached is None)
        entry = self.entries.get(flight.key)
        if entry is not None and entry.flight is flight:
            entry.flight = None
            if cached is not None:
                entry.cached = cached
                entry.next_reason = EXPIRY
                entry.failure = None
                entry.failed_until = -math.inf
            elif failure is not None:
                # A failed background refresh keeps the old credential until it expires.
                entry.failure = failure
                entry.failed_until = now + max(self.policy.negative_ttl, retry_after)
        waiters, flight.waiters = flight.waiters, []
        return waiters

    # ------------------------------------------------------------------ internals

    def _without_credential(self, entry: Entry, key: str, now: float) -> Decision:
        if entry.flight is not None:
            return Decision(WAIT, None, entry.flight)
        if now < entry.failed_until:
            self.counters.negative_hits_total += 1
            return Decision(FAIL, None, None, entry.failure, entry.failed_until - now)
        if entry.cached is not None:  # expired
            entry.cached = None
        return Decision(LEAD, None, self._start(entry, key, entry.next_reason, now))

    def _start(self, entry: Entry, key: str, reason: str, now: float) -> Flight:
        flight = entry.flight = Flight(key, reason, now)
        self.counters.started(reason)
        return flight

    def _new_entry(self, key: str, now: float) -> Entry:
        entries = self.entries
        if len(entries) >= self.policy.max_contexts:
            self._evict(now)
        entry = entries[key] = Entry()
        return entry

    def _evict(self, now: float) -> None:
        """Drop entries down to 90 % of the bound: dead ones first, then the oldest.
        Entries with a fetch under way stay (their requests are waiting on them)."""
        entries = self.entries
        target = max(0, int(self.policy.max_contexts * 0.9))
        for key, entry in list(entries.items()):
            cached = entry.cached
            dead = cached is None or now >= cached.expires_at
            if entry.flight is None and dead and now >= entry.failed_until:
                del entries[key]
        for key, entry in list(entries.items()):
            if len(entries) <= target:
                break
            if entry.flight is None:
                del entries[key]
