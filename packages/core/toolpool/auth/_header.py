"""The registry at run time for one destination with a header provider: sets each request's
credential, and carries out the token cache's decisions (fetch, wait, refresh in the
background, retry after a 401) for the asyncio and thread drivers alike.

The rules live in `auth/_cache.py`; this module only does the I/O they ask for. Token requests
go through the pool as requests of the context they are for, with the unwrapped pooled send
of the token endpoint's destination, so they never recurse into an auth wrapper.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from toolpool._async import request as async_request
from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, MethodLayer, SyncSend
from toolpool._destination import mark_counted, unmark_counted
from toolpool._sync import request as sync_request
from toolpool.auth._cache import (
    FAIL,
    LEAD,
    REFRESH,
    USE,
    WAIT,
    Cached,
    Decision,
    Flight,
    TokenCache,
)
from toolpool.auth._credential import Credential, TokenPolicy
from toolpool.auth._providers import ApiKey, Bearer, TokenFailure
from toolpool.auth._stats import EXPIRY, AuthStats
from toolpool.errors import AuthError

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool.auth._providers import TokenProvider

__all__ = ["HeaderAuth", "SharedTokens", "context_label", "with_header"]

log = logging.getLogger("toolpool.auth")

monotonic = time.monotonic


class SharedTokens(Protocol):
    """A credential store several processes share (e.g. `toolpool.fleet`'s on Redis): it hands
    out a stored credential or calls `fetch` (at most one caller at a time across processes),
    and drops a credential a destination rejected. Bounded in time; falls back to `fetch`."""

    async def obtain(
        self,
        destination: str,
        ctx: AuthContext | None,
        fetch: Callable[[], Awaitable[Credential]],
        policy: TokenPolicy,
    ) -> Credential: ...

    def obtain_sync(
        self,
        destination: str,
        ctx: AuthContext | None,
        fetch: Callable[[], Credential],
        policy: TokenPolicy,
    ) -> Credential: ...

    async def invalidate(self, destination: str, ctx: AuthContext | None, value: str) -> None: ...

    def invalidate_sync(self, destination: str, ctx: AuthContext | None, value: str) -> None: ...


def context_label(ctx: AuthContext | None) -> str | None:
    """Who a request acts for, for messages: tenant, else subject; None for no context."""
    return None if ctx is None else ctx.label


def with_header(request: httpx.Request, name: str, value: str) -> httpx.Request:
    """A copy of `request` carrying the header. The caller's request is never modified, so
    the credential cannot leak through it: not into redirects to other origins (httpx builds
    them from the caller's request), nor into recordings made above the transport."""
    headers = request.headers.copy()
    headers[name] = value
    return httpx.Request(
        request.method,
        request.url,
        headers=headers,
        stream=request.stream,
        extensions=request.extensions,
    )


def no_context_error(dest_name: str) -> AuthError:
    return AuthError(
        dest_name,
        None,
        f"requests to destination {dest_name!r} need an auth context and this one has none; "
        f"wrap the call in `with toolpool.auth_context(toolpool.AuthContext(tenant=...)):` "
        f"(or give the provider static credentials to use outside any context)",
    )


class _AsyncWake:
    """Wakes a task waiting for a flight, from whichever thread ends the flight."""

    __slots__ = ("fut", "loop", "thread")

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        self.loop = loop
        self.fut = fut
        self.thread = threading.get_ident()

    def __call__(self) -> None:
        if threading.get_ident() == self.thread:
            _resolve(self.fut)
            return
        try:
            self.loop.call_soon_threadsafe(_resolve, self.fut)
        except RuntimeError:  # its loop is closed: nobody waits any more
            pass


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class HeaderAuth(MethodLayer):
    """`dest.auth` for a header provider (bearer, API key, OAuth 2, custom): wraps the
    destination's send, caches credentials per auth context, and counts what it does."""

    #: Identity travels in a header, not in the TLS handshake: connections are keyed by
    #: context but opened the same way for all.
    connection_bound = False

    def __init__(self, provider: TokenProvider, dest: DestinationPool) -> None:
        self.provider = provider
        self.dest = dest
        self.name = dest.name
        self.policy = provider.policy
        self.cache = TokenCache(self.policy)
        self.lock = threading.Lock()
        self._entries = self.cache.entries
        self._shared = provider.shared_identity
        # Fetches outlast no pool: a waiter gives up after the token request's own bounds.
        self._wait_bound = 4 * self.policy.timeout + 5.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._threads: set[threading.Thread] = set()
        self._closed = False
        # The fleet's token store (toolpool.fleet), when this destination shares its tokens.
        self.shared_tokens: SharedTokens | None = None
        self._inner_a: AsyncSend = dest.base_async_send
        self._inner_s: SyncSend = dest.base_sync_send
        dest.pool.on_close(self.close)

    def __repr__(self) -> str:
        return f"<toolpool.auth {type(self.provider).__name__} for {self.name!r}>"

    # ------------------------------------------------------------------ the layer

    #: Its place in the send chain (`toolpool._chain`): innermost, right above the pool.
    role = "auth"

    def share_tokens(self, store: SharedTokens) -> None:
        """Take credentials from `store` (one per (destination, context) for a fleet of
        processes, e.g. `toolpool.fleet.RedisFleet(...).tokens`) before fetching them, and
        tell it about 401s. Static providers (`Bearer`, `ApiKey`) have nothing to share."""
        if not isinstance(self.provider, Bearer | ApiKey):
            self.shared_tokens = store

    # ------------------------------------------------------------------ request path

    def _key(self, ctx: AuthContext | None) -> str:
        if ctx is not None:
            return ctx._fingerprint
        if self._shared:
            return ""
        raise no_context_error(self.name)

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """Send `request` with `ctx`'s credential (the destination's wrapped async send)."""
        key = ctx._fingerprint if ctx is not None else self._key(None)
        entry = self._entries.get(key)
        cached = entry.cached if entry is not None else None
        if cached is None or monotonic() >= cached.refresh_at:
            cached = await self._obtain_async(key, ctx, None)
        response = await self._inner_a(with_header(request, cached.header, cached.value), ctx)
        if response.status_code == 401:
            return await self._rejected_async(request, ctx, key, cached, response)
        return response

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """Send `request` with `ctx`'s credential (the destination's wrapped sync send)."""
        key = ctx._fingerprint if ctx is not None else self._key(None)
        entry = self._entries.get(key)
        cached = entry.cached if entry is not None else None
        if cached is None or monotonic() >= cached.refresh_at:
            cached = self._obtain_sync(key, ctx, None)
        response = self._inner_s(with_header(request, cached.header, cached.value), ctx)
        if response.status_code == 401:
            return self._rejected_sync(request, ctx, key, cached, response)
        return response

    # ------------------------------------------------------------------ 401

    async def _rejected_async(
        self,
        request: httpx.Request,
        ctx: AuthContext | None,
        key: str,
        cached: Cached,
        response: httpx.Response,
    ) -> httpx.Response:
        shared = self.shared_tokens
        if shared is not None:
            await shared.invalidate(self.name, ctx, cached.credential.value)
        if not isinstance(request.stream, httpx.ByteStream):
            # The body cannot be sent again: hand the 401 over; the next request refreshes.
            with self.lock:
                self.cache.invalidate(key, cached)
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        fresh = await self._obtain_async(key, ctx, cached)
        if fresh.value == cached.value:
            raise self._reject(key, ctx, "the provider has no other credential to try")
        with self.lock:
            self.cache.counters.retries_total += 1
        # The retry belongs to the call that was already let in.
        marked = mark_counted(self.dest)
        try:
            response = await self._inner_a(with_header(request, fresh.header, fresh.value), ctx)
        finally:
            unmark_counted(marked)
        if response.status_code != 401:
            return response
        await response.aclose()
        raise self._reject(key, ctx, "a freshly fetched credential was rejected too")

    def _rejected_sync(
        self,
        request: httpx.Request,
        ctx: AuthContext | None,
        key: str,
        cached: Cached,
        response: httpx.Response,
    ) -> httpx.Response:
        shared = self.shared_tokens
        if shared is not None:
            shared.invalidate_sync(self.name, ctx, cached.credential.value)
        if not isinstance(request.stream, httpx.ByteStream):
            with self.lock:
                self.cache.invalidate(key, cached)
            return response
        try:
            response.read()
        finally:
            response.close()
        fresh = self._obtain_sync(key, ctx, cached)
        if fresh.value == cached.value:
            raise self._reject(key, ctx, "the provider has no other credential to try")
        with self.lock:
            self.cache.counters.retries_total += 1
        marked = mark_counted(self.dest)
        try:
            response = self._inner_s(with_header(request, fresh.header, fresh.value), ctx)
        finally:
            unmark_counted(marked)
        if response.status_code != 401:
            return response
        response.close()
        raise self._reject(key, ctx, "a freshly fetched credential was rejected too")

    def _reject(self, key: str, ctx: AuthContext | None, why: str) -> AuthError:
        detail = (
            f"the destination answered 401 and {why}; check that this context's credentials "
            f"grant access"
        )
        with self.lock:
            self.cache.counters.rejected_total += 1
            self.cache.hold_failure(key, detail, monotonic())
        log.warning("destination %s rejected the credential of %s twice", self.name, _who(ctx))
        return AuthError(self.name, context_label(ctx), detail)

    # ------------------------------------------------------------------ obtaining (async)

    def _decide(self, key: str, rejected: Cached | None) -> Decision:
        now = monotonic()
        if rejected is not None:
            return self.cache.rejected(key, rejected, now)
        return self.cache.lookup(key, now)

    async def _obtain_async(
        self, key: str, ctx: AuthContext | None, rejected: Cached | None
    ) -> Cached:
        """A usable credential for the context: cached, waited for, or fetched now."""
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[None] | None = None
            with self.lock:
                decision = self._decide(key, rejected)
                if decision.kind == WAIT:
                    assert decision.flight is not None
                    fut = loop.create_future()
                    decision.flight.add_waiter(_AsyncWake(loop, fut))
            rejected = None
            kind = decision.kind
            if kind == USE:
                assert decision.cached is not None
                return decision.cached
            if kind == REFRESH:
                assert decision.cached is not None
                assert decision.flight is not None
                self._refresh_in_background_async(decision.flight, ctx, loop)
                return decision.cached
            if kind == FAIL:
                raise self._held(ctx, decision)
            flight = decision.flight
            assert flight is not None
            if kind == LEAD:
                return await self._fetch_async(flight, ctx, cold=True)
            assert fut is not None
            try:
                with _token_scope(self.dest, "wait"):
                    await asyncio.wait_for(fut, self._wait_bound)
            except TimeoutError:
                raise self._wait_timed_out(ctx) from None
            got = self._outcome(flight, ctx)
            if got is not None:
                return got

    async def _fetch_async(self, flight: Flight, ctx: AuthContext | None, cold: bool) -> Cached:
        """Fetch the context's credential as the flight's leader; wake its waiters."""
        requested = monotonic()
        cached: Cached | None = None
        failure: str | None = None
        retry_after = 0.0
        cause: BaseException | None = None
        preconnect: asyncio.Task[None] | None = None

        async def fetch() -> Credential:
            nonlocal preconnect
            step = self.provider.credential(ctx)
            if isinstance(step, httpx.Request):
                token_dest = self.dest.pool._route(step.url)
                if cold and self.policy.preconnect and token_dest is not self.dest:
                    # Open the API connection while the token is on its way.
                    preconnect = asyncio.get_running_loop().create_task(
                        async_request.preconnect(self.dest, ctx)
                    )
                # Part of the call it is fetched for: never refused for a full queue.
                marked = mark_counted(token_dest)
                try:
                    with _token_scope(self.dest, flight.reason):
                        response = await token_dest.base_async_send(self._bounded(step), ctx)
                        try:
                            await response.aread()
                        finally:
                            await response.aclose()
                finally:
                    unmark_counted(marked)
                step = self.provider.token_response(ctx, response)
            return _credential(step)

        try:
            try:
                shared = self.shared_tokens
                if shared is None:
                    credential = await fetch()
                else:
                    credential = await shared.obtain(self.name, ctx, fetch, self.policy)
                cached = Cached(credential, requested, self.policy)
            except Exception as exc:
                failure, retry_after, cause = _describe(exc)
        finally:
            with self.lock:
                waiters = self.cache.finish(flight, monotonic(), cached, failure, retry_after)
            for wake in waiters:
                wake()
            if preconnect is not None:
                if cached is None:
                    preconnect.cancel()
                await _settle(preconnect)
        return self._result(flight, ctx, cached, failure, cause)

    def _refresh_in_background_async(
        self, flight: Flight, ctx: AuthContext | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        if self._closed:
            self._abandon(flight)
            return
        task = loop.create_task(self._refresh_async(flight, ctx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_async(self, flight: Flight, ctx: AuthContext | None) -> None:
        try:
            await self._fetch_async(flight, ctx, cold=False)
        except AuthError:
            pass  # logged by _result; requests keep the old credential until it expires

    # ------------------------------------------------------------------ obtaining (sync)

    def _obtain_sync(self, key: str, ctx: AuthContext | None, rejected: Cached | None) -> Cached:
        while True:
            event: threading.Event | None = None
            with self.lock:
                decision = self._decide(key, rejected)
                if decision.kind == WAIT:
                    assert decision.flight is not None
                    event = threading.Event()
                    decision.flight.add_waiter(event.set)
            rejected = None
            kind = decision.kind
            if kind == USE:
                assert decision.cached is not None
                return decision.cached
            if kind == REFRESH:
                assert decision.cached is not None
                assert decision.flight is not None
                self._refresh_in_background_sync(decision.flight, ctx)
                return decision.cached
            if kind == FAIL:
                raise self._held(ctx, decision)
            flight = decision.flight
            assert flight is not None
            if kind == LEAD:
                return self._fetch_sync(flight, ctx, cold=True)
            assert event is not None
            with _token_scope(self.dest, "wait"):
                arrived = event.wait(self._wait_bound)
            if not arrived:
                raise self._wait_timed_out(ctx)
            got = self._outcome(flight, ctx)
            if got is not None:
                return got

    def _fetch_sync(self, flight: Flight, ctx: AuthContext | None, cold: bool) -> Cached:
        requested = monotonic()
        cached: Cached | None = None
        failure: str | None = None
        retry_after = 0.0
        cause: BaseException | None = None
        preconnect: threading.Thread | None = None

        def fetch() -> Credential:
            nonlocal preconnect
            step = self.provider.credential(ctx)
            if isinstance(step, httpx.Request):
                token_dest = self.dest.pool._route(step.url)
                if cold and self.policy.preconnect and token_dest is not self.dest:
                    preconnect = threading.Thread(
                        target=_preconnect_sync,
                        args=(self.dest, ctx),
                        name=f"toolpool-auth-preconnect-{self.name}",
                        daemon=True,
                    )
                    preconnect.start()
                marked = mark_counted(token_dest)
                try:
                    with _token_scope(self.dest, flight.reason):
                        response = token_dest.base_sync_send(self._bounded(step), ctx)
                        try:
                            response.read()
                        finally:
                            response.close()
                finally:
                    unmark_counted(marked)
                step = self.provider.token_response(ctx, response)
            return _credential(step)

        try:
            try:
                shared = self.shared_tokens
                if shared is None:
                    credential = fetch()
                else:
                    credential = shared.obtain_sync(self.name, ctx, fetch, self.policy)
                cached = Cached(credential, requested, self.policy)
            except Exception as exc:
                failure, retry_after, cause = _describe(exc)
        finally:
            with self.lock:
                waiters = self.cache.finish(flight, monotonic(), cached, failure, retry_after)
            for wake in waiters:
                wake()
            if preconnect is not None:
                # Bounded by the connect timeout inside the preconnect.
                preconnect.join(self.dest.settings.connect_timeout + 1.0)
        return self._result(flight, ctx, cached, failure, cause)

    def _refresh_in_background_sync(self, flight: Flight, ctx: AuthContext | None) -> None:
        if self._closed:
            self._abandon(flight)
            return
        thread = threading.Thread(
            target=self._refresh_sync,
            args=(flight, ctx),
            name=f"toolpool-auth-refresh-{self.name}",
            daemon=True,
        )
        self._threads.add(thread)
        thread.start()

    def _refresh_sync(self, flight: Flight, ctx: AuthContext | None) -> None:
        try:
            self._fetch_sync(flight, ctx, cold=False)
        except AuthError:
            pass  # logged by _result
        finally:
            self._threads.discard(threading.current_thread())

    # ------------------------------------------------------------------ shared helpers

    def _bounded(self, request: httpx.Request) -> httpx.Request:
        if "timeout" not in request.extensions:
            t = self.policy.timeout
            request.extensions["timeout"] = {"connect": t, "read": t, "write": t, "pool": t}
        return request

    def _result(
        self,
        flight: Flight,
        ctx: AuthContext | None,
        cached: Cached | None,
        failure: str | None,
        cause: BaseException | None,
    ) -> Cached:
        if cached is not None:
            log.debug(
                "fetched a credential for %s at %s (%s, %s)",
                _who(ctx),
                self.name,
                flight.reason,
                "no expiry"
                if cached.expires_at == math.inf
                else f"expires in {cached.expires_at - monotonic():.0f} s",
            )
            return cached
        assert failure is not None
        log.warning("credential fetch for %s at %s failed: %s", _who(ctx), self.name, failure)
        err = AuthError(self.name, context_label(ctx), failure)
        if cause is not None:
            raise err from cause
        raise err

    def _outcome(self, flight: Flight, ctx: AuthContext | None) -> Cached | None:
        """The result of a flight this request waited for (None: abandoned, look again)."""
        if flight.cached is not None:
            return flight.cached
        if flight.failure is not None:
            raise AuthError(self.name, context_label(ctx), flight.failure)
        return None

    def _held(self, ctx: AuthContext | None, decision: Decision) -> AuthError:
        return AuthError(
            self.name,
            context_label(ctx),
            f"{decision.failure} (failed recently; the next attempt is allowed in "
            f"{decision.retry_in:.1f} s)",
        )

    def _wait_timed_out(self, ctx: AuthContext | None) -> AuthError:
        return AuthError(
            self.name,
            context_label(ctx),
            f"no credential arrived within {self._wait_bound:g} s while another request was "
            f"fetching it",
        )

    def _abandon(self, flight: Flight) -> None:
        with self.lock:
            waiters = self.cache.finish(flight, monotonic())
        for wake in waiters:
            wake()

    # ------------------------------------------------------------------ lifecycle, stats

    def close(self) -> None:
        """The pool is closing: stop background refreshes (called by the pool, once)."""
        self._closed = True
        for task in list(self._tasks):
            try:
                task.get_loop().call_soon_threadsafe(task.cancel)
            except RuntimeError:  # its loop is closed already
                pass
        # Refresh threads end with their token request, which the closing pool bounds.

    def stats(self) -> AuthStats:
        """This destination's credential counters (see `toolpool.auth.AuthStats`)."""
        with self.lock:
            return self.cache.counters.snapshot(
                self.name, type(self.provider).__name__, len(self._entries)
            )

    def invalidate(self, ctx: AuthContext | None) -> None:
        """Forget the cached credential of `ctx` (None: the shared identity's); the next
        request of that context fetches a new one (e.g. after rotating its secret)."""
        key = "" if ctx is None else ctx._fingerprint
        with self.lock:
            entry = self._entries.get(key)
            if entry is not None and entry.cached is not None:
                self.cache.invalidate(key, entry.cached, EXPIRY)

    def clear(self) -> None:
        """Forget every cached credential and failure (fetches under way still finish)."""
        with self.lock:
            self._entries.clear()


def _credential(step: object) -> Credential:
    if isinstance(step, Credential):
        return step
    if isinstance(step, str) and step:
        return Credential(step)
    raise TokenFailure(
        f"the provider returned {type(step).__name__}; expected a toolpool.auth.Credential, a "
        f"token str, or an httpx.Request to a token endpoint"
    )


def _describe(exc: Exception) -> tuple[str, float, BaseException | None]:
    """(secret-free failure detail, retry-after seconds, exception to chain) for a failed fetch."""
    if isinstance(exc, TokenFailure):
        return exc.detail, exc.retry_after, None
    if isinstance(exc, AuthError):
        return exc.detail, 0.0, None
    if isinstance(exc, httpx.TransportError):
        # httpx and toolpool transport messages name hosts and numbers, never credentials.
        return f"the token request failed: {type(exc).__name__}: {exc}", 0.0, exc
    return (
        f"the provider raised {type(exc).__name__} while preparing the credential",
        0.0,
        exc,
    )


def _token_scope(dest: DestinationPool, reason: str) -> AbstractContextManager[object]:
    """The tracer's span around a token request, or around a wait for another request's
    fetch (reason "wait"), when toolpool.otel traces the pool; else nothing."""
    probe = dest.probe
    return _NO_SCOPE if probe is None else probe.token_fetch(dest, reason)


_NO_SCOPE = nullcontext()


def _who(ctx: AuthContext | None) -> str:
    return "the shared identity" if ctx is None else f"context {ctx.label!r}"


def _preconnect_sync(dest: DestinationPool, ctx: AuthContext | None) -> None:
    try:
        sync_request.preconnect(dest, ctx)
    except Exception as exc:  # the request itself meets (and reports) any real failure
        log.debug("preconnect to %s failed: %s", dest.name, type(exc).__name__)


async def _settle(task: asyncio.Task[Any]) -> None:
    """Wait for a helper task to end, whatever the outcome, and collect its exception."""
    if not task.done():
        await asyncio.wait([task])
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.debug("preconnect failed: %s", type(exc).__name__)
