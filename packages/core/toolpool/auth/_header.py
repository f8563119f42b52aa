"""The registry at run time for one destination with a header provider: sets each request's
credential, and carries out the token cache's decisions (fetch, wait, refresh in the
background, retry after a 401) for the asyncio and thread drivers alike.

The rules live in `auth/_cache.py`; this module only does the I/O they ask for. Token requests
go through the pool as requests of the context they are for, with the unwrapped pooled send
of the token endpoint's destination, so they never recurse into an auth wrapper.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from toolpool._async import h2 as async_h2
from toolpool._async import request as async_request
from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, MethodLayer, SyncSend
from toolpool._destination import mark_counted, unmark_counted
from toolpool._sync import h2 as sync_h2
from toolpool._sync import request as sync_request
from toolpool.auth._cache import (
    FAIL,
    LEAD,
    REFRESH,
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


# A sent request's credential: its cache key and the credential itself.
_Used = tuple[str, Cached]


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

    # Both sends, the 401 handling and the fetches share their decisions (the cache's
    # `Decision`s, `_cached`, `_replayable`, `_retry_with`, `_fetched`); each async / sync
    # twin below only does its own waiting and sending.

    def _cached(self, ctx: AuthContext | None) -> tuple[str, Cached | None]:
        """The context's cache key and its credential, None when one must be obtained first
        (none cached, or due for a refresh)."""
        key = ctx._fingerprint if ctx is not None else self._key(None)
        entry = self._entries.get(key)
        cached = entry.cached if entry is not None else None
        if cached is None or monotonic() >= cached.refresh_at:
            return key, None
        return key, cached

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """Send `request` with `ctx`'s credential (the auth layer's async send)."""
        key, cached = self._cached(ctx)
        if cached is None:
            cached = await self._obtain_async(key, ctx, None)
        response = await self._inner_a(with_header(request, cached.header, cached.value), ctx)
        if response.status_code == 401:
            return await self._rejected_async(request, ctx, (key, cached), response)
        return response

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """Send `request` with `ctx`'s credential (the auth layer's sync send)."""
        key, cached = self._cached(ctx)
        if cached is None:
            cached = self._obtain_sync(key, ctx, None)
        response = self._inner_s(with_header(request, cached.header, cached.value), ctx)
        if response.status_code == 401:
            return self._rejected_sync(request, ctx, (key, cached), response)
        return response

    async def warm_async(self, ctx: AuthContext | None) -> None:
        """Warm-up: have `ctx`'s credential cached (fetched now if there is none)."""
        await self._obtain_async(self._key(ctx), ctx, None)

    def warm_sync(self, ctx: AuthContext | None) -> None:
        """:meth:`warm_async` for the thread driver."""
        self._obtain_sync(self._key(ctx), ctx, None)

    # ------------------------------------------------------------------ 401

    def _replayable(self, request: httpx.Request, key: str, cached: Cached) -> bool:
        """Whether a 401'd request can be sent again with a fresh credential; if not (its
        body cannot be replayed) the 401 goes back and the next request refreshes."""
        if isinstance(request.stream, httpx.ByteStream):
            return True
        with self.lock:
            self.cache.invalidate(key, cached)
        return False

    def _retry_with(
        self, key: str, ctx: AuthContext | None, cached: Cached, fresh: Cached
    ) -> tuple[Cached, contextvars.Token[frozenset[int]] | None]:
        """The credential to retry a 401'd request with (raises when it is the same one),
        and the mark that counts the retry as part of the call already let in."""
        if fresh.value == cached.value:
            raise self._reject(key, ctx, "the provider has no other credential to try")
        with self.lock:
            self.cache.counters.retries_total += 1
        return fresh, mark_counted(self.dest)

    async def _rejected_async(
        self, request: httpx.Request, ctx: AuthContext | None, used: _Used, response: httpx.Response
    ) -> httpx.Response:
        key, cached = used
        shared = self.shared_tokens
        if shared is not None:
            await shared.invalidate(self.name, ctx, cached.credential.value)
        if not self._replayable(request, key, cached):
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        fresh = await self._obtain_async(key, ctx, cached)
        fresh, marked = self._retry_with(key, ctx, cached, fresh)
        try:
            retried = await self._inner_a(with_header(request, fresh.header, fresh.value), ctx)
        finally:
            unmark_counted(marked)
        if retried.status_code != 401:
            return retried
        await retried.aclose()
        raise self._reject(key, ctx, "a freshly fetched credential was rejected too")

    def _rejected_sync(
        self, request: httpx.Request, ctx: AuthContext | None, used: _Used, response: httpx.Response
    ) -> httpx.Response:
        key, cached = used
        shared = self.shared_tokens
        if shared is not None:
            shared.invalidate_sync(self.name, ctx, cached.credential.value)
        if not self._replayable(request, key, cached):
            return response
        try:
            response.read()
        finally:
            response.close()
        fresh, marked = self._retry_with(key, ctx, cached, self._obtain_sync(key, ctx, cached))
        try:
            retried = self._inner_s(with_header(request, fresh.header, fresh.value), ctx)
        finally:
            unmark_counted(marked)
        if retried.status_code != 401:
            return retried
        retried.close()
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

    def _decide(self, key: str, rejected: Cached | None, wake: Callable[[], None]) -> Decision:
        """The cache's decision for the context's credential; on WAIT, `wake` joins the
        flight (called when it ends)."""
        now = monotonic()
        with self.lock:
            if rejected is not None:
                decision = self.cache.rejected(key, rejected, now)
            else:
                decision = self.cache.lookup(key, now)
            if decision.kind == WAIT:
                assert decision.flight is not None
                decision.flight.add_waiter(wake)
        return decision

    def _ready(self, ctx: AuthContext | None, decision: Decision) -> Cached:
        """The credential a USE or REFRESH decision hands out; a FAIL decision raises."""
        if decision.kind == FAIL:
            raise self._held(ctx, decision)
        assert decision.cached is not None
        return decision.cached

    async def _obtain_async(
        self, key: str, ctx: AuthContext | None, rejected: Cached | None
    ) -> Cached:
        """A usable credential for the context: cached, waited for, or fetched now."""
        loop = asyncio.get_running_loop()
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            decision = self._decide(key, rejected, _AsyncWake(loop, fut))
            rejected = None
            flight = decision.flight
            if decision.kind == LEAD:
                assert flight is not None
                return await self._fetch_async(flight, ctx, cold=True)
            if decision.kind == REFRESH:
                assert flight is not None
                self._refresh_in_background_async(flight, ctx, loop)
            if decision.kind != WAIT:
                return self._ready(ctx, decision)
            assert flight is not None
            try:
                with _token_scope(self.dest, "wait"):
                    await asyncio.wait_for(fut, self._wait_bound)
            except TimeoutError:
                raise self._wait_timed_out(ctx) from None
            got = self._outcome(flight, ctx)
            if got is not None:
                return got

    def _plan(self, ctx: AuthContext | None, cold: bool) -> _TokenPlan:
        """What obtaining the context's credential takes: the provider's credential, or
        its token request (and whether to preconnect the API meanwhile)."""
        step = self.provider.credential(ctx)
        if not isinstance(step, httpx.Request):
            return _TokenPlan(_credential(step), None, self.dest, False)
        token_dest = self.dest.pool.route(step.url)
        # Open the API connection while the token is on its way (a cold start only).
        preconnect = cold and self.policy.preconnect and token_dest is not self.dest
        return _TokenPlan(None, self._bounded(step), token_dest, preconnect)

    def _token_response(self, ctx: AuthContext | None, response: httpx.Response) -> Credential:
        """The credential in the token endpoint's answer (read already)."""
        return _credential(self.provider.token_response(ctx, response))

    async def _fetch_async(self, flight: Flight, ctx: AuthContext | None, cold: bool) -> Cached:
        """Fetch the context's credential as the flight's leader; wake its waiters."""
        fetched = _Fetched(self, flight, ctx)
        preconnect: asyncio.Task[bool] | None = None

        async def fetch() -> Credential:
            nonlocal preconnect
            plan = self._plan(ctx, cold)
            if plan.credential is not None:
                return plan.credential
            if plan.preconnect:
                # On HTTP/2 the tenant's multiplexed connection (falls back by itself).
                preconnect_fn = (
                    async_h2.preconnect if self.dest.h2 is not None else async_request.preconnect
                )
                preconnect = asyncio.get_running_loop().create_task(preconnect_fn(self.dest, ctx))
            assert plan.request is not None
            with _TokenRequest(self.dest, plan.dest, flight.reason):
                response = await plan.dest.base_async_send(plan.request, ctx)
                try:
                    await response.aread()
                finally:
                    await response.aclose()
            return self._token_response(ctx, response)

        try:
            with fetched:
                shared = self.shared_tokens
                fetched.got(
                    await fetch()
                    if shared is None
                    else await shared.obtain(self.name, ctx, fetch, self.policy)
                )
        finally:
            fetched.finish()
            if preconnect is not None:
                if fetched.cached is None:
                    preconnect.cancel()
                await _settle(preconnect)
        return fetched.result()

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
            event = threading.Event()
            decision = self._decide(key, rejected, event.set)
            rejected = None
            flight = decision.flight
            if decision.kind == LEAD:
                assert flight is not None
                return self._fetch_sync(flight, ctx, cold=True)
            if decision.kind == REFRESH:
                assert flight is not None
                self._refresh_in_background_sync(flight, ctx)
            if decision.kind != WAIT:
                return self._ready(ctx, decision)
            assert flight is not None
            with _token_scope(self.dest, "wait"):
                arrived = event.wait(self._wait_bound)
            if not arrived:
                raise self._wait_timed_out(ctx)
            got = self._outcome(flight, ctx)
            if got is not None:
                return got

    def _fetch_sync(self, flight: Flight, ctx: AuthContext | None, cold: bool) -> Cached:
        fetched = _Fetched(self, flight, ctx)
        preconnect: threading.Thread | None = None

        def fetch() -> Credential:
            nonlocal preconnect
            plan = self._plan(ctx, cold)
            if plan.credential is not None:
                return plan.credential
            if plan.preconnect:
                preconnect = threading.Thread(
                    target=_preconnect_sync,
                    args=(self.dest, ctx),
                    name=f"toolpool-auth-preconnect-{self.name}",
                    daemon=True,
                )
                preconnect.start()
            assert plan.request is not None
            with _TokenRequest(self.dest, plan.dest, flight.reason):
                response = plan.dest.base_sync_send(plan.request, ctx)
                try:
                    response.read()
                finally:
                    response.close()
            return self._token_response(ctx, response)

        try:
            with fetched:
                shared = self.shared_tokens
                fetched.got(
                    fetch()
                    if shared is None
                    else shared.obtain_sync(self.name, ctx, fetch, self.policy)
                )
        finally:
            fetched.finish()
            if preconnect is not None:
                # Bounded by the connect timeout inside the preconnect.
                preconnect.join(self.dest.settings.connect_timeout + 1.0)
        return fetched.result()

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
        """A fetch's credential (logged), or its failure raised."""
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
        if dest.h2 is not None:
            sync_h2.preconnect(dest, ctx)
        else:
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


