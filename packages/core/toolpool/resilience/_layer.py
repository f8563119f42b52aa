"""`PolicyRuntime`: a `Policy` running for one destination, as the "policy" layer of the
destination's send chain (outside auth; see `toolpool._chain` for the order).

One call through the layer:

    1. bookkeeping for admission: a request not made inside `pool.admit` that finds its
       destination over capacity is refused at once (PoolSaturated, reason "queue_full")
    2. tenacity's retry loop (see `_retry`) around each attempt:
         a. circuit breaker: fail fast with DestinationUnavailable while it is open
         b. rate limit and Retry-After pauses: wait for a start (at most `max_wait`), or
            refuse (PoolSaturated, reason "rate_limited") rather than send a request the
            downstream would reject
         c. the inner send (auth provider, then the pooled send)
         d. the outcome goes to the breaker, the adaptive limit and the pauses
    3. the response body is wrapped so that the call counts as in flight until its body is
       read or closed, when waiting admissions are granted and saturation re-assessed

Locks: the runtime's lock guards its own state; it may take the destination's lock inside
it (to apply a new limit), never the other way round. User callbacks and wake-ups run after
both are released.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying
from tenacity.stop import stop_after_attempt

from toolpool._auth_context import AuthContext
from toolpool._chain import AsyncSend, MethodLayer, SyncSend
from toolpool._destination import mark_counted, unmark_counted
from toolpool._h2 import failure_incident
from toolpool._watched import WatchedStream
from toolpool.errors import DestinationUnavailable, PoolSaturated, PoolTimeout
from toolpool.resilience._adaptive import INITIAL, AimdLimit
from toolpool.resilience._admission_control import AdmissionControl, admitted_here
from toolpool.resilience._admission_rules import (
    BREAKER_OPEN,
    OK,
    QUEUE_FULL,
    RATE_LIMITED,
    REJECTION_REASONS,
    TIMEOUT,
    AdmissionQueue,
)
from toolpool.resilience._breaker import CLOSED, IGNORE, OPEN, Breaker, Permit
from toolpool.resilience._budget import RetryBudget
from toolpool.resilience._outcome import (
    breaker_outcome,
    overload_signal,
    retry_after_seconds,
    retry_reason,
)
from toolpool.resilience._ratelimit import RateLimit, RateLimiter, SharedRateLimiter
from toolpool.resilience._retry import (
    BudgetSpent,
    RetryableOutcome,
    RetryAfterBeyond,
    RetryAfterOrBackoff,
)
from toolpool.resilience._stats import PolicyStats

if TYPE_CHECKING:
    from toolpool._destination import DestinationPool
    from toolpool.resilience._policy import Policy

__all__ = ["PolicyRuntime"]

log = logging.getLogger("toolpool.resilience")

monotonic = time.monotonic

# Bodies of retried responses up to this size are read so their connection is reused.
_DRAIN_LIMIT = 64 * 1024


def _last_outcome(retry_state: RetryCallState) -> Any:
    """tenacity `retry_error_callback`: hand back the last response, or raise its error."""
    outcome = retry_state.outcome
    assert outcome is not None
    return outcome.result()


def _retried_response(retry_state: RetryCallState) -> httpx.Response | None:
    outcome = retry_state.outcome
    if outcome is None or outcome.failed:
        return None
    response = outcome.result()
    return response if isinstance(response, httpx.Response) else None


def _small_body(response: httpx.Response) -> bool:
    length = response.headers.get("content-length")
    return length is not None and length.isdigit() and int(length) <= _DRAIN_LIMIT


async def _discard_async(retry_state: RetryCallState) -> None:
    """tenacity `before_sleep`: free the connection of the response being retried."""
    response = _retried_response(retry_state)
    if response is None:
        return
    try:
        if _small_body(response):
            await response.aread()
    except httpx.HTTPError:
        pass
    finally:
        await response.aclose()


def _discard_sync(retry_state: RetryCallState) -> None:
    response = _retried_response(retry_state)
    if response is None:
        return
    try:
        if _small_body(response):
            response.read()
    except httpx.HTTPError:
        pass
    finally:
        response.close()


def _outcome(outcome: httpx.Response | Exception) -> httpx.Response:
    """The response of an attempt, or its error raised."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


