"""`Policy`, a destination's resilience configuration, and `PolicyRuntime`, the object that
runs it as the outermost layer of the destination's send chain.

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
import contextvars
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import AsyncRetrying, RetryCallState, Retrying
from tenacity.stop import stop_after_attempt

from toolpool._auth_context import AuthContext
from toolpool.errors import ConfigError, DestinationUnavailable, PoolSaturated, PoolTimeout
from toolpool.resilience._adaptive import INITIAL, AdaptiveLimit, AimdLimit
from toolpool.resilience._admission import (
    BREAKER_OPEN,
    OK,
    QUEUE_FULL,
    RATE_LIMITED,
    REJECTION_REASONS,
    TIMEOUT,
    AdmissionQueue,
    AdmitWaiter,
    Assessment,
    Saturation,
    SaturationHub,
    assess,
)
from toolpool.resilience._breaker import CLOSED, IGNORE, OPEN, Breaker, CircuitBreaker, Permit
from toolpool.resilience._budget import RetryBudget
from toolpool.resilience._outcome import (
    breaker_outcome,
    overload_signal,
    retry_after_seconds,
    retry_reason,
)
from toolpool.resilience._ratelimit import RateLimit, RateLimiter
from toolpool.resilience._retry import (
    BudgetSpent,
    Retry,
    RetryableOutcome,
    RetryAfterBeyond,
    RetryAfterOrBackoff,
)
from toolpool.resilience._stats import PolicyStats

if TYPE_CHECKING:
    from toolpool._runtime import DestinationPool

__all__ = ["AsyncAdmission", "Policy", "PolicyRuntime", "SyncAdmission"]

log = logging.getLogger("toolpool.resilience")

monotonic = time.monotonic

# A waiting admission looks at the destination again at least this often, in case capacity
# was freed by traffic the layer does not see (token requests, requests already in flight
# when the policy was bound).
_ADMIT_POLL = 0.1
# Bodies of retried responses up to this size are read so their connection is reused.
_DRAIN_LIMIT = 64 * 1024
_ADMITTED_OUTCOME = "admitted"

# The destinations (runtime ids) the current task or thread is inside `admit` for.
_admitted: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "toolpool_admitted", default=frozenset()
)


@dataclass(frozen=True)
class Policy:
    """A destination's resilience: retries, circuit breaker, rate limit, adaptive limit.

    Every pool applies `Policy()` to each destination unless told otherwise
    (`toolpool.Pool(policy=...)` for all, `Destination(policy=...)` for one, `Policy.off()`
    to turn the pieces off; `Pool(policy=None)` for no resilience layer at all). Set a piece to
    None to turn it off.

    ```python
    from toolpool.resilience import Policy, RateLimit, Retry

    Destination("crm", "https://crm.internal", documented_limit=100,
                policy=Policy(rate_limit=RateLimit(rate=50, per_tenant=True),
                              retry=Retry(attempts=4)))
    ```
    """

    # Retries of idempotent requests and of failed connects, within a 20 % retry budget.
    retry: Retry | None = field(default_factory=Retry)
    # Fail fast while a destination is down instead of queueing calls that will fail.
    breaker: CircuitBreaker | None = field(default_factory=CircuitBreaker)
    # No rate limit unless you know the downstream's (the connection limit already bounds
    # concurrency; a made-up rate would only slow healthy traffic).
    rate_limit: RateLimit | None = None
    # On: 429, 503 and timeouts lower the connection limit below max_connections, and
    # recovery raises it one step per window (latency is opt-in, see AdaptiveLimit).
    adaptive: AdaptiveLimit | None = field(default_factory=AdaptiveLimit)
    # A request waits at most 5 s for a rate-limit start or the end of a Retry-After pause,
    # and `pool.admit` waits 5 s by default: long enough to ride out a burst (a full queue
    # drains in about queue_factor service times), short enough that an agent gets a
    # readable "busy, retry in N s" instead of a hung tool call.
    max_wait: float = 5.0
    # A server's Retry-After pauses the destination (503) or the tenant (429) for at most
    # 30 s: the server knows when it recovers, but a bogus header must not park a
    # destination for hours.
    max_pause: float = 30.0
    # Utilization (connections in use / effective limit) from which a destination is "busy":
    # 80 % leaves room to react before the queue fills.
    busy_at: float = 0.8

    def __post_init__(self) -> None:
        for name, kind in (
            ("retry", Retry),
            ("breaker", CircuitBreaker),
            ("rate_limit", RateLimit),
            ("adaptive", AdaptiveLimit),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ConfigError(
                    f"Policy.{name} must be a toolpool.resilience.{kind.__name__} or None, "
                    f"got {type(value).__name__}"
                )
        for name in ("max_wait", "max_pause"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"Policy.{name} must be a number of seconds, got {value!r}")
            if not 0 <= value < math.inf:
                raise ConfigError(f"Policy.{name} must be finite and >= 0, got {value!r}")
        if not isinstance(self.busy_at, int | float) or not 0 < self.busy_at <= 1:
            raise ConfigError(f"Policy.busy_at must be a fraction in (0, 1], got {self.busy_at!r}")

    @classmethod
    def off(cls) -> Policy:
        """No retries, breaker, rate limit or adaptive limit; admission still works."""
        return cls(retry=None, breaker=None, rate_limit=None, adaptive=None)

    def bind(self, dest: DestinationPool) -> PolicyRuntime:
        """Install this policy on `dest` (called by the pool when it adds the destination):
        sets `dest.policy` and wraps `dest.async_send` / `dest.sync_send` once."""
        runtime = PolicyRuntime(self, dest)
        runtime.install()
        return runtime


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


class PolicyRuntime:
    """A `Policy` running for one destination; `dest.policy` once bound.

    Read `stats()` for counters, `saturation()` for the current level, `effective_limit`
    and `limit_reason` for the adaptive limit.
    """

    def __init__(self, policy: Policy, dest: DestinationPool) -> None:
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
        self._inner_async = dest.async_send
        self._inner_sync = dest.sync_send
        self._async_retrying: AsyncRetrying | None = None
        self._sync_retrying: Retrying | None = None
        if retry is not None:
            stop = (
                stop_after_attempt(retry.attempts)
                | RetryAfterBeyond(retry.max_retry_after)
                | BudgetSpent(retry, self._spend_retry)
            )
            self._async_retrying = AsyncRetrying(
                retry=RetryableOutcome(retry),
                stop=stop,
                wait=RetryAfterOrBackoff(retry),
                before_sleep=_discard_async,
                retry_error_callback=_last_outcome,
            )
            self._sync_retrying = Retrying(
                retry=RetryableOutcome(retry),
                stop=stop,
                wait=RetryAfterOrBackoff(retry),
                before_sleep=_discard_sync,
                retry_error_callback=_last_outcome,
            )

    def __repr__(self) -> str:
        return f"<PolicyRuntime {self.name!r} limit={self.effective_limit} {self.level}>"

    def install(self) -> None:
        """Become `dest.policy` and the outermost layer of its send chain."""
        dest = self.dest
        if dest.policy is not None:
            raise ConfigError(f"destination {self.name!r} already has a resilience policy")
        dest.policy = self
        dest.async_send = self.async_send
        dest.sync_send = self.sync_send
        dest.pool._close_callbacks.append(self._stop_timer)

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

    def saturation(self) -> Saturation:
        """How busy the destination is now (also re-assesses, which may notify)."""
        now = monotonic()
        with self._lock:
            found = self._assessment_locked(now)
            queued = self._note_level_locked(found, now)
            snapshot = self._snapshot(found)
        if queued:
            self._deliver()
        return snapshot

    # ------------------------------------------------------------------ send chain

    async def async_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """The outermost async send of the destination (see the module docstring)."""
        counted = self._enter()
        try:
            response = await self._send_async(request, ctx)
        except BaseException:
            self._leave(counted)
            raise
        response.stream = _TrackedAsyncStream(response.stream, self, counted)
        return response

    def sync_send(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        """The outermost sync send of the destination (see the module docstring)."""
        counted = self._enter()
        try:
            response = self._send_sync(request, ctx)
        except BaseException:
            self._leave(counted)
            raise
        response.stream = _TrackedSyncStream(response.stream, self, counted)
        return response

    # The first attempt runs before tenacity is involved: most calls succeed at once and
    # should not pay for the retry machinery. Only an outcome that may be retried enters
    # tenacity, which replays it as its first attempt and decides everything from there.

    async def _send_async(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        retrying = self._async_retrying
        if retrying is None:
            return await self._attempt_async(request, ctx)
        first: httpx.Response | Exception
        try:
            first = await self._attempt_async(request, ctx)
        except Exception as exc:
            if not self._retryable(request, None, exc):
                raise
            first = exc
        else:
            if not self._retryable(request, first, None):
                return first
        replay: list[httpx.Response | Exception] = [first]

        async def attempt(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            if replay:
                outcome = replay.pop()
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
            return await self._attempt_async(request, ctx)

        response: httpx.Response = await retrying.copy()(attempt, request, ctx)
        return response

    def _send_sync(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        retrying = self._sync_retrying
        if retrying is None:
            return self._attempt_sync(request, ctx)
        first: httpx.Response | Exception
        try:
            first = self._attempt_sync(request, ctx)
        except Exception as exc:
            if not self._retryable(request, None, exc):
                raise
            first = exc
        else:
            if not self._retryable(request, first, None):
                return first
        replay: list[httpx.Response | Exception] = [first]

        def attempt(request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
            if replay:
                outcome = replay.pop()
                if isinstance(outcome, Exception):
                    raise outcome
                return outcome
            return self._attempt_sync(request, ctx)

        response: httpx.Response = retrying.copy()(attempt, request, ctx)
        return response

    def _retryable(
        self, request: httpx.Request, response: httpx.Response | None, exc: BaseException | None
    ) -> bool:
        retry = self.policy.retry
        assert retry is not None
        return (
            retry_reason(request, response, exc, retry.statuses, retry.idempotent(request))
            is not None
        )

    async def _attempt_async(
        self, request: httpx.Request, ctx: AuthContext | None
    ) -> httpx.Response:
        permit, delay = self._before_attempt(ctx)
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except BaseException:
                self._abandon(permit)
                raise
        started = monotonic()
        try:
            response = await self._inner_async(request, ctx)
        except BaseException as exc:
            self._after_attempt(permit, started, ctx, None, exc)
            raise
        self._after_attempt(permit, started, ctx, response, None)
        return response

    def _attempt_sync(self, request: httpx.Request, ctx: AuthContext | None) -> httpx.Response:
        permit, delay = self._before_attempt(ctx)
        if delay > 0:
            try:
                time.sleep(delay)
            except BaseException:
                self._abandon(permit)
                raise
        started = monotonic()
        try:
            response = self._inner_sync(request, ctx)
        except BaseException as exc:
            self._after_attempt(permit, started, ctx, None, exc)
            raise
        self._after_attempt(permit, started, ctx, response, None)
        return response

    def _enter(self) -> bool:
        """A call starts. Returns True if it counts as an un-admitted request in flight
        (then `_leave(True)` must follow); raises PoolSaturated when there is no room."""
        admitted = id(self) in _admitted.get()
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
                transition = breaker.record(permit, outcome, now)
            if response is not None and response.status_code in (429, 503):
                seconds = retry_after_seconds(response)
                if seconds is not None and seconds > 0:
                    tenant = ctx.tenant if ctx is not None else None
                    self.limiter.pause(tenant, seconds, now, whole=response.status_code == 503)
            adaptive = self.adaptive
            if adaptive is not None:
                signal = overload_signal(response, exc)
                latency: float | None = None
                if response is not None:
                    latency = max(0.0, now - started - _wait_seconds(response))
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

    def _spend_retry(self, reason: str) -> bool:
        """The retry strategy asks for one retry (`BudgetSpent`)."""
        with self._lock:
            budget = self.budget
            if budget is not None and not budget.try_retry(monotonic()):
                self._retries_denied += 1
                return False
            self._retries[reason] = self._retries.get(reason, 0) + 1
            return True

    # ------------------------------------------------------------------ admission

    def _admit_now_locked(self, now: float, timeout: float) -> str | None:
        """Admit at once ("admitted"), refuse at once (a reason), or None: wait."""
        breaker = self.breaker
        if breaker is not None and breaker.rejecting(now):
            self._rejections[BREAKER_OPEN] += 1
            return BREAKER_OPEN
        pause = self.limiter.paused_until - now
        if pause > timeout:
            self._rejections[RATE_LIMITED] += 1
            return RATE_LIMITED
        if pause <= 0 and self.admission.try_enter(self._room_locked(now, admission=True)):
            self._admitted_total += 1
            return _ADMITTED_OUTCOME
        if timeout <= 0:
            # Refused without waiting: say whether the queue or the rate limit is full.
            reason = self._assessment_locked(now).reason
            reason = RATE_LIMITED if reason == RATE_LIMITED else QUEUE_FULL
            self._rejections[reason] += 1
            return reason
        return None

    def _pump_locked(self, now: float) -> list[AdmitWaiter]:
        """Admit waiting calls while there is room (the caller wakes them, unlocked)."""
        if not self.admission.waiting:
            return []
        breaker = self.breaker
        if breaker is not None and breaker.rejecting(now):
            refused = self.admission.refuse_all(BREAKER_OPEN)
            self._rejections[BREAKER_OPEN] += len(refused)
            return refused
        if self.limiter.paused_until > now:
            return []
        granted = self.admission.grant(self._room_locked(now, admission=True))
        self._admitted_total += len(granted)
        return granted

    async def admit_async(self, timeout: float) -> Saturation:
        """Wait (FIFO, at most `timeout` s) until a call may start; see `pool.admit`."""
        deadline = monotonic() + timeout
        now = monotonic()
        waiter: AdmitWaiter | None = None
        with self._lock:
            verdict = self._admit_now_locked(now, timeout)
            if verdict is None:
                waiter = AdmitWaiter(asyncio.get_running_loop())
                self.admission.enqueue(waiter)
                self._admission_waits += 1
            found = self._assessment_locked(now)
            queued = self._note_level_locked(found, now)
        if queued:
            self._deliver()
        if waiter is not None:
            try:
                while True:
                    waiter.rearm()
                    verdict, remaining = self._check_waiter(waiter, deadline)
                    if verdict is not None:
                        break
                    await waiter.wait_async(min(remaining, _ADMIT_POLL))
            except BaseException:
                self._give_up(waiter)
                raise
        return self._verdict(verdict)

    def admit_blocking(self, timeout: float) -> Saturation:
        """`admit_async` for threads (blocks the calling thread)."""
        deadline = monotonic() + timeout
        now = monotonic()
        waiter: AdmitWaiter | None = None
        with self._lock:
            verdict = self._admit_now_locked(now, timeout)
            if verdict is None:
                waiter = AdmitWaiter()
                self.admission.enqueue(waiter)
                self._admission_waits += 1
            found = self._assessment_locked(now)
            queued = self._note_level_locked(found, now)
        if queued:
            self._deliver()
        if waiter is not None:
            try:
                while True:
                    waiter.rearm()
                    verdict, remaining = self._check_waiter(waiter, deadline)
                    if verdict is not None:
                        break
                    waiter.wait_sync(min(remaining, _ADMIT_POLL))
            except BaseException:
                self._give_up(waiter)
                raise
        return self._verdict(verdict)

    def _check_waiter(self, waiter: AdmitWaiter, deadline: float) -> tuple[str | None, float]:
        """(outcome or None, seconds left) for a waiting admission; admits what has room."""
        now = monotonic()
        with self._lock:
            woken = self._pump_locked(now)
            outcome = waiter.outcome
            if outcome is None and now >= deadline:
                self.admission.leave_queue(waiter, TIMEOUT)
                self._rejections[TIMEOUT] += 1
                outcome = TIMEOUT
            queued = self._reassess_locked(now)
        self._after_unlock([w for w in woken if w is not waiter], queued)
        return outcome, deadline - now

    def _give_up(self, waiter: AdmitWaiter) -> None:
        """A waiting admission was cancelled or interrupted."""
        now = monotonic()
        with self._lock:
            if self.admission.leave_queue(waiter, "cancelled"):
                self.admission.leave()
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)

    def _verdict(self, verdict: str | None) -> Saturation:
        """The snapshot for an admitted call, or raise the refusal."""
        now = monotonic()
        with self._lock:
            found = self._assessment_locked(now)
            if verdict == _ADMITTED_OUTCOME:
                return self._snapshot(found)
            if verdict == BREAKER_OPEN and self.breaker is not None:
                error: Exception = self._saturated_error(
                    found, BREAKER_OPEN, retry_after=max(0.05, self.breaker.retry_after(now))
                )
            elif verdict == RATE_LIMITED:
                wait = max(self.limiter.paused_until - now, self.limiter.room_in(now))
                error = self._saturated_error(found, RATE_LIMITED, retry_after=max(0.05, wait))
            else:
                error = self._saturated_error(found, verdict or TIMEOUT)
        raise error

    def release_admission(self) -> None:
        """An admitted call is done: its room goes to the next waiter."""
        now = monotonic()
        with self._lock:
            self.admission.leave()
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)

    # ------------------------------------------------------------------ saturation

    def _room_locked(self, now: float, admission: bool) -> int:
        """Capacity minus occupancy (the rules in `_admission`), without the rest; for an
        admission also what the rate limit can start in time. Requests made outside admit
        meet the rate limit when they send."""
        st = self.dest.state
        limits = st.limits
        cap = st.cap
        capacity = min(
            cap + limits.queue_limit * cap // limits.max_connections,
            max(0, cap - st.closing) + limits.queue_limit,
        )
        room = capacity - max(self.admission.tracked, st.in_use + st.opening + st.waiting)
        if admission:
            rate_room = self.limiter.room(now)
            if rate_room is not None:
                room = min(room, rate_room - self.admission.pending)
        return room

    def _assessment_locked(self, now: float) -> Assessment:
        st = self.dest.state
        limits = st.limits
        breaker = self.breaker
        rate_room = self.limiter.room(now)
        return assess(
            cap=st.cap,
            max_connections=limits.max_connections,
            pool_queue_limit=limits.queue_limit,
            in_use=st.in_use + st.opening,
            closing=st.closing,
            pool_waiting=st.waiting,
            admit_waiting=self.admission.waiting,
            tracked=self.admission.tracked,
            breaker_wait=breaker.retry_after(now) if breaker is not None else 0.0,
            pause_wait=max(0.0, self.limiter.paused_until - now),
            rate_room=None if rate_room is None else rate_room - self.admission.pending,
            rate_wait=self.limiter.room_in(now),
            hold_time=st.hold_ewma,
            busy_at=self.policy.busy_at,
            previous=self.level,
        )

    def _reassess_locked(self, now: float) -> bool:
        """Re-assess the level; True if a change was queued for the callbacks. Skipped when
        nobody listens and nobody waits (the level then only matters to `saturation()`,
        which assesses afresh)."""
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if (hub is None or not hub.active) and not self.admission.waiting:
            return False
        return self._note_level_locked(self._assessment_locked(now), now)

    def _note_level_locked(self, found: Assessment, now: float) -> bool:
        if found.reason in (BREAKER_OPEN, RATE_LIMITED):
            # Nothing else may happen when the rest ends: look again then.
            self._schedule_locked(now + found.retry_after)
        if found.state == self.level:
            return False
        self.level = found.state
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if hub is None or not hub.active:
            return False
        hub.queue(self._snapshot(found))
        return True

    def _snapshot(self, found: Assessment) -> Saturation:
        st = self.dest.state
        return Saturation(
            destination=self.name,
            utilization=round(found.utilization, 4),
            in_use=found.in_use,
            queued=found.queued,
            queue_limit=found.queue_limit,
            effective_limit=st.cap,
            max_connections=self.max_connections,
            retry_after=round(found.retry_after, 3),
            state=found.state,
            reason=found.reason,
        )

    def _saturated_error(
        self, found: Assessment, reason: str, retry_after: float | None = None
    ) -> PoolSaturated:
        st = self.dest.state
        return PoolSaturated(
            self.name,
            in_use=found.in_use,
            waiting=found.queued,
            max_connections=st.cap,
            queue_limit=found.queue_limit,
            retry_after=round(
                max(0.05, found.retry_after if retry_after is None else retry_after), 3
            ),
            reason=reason,
        )

    def _rate_limited_error(self, tenant: str | None, now: float) -> PoolSaturated:
        found = self._assessment_locked(now)
        return self._saturated_error(
            found, RATE_LIMITED, retry_after=self.limiter.retry_after(tenant, now)
        )

    def _deliver(self) -> None:
        hub: SaturationHub | None = self.dest.pool._saturation_hub
        if hub is not None:
            hub.deliver()

    def _after_unlock(self, woken: list[AdmitWaiter], queued: bool) -> None:
        for waiter in woken:
            if not waiter.wake() and waiter.outcome == _ADMITTED_OUTCOME:
                self.release_admission()  # its event loop is gone: give the room back
        if queued:
            self._deliver()

    # ------------------------------------------------------------------ timer

    def _schedule_locked(self, at: float) -> None:
        """Re-assess at `at` (the end of a breaker rest or a pause)."""
        if self._timer_at <= at:
            return  # one is due sooner (or the pool is closing)
        if self._timer is not None:
            self._timer.cancel()
        timer = threading.Timer(max(0.0, at - monotonic()) + 0.001, self._on_timer)
        timer.daemon = True
        timer.name = f"toolpool-resilience-{self.name}"
        self._timer = timer
        self._timer_at = at
        timer.start()

    def _stop_timer(self) -> None:
        """The pool is closing: no more re-assessments."""
        with self._lock:
            timer, self._timer = self._timer, None
            self._timer_at = -math.inf  # never schedule again
        if timer is not None:
            timer.cancel()

    def _on_timer(self) -> None:
        now = monotonic()
        with self._lock:
            if self.dest.pool.closed:
                return
            self._timer = None
            self._timer_at = math.inf
            woken = self._pump_locked(now)
            queued = self._reassess_locked(now)
        self._after_unlock(woken, queued)


def _wait_seconds(response: httpx.Response) -> float:
    """How long the request waited for a connection (reported by the pooled send)."""
    info = response.extensions.get("toolpool")
    if isinstance(info, dict):
        waited = info.get("wait_seconds", 0.0)
        if isinstance(waited, int | float):
            return float(waited)
    return 0.0


# ---------------------------------------------------------------------- admission context


class AsyncAdmission:
    """`async with pool.admit(destination):` (see `Pool.admit`)."""

    __slots__ = ("_runtime", "_timeout", "_token")

    def __init__(self, runtime: PolicyRuntime, timeout: float) -> None:
        self._runtime = runtime
        self._timeout = timeout
        self._token: contextvars.Token[frozenset[int]] | None = None

    async def __aenter__(self) -> Saturation:
        held = _admitted.get()
        key = id(self._runtime)
        if key in held:  # nested admit for the same destination: already counted
            return self._runtime.saturation()
        snapshot = await self._runtime.admit_async(self._timeout)
        self._token = _admitted.set(held | {key})
        return snapshot

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit_admission(self._runtime, self._token)
        self._token = None


class SyncAdmission:
    """`with pool.admit_sync(destination):` (see `Pool.admit_sync`)."""

    __slots__ = ("_runtime", "_timeout", "_token")

    def __init__(self, runtime: PolicyRuntime, timeout: float) -> None:
        self._runtime = runtime
        self._timeout = timeout
        self._token: contextvars.Token[frozenset[int]] | None = None

    def __enter__(self) -> Saturation:
        held = _admitted.get()
        key = id(self._runtime)
        if key in held:
            return self._runtime.saturation()
        snapshot = self._runtime.admit_blocking(self._timeout)
        self._token = _admitted.set(held | {key})
        return snapshot

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _exit_admission(self._runtime, self._token)
        self._token = None


def _exit_admission(
    runtime: PolicyRuntime, token: contextvars.Token[frozenset[int]] | None
) -> None:
    if token is None:
        return  # a nested admit: the outer one releases
    try:
        _admitted.reset(token)
    except ValueError:
        pass  # exited in another context than entered; the outer context ends anyway
    runtime.release_admission()


# ---------------------------------------------------------------------- response bodies


def _finish_later(runtime: PolicyRuntime, counted: bool) -> None:
    """A response was dropped unread: count its call as done, from the pool's own thread
    (a finalizer must not take locks its thread may hold)."""
    maint = runtime.dest.pool._maint
    if maint is not None and not maint.stopped:
        maint.call_soon(lambda: runtime._leave(counted))


class _TrackedAsyncStream(httpx.AsyncByteStream):
    """A response body that reports the end of its call when read, failed or closed."""

    __slots__ = ("_counted", "_done", "_inner", "_runtime")

    def __init__(self, inner: Any, runtime: PolicyRuntime, counted: bool) -> None:
        self._inner = inner
        self._runtime = runtime
        self._counted = counted
        self._done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        finally:
            self._finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._runtime._leave(self._counted)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            _finish_later(self._runtime, self._counted)


class _TrackedSyncStream(httpx.SyncByteStream):
    """The sync twin of `_TrackedAsyncStream`."""

    __slots__ = ("_counted", "_done", "_inner", "_runtime")

    def __init__(self, inner: Any, runtime: PolicyRuntime, counted: bool) -> None:
        self._inner = inner
        self._runtime = runtime
        self._counted = counted
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._inner
        finally:
            self._finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self._done:
            self._done = True
            self._runtime._leave(self._counted)

    def __del__(self) -> None:
        if not self._done:
            self._done = True
            _finish_later(self._runtime, self._counted)
