"""The admission rules without I/O: capacity scaled with the effective limit, levels with
hysteresis, retry-after estimates, the FIFO of waiting calls, ordered callback delivery."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from toolpool.resilience._admission_rules import (
    BUSY,
    OK,
    QUEUED,
    SATURATED,
    UTILIZED,
    AdmissionQueue,
    AdmitWaiter,
    Saturation,
    SaturationHub,
    assess,
)


def numbers(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "cap": 10,
        "max_connections": 10,
        "pool_queue_limit": 20,
        "in_use": 0,
        "closing": 0,
        "pool_waiting": 0,
        "admit_waiting": 0,
        "tracked": 0,
        "breaker_wait": 0.0,
        "pause_wait": 0.0,
        "rate_room": None,
        "rate_wait": 0.0,
        "hold_time": 0.1,
        "busy_at": 0.8,
        "previous": OK,
    }
    base.update(overrides)
    return base


def test_levels() -> None:
    assert assess(**numbers()).state == OK
    assert assess(**numbers(in_use=8, tracked=8)).state == BUSY
    assert assess(**numbers(in_use=8, tracked=8)).reason == "utilization"
    assert assess(**numbers(in_use=10, pool_waiting=1, tracked=11)).reason == "queued"
    full = assess(**numbers(in_use=10, pool_waiting=20, tracked=30))
    assert (full.state, full.reason, full.capacity, full.occupancy) == (
        SATURATED,
        "queue_full",
        30,
        30,
    )
    assert assess(**numbers(breaker_wait=3.0)).reason == "breaker_open"
    assert assess(**numbers(pause_wait=1.0)).reason == "rate_limited"


def test_capacity_follows_the_effective_limit() -> None:
    low = assess(**numbers(cap=4, in_use=4, tracked=12))
    assert (low.queue_limit, low.capacity, low.state) == (8, 12, SATURATED)
    # A rate limit admits only what it can start within max_wait.
    assert assess(**numbers(rate_room=3, tracked=5)).capacity == 8
    no_room = assess(**numbers(rate_room=0, rate_wait=0.3))
    assert (no_room.state, no_room.reason, no_room.retry_after) == (
        SATURATED,
        "rate_limited",
        0.3,
    )
    # The bound counts calls: connections still closing (tenant hand-overs) do not shrink it,
    # since the pool queues the requests of counted calls without its own bound.
    assert assess(**numbers(closing=3)).capacity == 10 + 20
    # A lowered limit shrinks the queue bound with it.
    assert assess(**numbers(cap=5, closing=3)).capacity == 5 + 10
    # Requests of counted calls queued in the pool are not counted twice.
    both = numbers(in_use=10, pool_waiting=25, pool_waiting_counted=20, tracked=25)
    assert assess(**both).occupancy == 25


def test_admitted_calls_count_even_before_they_send() -> None:
    # 30 calls admitted, none sending yet: the destination is full for new callers.
    found = assess(**numbers(tracked=30))
    assert found.occupancy == 30 and found.state == SATURATED


def test_hysteresis_keeps_levels_from_flapping() -> None:
    # Saturated stays saturated until the queue is at most half full...
    assert assess(**numbers(in_use=10, pool_waiting=19, previous=SATURATED)).state == SATURATED
    assert assess(**numbers(in_use=10, pool_waiting=10, previous=SATURATED)).state == BUSY
    assert assess(**numbers(in_use=10, pool_waiting=19, previous=QUEUED)).state == BUSY
    # A queue that empties while the connections are still all in use stays "queued" (no
    # callback per request at full load)...
    assert assess(**numbers(in_use=10, previous=QUEUED)).level == QUEUED
    assert assess(**numbers(in_use=7, previous=QUEUED)).level == UTILIZED
    assert assess(**numbers(in_use=10, pool_waiting=1, previous=UTILIZED)).level == QUEUED
    # ...and busy stays busy until utilization falls 20 points below busy_at.
    assert assess(**numbers(in_use=7, previous=UTILIZED)).state == BUSY
    assert assess(**numbers(in_use=5, previous=UTILIZED)).state == OK
    assert assess(**numbers(in_use=7, previous=OK)).state == OK


def test_retry_after_estimates() -> None:
    assert assess(**numbers()).retry_after == 0.0
    queued = assess(**numbers(in_use=10, pool_waiting=9, hold_time=0.5))
    assert queued.retry_after == pytest.approx(0.5 * 10 / 10)
    assert assess(**numbers(breaker_wait=2.5)).retry_after == 2.5
    assert assess(**numbers(pause_wait=1.5)).retry_after == 1.5


def test_queue_is_fifo_and_skips_those_who_left() -> None:
    queue = AdmissionQueue()
    assert queue.try_enter(room=1)
    assert not queue.try_enter(room=0)
    waiters = [AdmitWaiter() for _ in range(4)]
    for w in waiters:
        queue.enqueue(w)
    assert not queue.try_enter(room=5)  # nobody jumps the queue
    assert queue.leave_queue(waiters[1], "timeout") is False
    granted = queue.grant(room=2)
    assert granted == [waiters[0], waiters[2]]
    assert queue.admitted == 3 and queue.waiting == 1
    # A waiter admitted just as it gave up must hand its room back.
    assert queue.leave_queue(waiters[0], "cancelled") is True
    assert queue.refuse_all("breaker_open") == [waiters[3]]
    assert waiters[3].outcome == "breaker_open"
    assert queue.waiting == 0


def test_sync_waiter_wakes_from_another_thread() -> None:
    waiter = AdmitWaiter()
    waiter.rearm()
    threading.Timer(0.01, waiter.wake).start()
    waiter.wait_sync(10.0)  # returns when woken, long before the timeout
    assert waiter._event is not None and waiter._event.is_set()


def test_hub_delivers_in_order_without_reentrancy() -> None:
    hub = SaturationHub()
    seen: list[str] = []

    def snap(state: Any) -> Saturation:
        return Saturation("crm", 0.0, 0, 0, 0, 1, 1, 0.0, state)

    def callback(change: Saturation) -> None:
        seen.append(change.state)
        if change.state == BUSY:
            hub.queue(snap(OK))  # a change observed from inside a callback
            hub.deliver()  # ...is delivered after this one, not inside it
            seen.append("after-nested-deliver")

    def broken(change: Saturation) -> None:
        raise RuntimeError("a broken subscriber must not stop the others")

    unsubscribe = hub.subscribe(callback)
    hub.subscribe(broken)
    hub.queue(snap(BUSY))
    hub.deliver()
    assert seen == [BUSY, "after-nested-deliver", OK]
    unsubscribe()
    hub.queue(snap(SATURATED))
    hub.deliver()
    assert seen == [BUSY, "after-nested-deliver", OK]
    with pytest.raises(TypeError, match="callable"):
        hub.subscribe("not a function")  # type: ignore[arg-type]