class _Call:
    """One call through the policy layer, from `_enter` to the end of its response body.

    While the call sends, its requests are marked as counted for the pool (they queue without
    its queue bound, which the layer's room check already enforced); a call that fails leaves
    at once, an answered one when its body is read or closed.
    """

    __slots__ = ("counted", "marked", "runtime")

    def __init__(self, runtime: PolicyRuntime) -> None:
        self.runtime = runtime
        self.counted = runtime._enter()
        self.marked = mark_counted(runtime.dest)

    def __enter__(self) -> _Call:
        return self

    def __exit__(self, *exc_info: object) -> None:
        unmark_counted(self.marked)
        if exc_info[0] is not None:
            self.runtime._leave(self.counted)

    def answer(self, response: httpx.Response) -> httpx.Response:
        """Watch the response's body: the call ends when it is read or closed."""
        runtime = self.runtime
        done = functools.partial(runtime._leave, self.counted)
        response.stream = WatchedStream(response.stream, done, runtime.dest.pool)
        return response


class PolicyRuntime(AdmissionControl, MethodLayer):
    """A `Policy` running for one destination; `dest.policy` once bound.

    Read `stats()` for counters, `saturation()` for the current level, `effective_limit`
    and `limit_reason` for the adaptive limit.
    """

    def __init__(self, policy: Policy, dest: DestinationPool) -> None:
        """The policy's state for `dest`; it sends nothing until `dest.add_layer(runtime)`."""
        self.policy = policy
        self.dest = dest
        self.name = dest.name
        self._lock = threading.Lock()
        now = monotonic()
        max_connections = dest.settings.max_connections
        self.max_connections = max_connections
        self.breaker = Breaker(policy.breaker) if policy.breaker is not None else None
        retry = policy.retry
        self.budget = (
            RetryBudget(retry.budget_ratio, retry.budget_floor, retry.budget_window)
            if retry is not None
            else None
        )
        self.limiter = RateLimiter(policy.rate_limit, policy.max_wait, policy.max_pause)
        # A fleet-wide bucket (toolpool.fleet) in place of the local one; see share_rate_limit.
        self.shared_rates: SharedRateLimiter | None = None
        self.shared_rate_limit: RateLimit | None = None
        self.adaptive = (
            AimdLimit(policy.adaptive, max_connections, now)
            if policy.adaptive is not None
            else None
        )
        self.admission = AdmissionQueue()
        self.level: str = OK
        self._retries: dict[str, int] = {}
        self._retries_denied = 0
        self._rejections = dict.fromkeys(REJECTION_REASONS, 0)
        self._rate_waits = 0
        self._rate_wait_seconds = 0.0
        self._admitted_total = 0
        self._admission_waits = 0
        self._timer: threading.Timer | None = None
        self._timer_at = math.inf
        self._inner_a: AsyncSend = dest.base_async_send
        self._inner_s: SyncSend = dest.base_sync_send
        self._async_retrying: AsyncRetrying | None = None
        self._sync_retrying: Retrying | None = None
        if retry is not None:
            stop = (
                stop_after_attempt(retry.attempts)
                | RetryAfterBeyond(retry.max_retry_after)
                | BudgetSpent(retry, self._spend_retry)
            )
            # One strategy for both; only freeing a retried response's connection differs.
            strategy: dict[str, Any] = {
                "retry": RetryableOutcome(retry),
                "stop": stop,
                "wait": RetryAfterOrBackoff(retry),
                "retry_error_callback": _last_outcome,
            }
            self._async_retrying = AsyncRetrying(before_sleep=_discard_async, **strategy)
            self._sync_retrying = Retrying(before_sleep=_discard_sync, **strategy)
        dest.pool.on_close(self._stop_timer)

    def __repr__(self) -> str:
        return f"<PolicyRuntime {self.name!r} limit={self.effective_limit} {self.level}>"

    # ------------------------------------------------------------------ the layer

    #: Its place in the send chain (`toolpool._chain`): outside auth, so retries and the
    #: breaker see requests that carry credentials.
    role = "policy"

    def share_rate_limit(
        self, shared: SharedRateLimiter, rate_limit: RateLimit | None = None
    ) -> None:
        """Draw this destination's rate limit from `shared` (a bucket several processes use,
        e.g. `toolpool.fleet.RedisFleet(...).rates`) instead of a bucket of this process.
        `rate_limit` replaces the policy's own. Retry-After pauses stay local. No effect
        without a rate limit."""
        config = rate_limit if rate_limit is not None else self.policy.rate_limit
        if config is None:
            return
        with self._lock:
            self.shared_rates = shared
            self.shared_rate_limit = config
            self.limiter = RateLimiter(None, self.policy.max_wait, self.policy.max_pause)

    # ------------------------------------------------------------------ observability

    @property
    def effective_limit(self) -> int:
        """The connection limit in force now (max_connections unless lowered)."""
        return int(self.dest.state.cap)

    @property
    def limit_reason(self) -> str:
        """Why the effective limit last changed ("initial" if it never did)."""
        return self.adaptive.reason if self.adaptive is not None else INITIAL

    def stats(self) -> PolicyStats:
        """A snapshot of the counters (see `PolicyStats` for every name)."""
        now = monotonic()
        with self._lock:
            breaker = self.breaker
            adaptive = self.adaptive
            return PolicyStats(
                destination=self.name,
                retries_total=dict(self._retries),
                retries_denied_total=self._retries_denied,
                retry_budget_available=(
                    self.budget.available(now) if self.budget is not None else 0.0
                ),
                breaker_state=breaker.state if breaker is not None else CLOSED,
                breaker_transitions_total=(
                    dict(breaker.transitions) if breaker is not None else {}
                ),
                rejections_total=dict(self._rejections),
                breaker_rejections_total=self._rejections[BREAKER_OPEN],
                rate_limited_total=self._rejections[RATE_LIMITED],
                rate_limit_waits_total=self._rate_waits,
                rate_limit_wait_seconds_total=self._rate_wait_seconds,
                effective_limit=self.effective_limit,
                max_connections=self.max_connections,
                limit_reason=adaptive.reason if adaptive is not None else INITIAL,
                limit_decreases_total=adaptive.decreases if adaptive is not None else 0,
                limit_increases_total=adaptive.increases if adaptive is not None else 0,
                admitted_total=self._admitted_total,
                admission_waits_total=self._admission_waits,
                admitted=self.admission.admitted,
                in_flight_unadmitted=self.admission.unadmitted,
                saturation_state=self._assessment_locked(now).state,
            )

    # ------------------------------------------------------------------ send chain

    # A call this layer let in (admitted, or with room) is counted here, so its requests
    # (retries, token fetch, 401 refresh included) are marked for the pool: they queue without
    # its queue bound, which the room check above already enforced for the call.

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """The policy layer's async send (see the module docstring)."""
        with _Call(self) as call:
            return call.answer(await self._send_async(request, ctx))

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """The policy layer's sync send (see the module docstring)."""
        with _Call(self) as call:
            return call.answer(self._send_sync(request, ctx))

    # The first attempt runs before tenacity is involved: most calls succeed at once and
    # should not pay for the retry machinery. Only an outcome that may be retried enters
    # tenacity, which replays it as its first attempt and decides everything from there.

    async def _send_async(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        try:
            first: httpx.Response | Exception = await self._attempt_async(request, ctx)
        except Exception as exc:
            first = exc
        retrying = self._async_retrying
        if retrying is None or not self._may_retry(request, first):
            return _outcome(first)
        replay = [first]

        async def attempt(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            return _outcome(replay.pop()) if replay else await self._attempt_async(request, ctx)

        response: httpx.Response = await retrying.copy()(attempt, request, ctx)
        return response

    def _send_sync(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        try:
            first: httpx.Response | Exception = self._attempt_sync(request, ctx)
        except Exception as exc:
            first = exc
        retrying = self._sync_retrying
        if retrying is None or not self._may_retry(request, first):
            return _outcome(first)
        replay = [first]

        def attempt(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            return _outcome(replay.pop()) if replay else self._attempt_sync(request, ctx)

        response: httpx.Response = retrying.copy()(attempt, request, ctx)
        return response

    def _may_retry(self, request: httpx.Request, first: httpx.Response | Exception) -> bool:
        """Whether the first attempt's outcome may be retried (then tenacity takes over)."""
        if isinstance(first, Exception):
            return self._retryable(request, None, first)
        return self._retryable(request, first, None)

    def _retryable(
        self, request: httpx.Request, response: httpx.Response | None, exc: BaseException | None
    ) -> bool:
        retry = self.policy.retry
        assert retry is not None
        if exc is None and response is not None and response.status_code not in retry.statuses:
            return False  # the common case, decided without looking at the request
        return (
            retry_reason(request, response, exc, retry.statuses, retry.idempotent(request))
            is not None
        )

    # Each attempt: the decisions before it (`_before_attempt`: breaker permit, rate-limit
    # delay) and after it (`_after_attempt`: breaker, adaptive limit, pauses) are shared; the
    # two sends below only wait and send.

    async def _attempt_async(
        self, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        permit, delay = self._before_attempt(ctx)
        try:
            shared = self.shared_rates
            if shared is not None:
                delay += self._shared_delay(await shared.reserve(*self._shared_args(ctx, delay)))
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self._abandon(permit)
            raise
        started = monotonic()
        try:
            response = await self._inner_a(request, ctx)
        except BaseException as exc:
            self._after_attempt(permit, started, ctx, None, exc, request)
            raise
        self._after_attempt(permit, started, ctx, response, None, request)
        return response

    def _attempt_sync(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        permit, delay = self._before_attempt(ctx)
        try:
            shared = self.shared_rates
            if shared is not None:
                delay += self._shared_delay(shared.reserve_sync(*self._shared_args(ctx, delay)))
            if delay > 0:
                time.sleep(delay)
        except BaseException:
            self._abandon(permit)
            raise
        started = monotonic()
        try:
            response = self._inner_s(request, ctx)
        except BaseException as exc:
            self._after_attempt(permit, started, ctx, None, exc, request)
            raise
        self._after_attempt(permit, started, ctx, response, None, request)
        return response

    def _enter(self) -> bool:
        """A call starts. Returns True if it counts as an un-admitted request in flight
        (then `_leave(True)` must follow); raises PoolSaturated when there is no room."""
        admitted = admitted_here(self)
        now = monotonic()
        with self._lock:
            if self.budget is not None:
                self.budget.record_call(now)
            if admitted:
                self.admission.sending += 1
                return False
            error: PoolSaturated | None = None
            if self._room_locked(now, admission=False) > 0:
                self.admission.unadmitted += 1
                queued = self._reassess_locked(now)
            else:
                found = self._assessment_locked(now)
                self._rejections[QUEUE_FULL] += 1
                error = self._saturated_error(found, QUEUE_FULL)
                queued = self._note_level_locked(found, now)
        if error is None:
            if queued:
                self._deliver()
            return True
        dest = self.dest
        with dest.lock:
            dest.state.saturated_total += 1  # the pool's count of queue-full refusals
        if queued:
            self._deliver()
        raise error

    def _leave(self, counted: bool) -> None:
        """A call ended (its response body read or closed, or it failed)."""
        now = monotonic()
        with self._lock:
            if counted:
                self.admission.unadmitted -= 1
            else:
                self.admission.sending -= 1
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)

    def _before_attempt(self, ctx: AuthContext | None) -> tuple[Permit | None, float]:
        """Breaker and rate limit: (breaker permit, seconds to wait before sending)."""
        now = monotonic()
        tenant = ctx.tenant if ctx is not None else None
        error: Exception | None = None
        permit: Permit | None = None
        delay = 0.0
        with self._lock:
            breaker = self.breaker
            if breaker is not None:
                permit = breaker.allow(now)
                if permit is None:
                    self._rejections[BREAKER_OPEN] += 1
                    error = DestinationUnavailable(
                        self.name,
                        round(breaker.retry_after(now), 3),
                        f"circuit breaker open: {breaker.reason}",
                    )
            if error is None:
                reserved = self.limiter.reserve(tenant, now)
                if reserved is None:
                    if permit is not None and breaker is not None:
                        breaker.record(permit, IGNORE, now)
                    self._rejections[RATE_LIMITED] += 1
                    error = self._rate_limited_error(tenant, now)
                else:
                    delay = reserved
                    if delay > 0:
                        self._rate_waits += 1
                        self._rate_wait_seconds += delay
        if error is not None:
            raise error
        return permit, delay

    def _shared_args(
        self, ctx: AuthContext | None, delay: float
    ) -> tuple[str, str | None, RateLimit, float, float]:
        config = self.shared_rate_limit
        assert config is not None
        tenant = ctx.tenant if ctx is not None else None
        return self.name, tenant, config, max(0.0, self.policy.max_wait - delay), monotonic()

    def _shared_delay(self, reserved: float | None) -> float:
        """Count a shared bucket's answer like the local bucket's (a wait, or a refusal)."""
        now = monotonic()
        with self._lock:
            if reserved is None:
                self._rejections[RATE_LIMITED] += 1
                error = self._saturated_error(
                    self._assessment_locked(now), RATE_LIMITED, retry_after=1.0
                )
            else:
                if reserved > 0:
                    self._rate_waits += 1
                    self._rate_wait_seconds += reserved
                return reserved
        raise error  # the caller abandons the breaker permit

    def _abandon(self, permit: Permit | None) -> None:
        """The attempt was cancelled before it was sent."""
        if permit is not None and self.breaker is not None:
            with self._lock:
                self.breaker.record(permit, IGNORE, monotonic())

    def _after_attempt(
        self,
        permit: Permit | None,
        started: float,
        ctx: AuthContext | None,
        response: httpx.Response | None,
        exc: BaseException | None,
        request: httpx.Request | None = None,
    ) -> None:
        """Feed one attempt's outcome to the breaker, the pauses and the adaptive limit."""
        now = monotonic()
        dest = self.dest
        actions: list[Any] = []
        transition: str | None = None
        old_limit = new_limit = 0
        with self._lock:
            if isinstance(exc, PoolSaturated):
                self._rejections[QUEUE_FULL] += 1
            elif isinstance(exc, PoolTimeout):
                self._rejections[TIMEOUT] += 1
            breaker = self.breaker
            if breaker is not None and permit is not None:
                outcome = breaker_outcome(response, exc, breaker.config.failure_statuses)
                transition = breaker.record(permit, outcome, now, failure_incident(exc))
            if response is not None and response.status_code in (429, 503):
                seconds = retry_after_seconds(response)
                if seconds is not None and seconds > 0:
                    tenant = ctx.tenant if ctx is not None else None
                    self.limiter.pause(tenant, seconds, now, whole=response.status_code == 503)
            adaptive = self.adaptive
            if adaptive is not None:
                signal = overload_signal(response, exc, self._caller_connect_deadline(request))
                latency: float | None = None
                if response is not None:
                    latency = max(0.0, now - started - _wait_seconds(response))
                elif isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
                    # The caller's deadline, not overload; as a service time it is a lower
                    # bound, which only the (opt-in) latency rule reads.
                    latency = now - started
                if latency is not None or signal is not None:
                    old_limit = adaptive.limit
                    changed = adaptive.sample(now, latency, signal, started)
                    if changed is not None:
                        new_limit = changed
                        with dest.lock:
                            actions = dest.state.set_cap(changed, now)
            woken = []
            if transition == OPEN:
                refused = self.admission.refuse_all(BREAKER_OPEN)
                self._rejections[BREAKER_OPEN] += len(refused)
                woken = refused
            elif transition == CLOSED or new_limit > old_limit:
                woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
            reason = breaker.reason if breaker is not None else ""
            open_for = breaker.open_for if breaker is not None else 0.0
        if actions:
            dest.execute(actions)
        if transition == OPEN:
            log.warning(
                "destination %r: circuit breaker opened (%s); calls fail fast for %.1f s",
                self.name,
                reason,
                open_for,
            )
        elif transition == CLOSED:
            log.info("destination %r: circuit breaker closed (a probe succeeded)", self.name)
        if new_limit:
            log.debug(
                "destination %r: connection limit %d -> %d (%s)",
                self.name,
                old_limit,
                new_limit,
                self.limit_reason,
            )
        self._after_unlock(woken, queued)

    def _caller_connect_deadline(self, request: httpx.Request | None) -> bool:
        """True if the request's own connect timeout is shorter than the pool's (a connect
        timeout then is the caller's deadline, not the downstream refusing connections)."""
        if request is None:
            return False
        timeouts = request.extensions.get("timeout")
        connect = timeouts.get("connect") if isinstance(timeouts, dict) else None
        return connect is not None and connect < self.dest.settings.connect_timeout

    def _spend_retry(self, reason: str) -> bool:
        """The retry strategy asks for one retry (`BudgetSpent`)."""
        with self._lock:
            budget = self.budget
            if budget is not None and not budget.try_retry(monotonic()):
                self._retries_denied += 1
                return False
            self._retries[reason] = self._retries.get(reason, 0) + 1
            return True


def _wait_seconds(response: httpx.Response) -> float:
    """How long the request waited for a connection (reported by the pooled send)."""
    info = response.extensions.get("toolpool")
    if isinstance(info, dict):
        waited = info.get("wait_seconds", 0.0)
        if isinstance(waited, int | float):
            return float(waited)
    return 0.0
