"""The admission API the adapters use, on a real downstream: `pool.saturation`,
`pool.admit` / `admit_sync` (wait FIFO or refuse with a reason), `pool.on_saturation`."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import AsyncIterator

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import eventually, policy_of
from toolpool.resilience import CircuitBreaker, Policy, PolicyRuntime, Saturation
from toolpool.testing import Downstream


@pytest.fixture
async def tight(ds: Downstream) -> AsyncIterator[toolpool.Pool]:
    """'crm' with 2 connections and a queue of 2: room for 4 calls."""
    dest = toolpool.Destination("crm", ds.url("crm"), max_connections=2, queue_factor=1)
    async with toolpool.Pool([dest, toolpool.Destination("search", ds.url("search"))]) as pool:
        yield pool


class Hangs:
    """Requests to /hang that occupy 'crm' until cancelled."""

    def __init__(self, pool: toolpool.Pool, ds: Downstream) -> None:
        self.pool = pool
        self.client = pool.client(timeout=httpx.Timeout(60.0, pool=None))
        self.url = ds.url("crm") + "/hang"
        self.tasks: list[asyncio.Task[httpx.Response]] = []

    def start(self, n: int = 1) -> None:
        for _ in range(n):
            self.tasks.append(asyncio.ensure_future(self.client.get(self.url)))

    async def stop_one(self) -> None:
        # Cancel only while no connection is being opened: on Python 3.11 the core's
        # asyncio.wait_for around connect can lose a cancellation that races the connect
        # completing (CPython gh-86296), and the request then runs to its read timeout.
        await eventually(lambda: self.pool.stats()["crm"].opening == 0, "connects done")
        task = self.tasks.pop(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        while self.tasks:
            await self.stop_one()


async def test_saturation_follows_the_load(tight: toolpool.Pool, ds: Downstream) -> None:
    rest = tight.saturation("crm")
    assert rest == Saturation("crm", 0.0, 0, 0, 2, 2, 2, 0.0, "ok", "")
    assert tight.saturation(ds.url("crm")).destination == "crm"  # by URL too
    hangs = Hangs(tight, ds)
    states = []
    for _ in range(4):
        hangs.start()
        await asyncio.sleep(0)  # let it enter the pool
        started = len(hangs.tasks)
        await eventually(
            lambda n=started: policy_of(tight, "crm").admission.tracked == n, "entered"
        )
        states.append(tight.saturation("crm"))
    assert [(s.in_use, s.queued, s.state, s.reason) for s in states] == [
        (1, 0, "ok", ""),
        (2, 0, "busy", "utilization"),
        (2, 1, "busy", "queued"),
        (2, 2, "saturated", "queue_full"),
    ]
    assert states[-1].retry_after > 0
    assert states[-1].utilization == 1.0
    with pytest.raises(toolpool.PoolSaturated) as refused:
        await hangs.client.get(hangs.url)  # beyond the queue bound: refused locally
    assert refused.value.reason == "queue_full"
    await hangs.stop()
    await eventually(lambda: tight.saturation("crm").state == "ok", "recovered")


async def test_admit_refuses_at_once_or_after_its_timeout(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    hangs = Hangs(tight, ds)
    hangs.start(4)
    await eventually(lambda: tight.saturation("crm").state == "saturated", "saturated")
    started = time.monotonic()
    with pytest.raises(toolpool.PoolSaturated) as now:
        async with tight.admit("crm", timeout=0):
            pytest.fail("admitted into a saturated destination")
    assert now.value.reason == "queue_full"
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    with pytest.raises(toolpool.PoolSaturated) as later:
        async with tight.admit("crm", timeout=0.2):
            pytest.fail("admitted into a saturated destination")
    assert time.monotonic() - started >= 0.2
    assert later.value.reason == "timeout"
    assert later.value.retry_after > 0
    assert "wait longer in admit()" in str(later.value)
    assert isinstance(later.value, httpx.TransportError)  # tool code catching httpx errors
    stats = policy_of(tight, "crm").stats()
    assert stats.rejections_total["timeout"] == 1
    assert stats.rejections_total["queue_full"] == 1
    # Another destination is not held back.
    async with tight.admit("search", timeout=0) as snapshot:
        assert snapshot.state == "ok"
    await hangs.stop()


async def test_waiting_admissions_are_served_first_come_first_served(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    hangs = Hangs(tight, ds)
    hangs.start(4)
    await eventually(lambda: tight.saturation("crm").state == "saturated", "saturated")
    admitted: list[str] = []
    release = asyncio.Event()

    async def tool_call(name: str) -> None:
        async with tight.admit("crm", timeout=30):
            admitted.append(name)
            await release.wait()

    calls = []
    for name in "ABC":
        calls.append(asyncio.ensure_future(tool_call(name)))
        queued = len(calls)
        await eventually(lambda n=queued: policy_of(tight, "crm").admission.waiting == n, "queued")
    assert tight.saturation("crm").queued == 2 + 3  # the pool's queue and admit's
    for expected in (["A"], ["A", "B"], ["A", "B", "C"]):
        await hangs.stop_one()  # one call's room frees up
        await eventually(lambda e=expected: admitted == e, f"admitted {expected}")
    release.set()
    await asyncio.gather(*calls)
    await hangs.stop()
    stats = policy_of(tight, "crm").stats()
    assert (stats.admitted_total, stats.admission_waits_total, stats.admitted) == (3, 3, 0)


async def test_admitted_calls_do_not_meet_a_full_queue(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    """Four calls admitted (room for four) have their room even before they send: a request
    made outside admit is refused, theirs go through."""
    client = tight.client()
    url = ds.url("crm") + "/anything"
    held = asyncio.Event()
    go = asyncio.Event()
    inside = 0

    async def tool_call() -> int:
        nonlocal inside
        async with tight.admit("crm", timeout=0):
            inside += 1
            if inside == 4:
                held.set()
            await go.wait()
            return (await client.get(url)).status_code

    calls = [asyncio.ensure_future(tool_call()) for _ in range(4)]
    await held.wait()
    with pytest.raises(toolpool.PoolSaturated):
        await client.get(url)
    go.set()
    assert await asyncio.gather(*calls) == [200] * 4


async def test_nested_admit_for_the_same_destination_counts_once(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    runtime = policy_of(tight, "crm")
    async with tight.admit("crm"):
        async with tight.admit("crm"):
            assert runtime.admission.admitted == 1
            r = await tight.client().get(ds.url("crm") + "/anything")
            assert r.status_code == 200
            assert runtime.admission.unadmitted == 0  # its request counted as admitted
        assert runtime.admission.admitted == 1
    assert runtime.admission.admitted == 0


async def test_a_cancelled_admission_leaves_no_trace(tight: toolpool.Pool, ds: Downstream) -> None:
    hangs = Hangs(tight, ds)
    hangs.start(4)
    await eventually(lambda: tight.saturation("crm").state == "saturated", "saturated")

    async def tool_call() -> None:
        async with tight.admit("crm", timeout=30):
            pass

    waiting = asyncio.ensure_future(tool_call())
    runtime = policy_of(tight, "crm")
    await eventually(lambda: runtime.admission.waiting == 1, "queued")
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert (runtime.admission.waiting, runtime.admission.admitted) == (0, 0)
    await hangs.stop_one()
    async with tight.admit("crm", timeout=5):
        assert runtime.admission.admitted == 1
    await hangs.stop()


async def test_callbacks_hold_no_lock_and_can_unsubscribe(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    runtime = policy_of(tight, "crm")
    dest = tight.destination("crm")
    seen: list[tuple[str, str, bool]] = []

    def callback(change: Saturation) -> None:
        free = runtime._lock.acquire(blocking=False) and dest.lock.acquire(blocking=False)
        if free:
            dest.lock.release()
            runtime._lock.release()
        tight.saturation(change.destination)  # calling back into the pool is allowed
        seen.append((change.state, change.reason, free))

    unsubscribe = tight.on_saturation(callback)
    hangs = Hangs(tight, ds)
    for _ in range(4):
        hangs.start()
        await asyncio.sleep(0)
    await eventually(lambda: len(seen) >= 3, "three thresholds crossed")
    # Every threshold is heard: 2 of 2 connections in use, one call queued, queue full.
    assert [(state, reason) for state, reason, _ in seen] == [
        ("busy", "utilization"),
        ("busy", "queued"),
        ("saturated", "queue_full"),
    ]
    await hangs.stop()
    await eventually(lambda: seen[-1][0] == "ok", "recovery announced")
    assert all(free for _, _, free in seen), seen
    unsubscribe()
    count = len(seen)
    # Connections of the first round still closing would count against the limit.
    await eventually(lambda: tight.stats()["crm"].closing == 0, "first round closed")
    hangs.start(4)
    await eventually(lambda: tight.saturation("crm").state == "saturated", "saturated again")
    await hangs.stop()
    assert len(seen) == count


async def test_admit_refuses_at_once_while_the_breaker_is_open(ds: Downstream) -> None:
    policy = Policy(retry=None, breaker=CircuitBreaker(consecutive_failures=1, open_for=30))
    dest = toolpool.Destination("crm", ds.url("crm"), policy=policy)
    async with toolpool.Pool([dest], warmup=0) as pool:
        r = await pool.client().get(ds.url("crm") + "/status/503")
        assert r.status_code == 503
        started = time.monotonic()
        with pytest.raises(toolpool.PoolSaturated) as refused:
            async with pool.admit("crm", timeout=10):
                pytest.fail("admitted while the breaker is open")
        assert time.monotonic() - started < 1.0
        assert refused.value.reason == "breaker_open"
        assert 25 < refused.value.retry_after <= 30
        assert "circuit breaker open" in str(refused.value)
        with pytest.raises(toolpool.DestinationUnavailable) as unavailable:
            await pool.client().get(ds.url("crm") + "/anything")
        assert unavailable.value.reason.startswith("circuit breaker open")
        assert pool.saturation("crm").reason == "breaker_open"
        assert policy_of(pool, "crm").stats().breaker_rejections_total == 2
    assert ds.stats("crm").requests_total == 1


async def test_admission_works_without_a_policy(ds: Downstream) -> None:
    async with toolpool.Pool([toolpool.Destination("crm", ds.url("crm"))], policy=None) as pool:
        assert pool.destination("crm").policy is None  # no resilience layer at all
        async with pool.admit("crm") as snapshot:
            assert snapshot.state == "ok"
            r = await pool.client().get(ds.url("crm") + "/anything")
            assert r.status_code == 200
        runtime = pool.destination("crm").policy
        assert isinstance(runtime, PolicyRuntime)
        assert runtime.policy == Policy.off()
        # An origin the pool has not seen yet gets its destination on admission.
        async with pool.admit(ds.url("search")):
            pass
        assert ds.url("search") in pool.destinations
    with pytest.raises(KeyError, match="no destination"):
        toolpool.Pool([], unknown_destinations="reject").saturation("nowhere")


def test_admit_sync_waits_and_times_out_in_threads(ds: Downstream) -> None:
    dest = toolpool.Destination("crm", ds.url("crm"), max_connections=1, queue_factor=0)
    with toolpool.Pool([dest], warmup=0) as pool:
        inside = threading.Event()
        leave = threading.Event()
        order: list[str] = []

        def holder() -> None:
            with pool.admit_sync("crm"):
                inside.set()
                leave.wait(30)

        def waiter() -> None:
            with pool.admit_sync("crm", timeout=30):
                order.append("waiter")

        first = threading.Thread(target=holder)
        first.start()
        assert inside.wait(10)
        with pytest.raises(toolpool.PoolSaturated) as refused:
            with pool.admit_sync("crm", timeout=0.1):
                pass
        assert refused.value.reason == "timeout"
        second = threading.Thread(target=waiter)
        second.start()
        eventually_runtime = policy_of(pool, "crm")
        deadline = time.monotonic() + 10
        while eventually_runtime.admission.waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert order == []
        leave.set()
        first.join(10)
        second.join(10)
        assert order == ["waiter"]


async def test_a_response_dropped_unread_still_ends_its_call(ds: Downstream) -> None:
    dest = toolpool.Destination("crm", ds.url("crm"), max_connections=1, queue_factor=0)
    async with toolpool.Pool([dest], warmup=0) as pool:
        client = pool.client()
        runtime = policy_of(pool, "crm")
        request = client.build_request("GET", ds.url("crm") + "/bytes?n=100000")
        response = await client.send(request, stream=True)
        assert runtime.admission.tracked == 1
        with pytest.raises(toolpool.PoolSaturated):
            await client.get(ds.url("crm") + "/anything")  # the only connection is taken
        del response
        gc.collect()
        await eventually(lambda: runtime.admission.tracked == 0, "the dropped call ended")
        await eventually(lambda: pool.stats()["crm"].closing == 0, "its connection closed")
        assert (await client.get(ds.url("crm") + "/anything")).status_code == 200