class _TokenPlan:
    """How a credential is obtained: given by the provider (`credential`), or by `request`
    to a token endpoint on `dest` (its destination), with the API preconnected or not."""

    __slots__ = ("credential", "dest", "preconnect", "request")

    def __init__(
        self,
        credential: Credential | None,
        request: httpx.Request | None,
        dest: DestinationPool,
        preconnect: bool,
    ) -> None:
        self.credential = credential
        self.request = request
        self.dest = dest
        self.preconnect = preconnect


class _TokenRequest:
    """Around a token request: part of the call it is fetched for (never refused for a full
    queue), and inside the tracer's token span when the pool is traced."""

    __slots__ = ("_mark", "_scope", "dest", "reason", "token_dest")

    def __init__(self, dest: DestinationPool, token_dest: DestinationPool, reason: str) -> None:
        self.dest = dest
        self.token_dest = token_dest
        self.reason = reason
        self._mark: contextvars.Token[frozenset[int]] | None = None
        self._scope: AbstractContextManager[object] = _NO_SCOPE

    def __enter__(self) -> None:
        self._mark = mark_counted(self.token_dest)
        try:
            self._scope = _token_scope(self.dest, self.reason)
            self._scope.__enter__()
        except BaseException:
            unmark_counted(self._mark)
            raise

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._scope.__exit__(*exc_info)
        finally:
            unmark_counted(self._mark)


