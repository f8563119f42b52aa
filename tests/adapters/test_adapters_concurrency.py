"""AdaptiveToolConcurrency: the cap holds, FIFO grants, AIMD steps, no leaks on cancel,
nesting does not deadlock, threads and tasks share it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from toolpool.adapters import AdaptiveToolConcurrency


async def _turns(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_the_limit_caps_calls_in_flight() -> None:
    limiter = AdaptiveToolConcurrency(3)
    gate = asyncio.Event()
    peak = 0
    running = 0

    async def call() -> None:
        nonlocal peak, running
        async with limiter.slot():
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

    tasks = [asyncio.create_task(call()) for _ in range(10)]
    await _turns()
    assert running == 3
    assert limiter.in_flight == 3
    assert limiter.waiting == 7
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 3
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


async def test_grants_are_fifo() -> None:
    limiter = AdaptiveToolConcurrency(1)
    order: list[int] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            await release.wait()

    async def call(i: int) -> None:
        async with limiter.slot():
            order.append(i)

    first = asyncio.create_task(holder())
    await _turns(5)
    tasks = []
    for i in range(6):
        tasks.append(asyncio.create_task(call(i)))
        await _turns(2)  # queue them in a known order
    release.set()
    await asyncio.gather(first, *tasks)
    assert order == list(range(6))


def test_aimd_steps() -> None:
    limiter = AdaptiveToolConcurrency(16, minimum=2)
    limiter.on_busy()
    assert limiter.limit == 8
    limiter.on_busy()
    limiter.on_busy()
    limiter.on_busy()
    assert limiter.limit == 2  # not below minimum
    for _ in range(2):
        limiter.on_success()
    assert limiter.limit == 3  # +1 after `limit` successes
    for _ in range(3):
        limiter.on_success()
    assert limiter.limit == 4
    for _ in range(200):
        limiter.on_success()
    assert limiter.limit == 16  # never above the initial limit
    with pytest.raises(ValueError, match="limit"):
        AdaptiveToolConcurrency(0)
    with pytest.raises(ValueError, match="minimum"):
        AdaptiveToolConcurrency(4, minimum=5)


async def test_a_burst_of_busy_calls_halves_once() -> None:
    """Twenty calls refused together are one congestion signal, not twenty."""
    limiter = AdaptiveToolConcurrency(20)
    gate = asyncio.Event()

    async def call() -> None:
        async with limiter.slot() as slot:
            await gate.wait()
            slot.busy()
            slot.busy()  # reporting twice counts once

    tasks = [asyncio.create_task(call()) for _ in range(20)]
    await _turns()
    gate.set()
    await asyncio.gather(*tasks)
    assert limiter.limit == 10
    assert limiter.decreases_total == 1
    # A call that starts after the decrease can lower it again.
    async with limiter.slot() as slot:
        slot.busy()
    assert limiter.limit == 5


async def test_raising_the_limit_wakes_waiters() -> None:
    limiter = AdaptiveToolConcurrency(2)
    limiter.on_busy()
    assert limiter.limit == 1
    hold = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            await hold.wait()

    first = asyncio.create_task(holder())
    await _turns(5)
    second = asyncio.create_task(holder())
    await _turns(5)
    assert limiter.waiting == 1
    limiter.on_success()  # one success at limit 1: limit becomes 2, the waiter runs
    await _turns(5)
    assert limiter.limit == 2
    assert limiter.waiting == 0
    assert limiter.in_flight == 2
    hold.set()
    await asyncio.gather(first, second)


async def test_cancelled_waiters_leave_nothing_behind() -> None:
    limiter = AdaptiveToolConcurrency(1)
    hold = asyncio.Event()

    async def holder() -> None:
        async with limiter.slot():
            await hold.wait()

    first = asyncio.create_task(holder())
    await _turns(5)
    waiters = [asyncio.create_task(holder()) for _ in range(5)]
    await _turns(5)
    assert limiter.waiting == 5
    for task in waiters[:4]:
        task.cancel()
    await asyncio.gather(*waiters[:4], return_exceptions=True)
    assert limiter.waiting == 1
    hold.set()
    await asyncio.gather(first, waiters[4])
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
    # A waiter cancelled right after being granted gives the slot back.
    hold.clear()
    first = asyncio.create_task(holder())
    await _turns(5)
    late = asyncio.create_task(holder())
    await _turns(5)
    hold.set()
    await first  # grants `late` its slot...
    late.cancel()  # ...which it may not have taken yet
    await asyncio.gather(late, return_exceptions=True)
    assert limiter.in_flight == 0
    assert limiter.waiting == 0


async def test_nested_calls_do_not_take_another_slot() -> None:
    limiter = AdaptiveToolConcurrency(1)
    async with limiter.slot() as outer:
        assert not outer.nested
        async with limiter.slot() as inner:  # would deadlock at limit 1 if it queued
            assert inner.nested
        with limiter.slot_sync() as inner_sync:
            assert inner_sync.nested
        assert limiter.in_flight == 1
    assert limiter.in_flight == 0


def test_threads_and_tasks_share_the_limit() -> None:
    limiter = AdaptiveToolConcurrency(4)
    lock = threading.Lock()
    running = 0
    peak = 0
    all_started = threading.Barrier(4, timeout=30)

    def sync_call() -> None:
        nonlocal running, peak
        with limiter.slot_sync():
            with lock:
                running += 1
                peak = max(peak, running)
            with lock:
                running -= 1

    def blocker() -> None:
        with limiter.slot_sync():
            all_started.wait()

    # Four holders fill the limit; everything else must wait for them.
    holders = [threading.Thread(target=blocker) for _ in range(3)]
    for t in holders:
        t.start()

    async def main() -> None:
        nonlocal running, peak
        async with limiter.slot():
            await asyncio.to_thread(all_started.wait)
        workers = [threading.Thread(target=sync_call) for _ in range(8)]
        for t in workers:
            t.start()

        async def task_call() -> None:
            nonlocal running, peak
            async with limiter.slot():
                with lock:
                    running += 1
                    peak = max(peak, running)
                await asyncio.sleep(0)
                with lock:
                    running -= 1

        await asyncio.gather(*(task_call() for _ in range(8)))
        for t in workers:
            await asyncio.to_thread(t.join, 30)

    asyncio.run(main())
    for t in holders:
        t.join(30)
    assert peak <= 4
    assert limiter.in_flight == 0
    assert limiter.waiting == 0