class _Fetched:
    """The outcome of one fetch led by this request: the credential, or the failure (an
    `Exception` inside `with fetched:` is recorded, not raised); `finish` ends the flight
    and wakes its waiters, `result` hands the credential out or raises the failure."""

    __slots__ = ("auth", "cached", "cause", "ctx", "failure", "flight", "requested", "retry_after")

    def __init__(self, auth: HeaderAuth, flight: Flight, ctx: AuthContext | None) -> None:
        self.auth = auth
        self.flight = flight
        self.ctx = ctx
        self.requested = monotonic()
        self.cached: Cached | None = None
        self.failure: str | None = None
        self.retry_after = 0.0
        self.cause: BaseException | None = None

    def got(self, credential: Credential) -> None:
        self.cached = Cached(credential, self.requested, self.auth.policy)

    def __enter__(self) -> _Fetched:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if isinstance(exc, Exception):
            self.failure, self.retry_after, self.cause = _describe(exc)
            return True
        return False

    def finish(self) -> None:
        auth = self.auth
        with auth.lock:
            waiters = auth.cache.finish(
                self.flight, monotonic(), self.cached, self.failure, self.retry_after
            )
        for wake in waiters:
            wake()

    def result(self) -> Cached:
        return self.auth._result(self.flight, self.ctx, self.cached, self.failure, self.cause)
