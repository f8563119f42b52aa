"""Admission: learned and declared destinations, waiting while saturated, refusing after
max_wait; busy messages; resolve_auth."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import httpx
import pytest

import toolpool
from toolpool.adapters import (
    BUSY_ERRORS,
    Admission,
    atool_call_scope,
    busy_message,
    find_busy,
    resolve_auth,
)
from toolpool.testing import Downstream

ACME = toolpool.AuthContext(tenant="acme", credentials={"api_key": "sk-live-SECRET"})


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
async def tight(ds: Downstream) -> AsyncIterator[toolpool.Pool]:
    """'crm' with one connection and a queue of one."""
    pool = toolpool.Pool(
        [
            toolpool.Destination("crm", ds.url("crm"), max_connections=1, queue_factor=1),
            toolpool.Destination("search", ds.url("search")),
        ],
        warmup=0,
    )
    async with pool:
        yield pool


async def _saturate(
    pool: toolpool.Pool, ds: Downstream
) -> tuple[httpx.AsyncClient, list[asyncio.Task[httpx.Response]]]:
    # No request may end by its own timeout while a test waits (up to 30 s) for admissions:
    # the /hang requests end only when the test cancels them.
    client = pool.client(timeout=httpx.Timeout(120.0, pool=None))
    with toolpool.auth_context(ACME):
        tasks = [asyncio.create_task(client.get(ds.url("crm") + "/hang")) for _ in range(2)]
    st = pool.destination("crm").state
    await _until(lambda: st.in_use == 1 and st.waiting == 1)
    return client, tasks


def test_declare_and_learn() -> None:
    admission = Admission(toolpool.Pool(), max_wait=0)
    assert admission.destinations("t") == frozenset()
    admission.declare("t", ["crm"])
    admission.learn("t", "search")
    admission.learn("t", "search")
    assert admission.destinations("t") == frozenset({"crm", "search"})
    assert admission.destinations("other") == frozenset()
    with pytest.raises(TypeError, match="iterable"):
        admission.declare("t", "crm")
    with pytest.raises(ValueError, match="max_wait"):
        Admission(toolpool.Pool(), max_wait=-1)


def test_gates_of_one_pool_share_what_they_learned() -> None:
    # Agents built and wrapped per task get a new Admission each (issue 25): the second must
    # know what the first learned, or every call of every task is the tool's "first".
    pool, other = toolpool.Pool(), toolpool.Pool()
    first = Admission(pool, max_wait=0)
    first.declare("t", ["declared-only-here"])
    first.learn("t", "crm")
    later = Admission(pool, max_wait=5)
    assert later.destinations("t") == frozenset({"crm"})  # declared ones stay per gate
    later.learn("t", "search")
    assert first.destinations("t") == frozenset({"crm", "search", "declared-only-here"})
    assert Admission(other, max_wait=0).destinations("t") == frozenset()


async def test_admit_passes_when_nothing_is_saturated(tight: toolpool.Pool) -> None:
    admission = Admission(tight, max_wait=0)
    admission.declare("t", ["crm", "search", "never-used-destination"])
    await admission.admit("t")
    admission.admit_sync("t")
    await admission.admit("unknown-tool")


async def test_admit_refuses_a_saturated_destination_after_max_wait(
    tight: toolpool.Pool, ds: Downstream
) -> None:
    client, tasks = await _saturate(tight, ds)
    admission = Admission(tight, max_wait=0)
    admission.learn("t", "crm")
    with pytest.raises(toolpool.PoolSaturated) as info:
        await admission.admit("t")
    assert info.value.destination == "crm"
    assert info.value.reason in ("queue_full", "timeout")
    assert info.value.retry_after > 0
    assert isinstance(info.value, BUSY_ERRORS)
    # A tool that does not use 'crm' is not held back.
    admission.learn("other", "search")
    await admission.admit("other")
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


async def test_admit_waits_until_the_queue_drains(tight: toolpool.Pool, ds: Downstream) -> None:
    """A tool call (strict admission) waits while 'crm' is saturated, and still while its
    one connection is in use once the queue has drained (tool calls wait at the gate, not in
    the pool's queue); it is admitted when the connection is free, not by any timeout."""
    client, tasks = await _saturate(tight, ds)
    admission = Admission(tight, max_wait=60)
    admission.declare("t", ["crm"])
    waiting = asyncio.create_task(admission.admit("t"))
    started = threading.Event()
    finished: list[bool] = []  # whether the connection was free when admit_sync returned
    freed = False

    def sync_admit() -> None:
        started.set()
        admission.admit_sync("t")
        finished.append(freed)

    thread = threading.Thread(target=sync_admit)
    thread.start()
    assert await asyncio.to_thread(started.wait, 30)
    # Both stay blocked while the queue is full (a correct admit never returns here, however
    # long this takes; a broken one returns at once).
    await asyncio.sleep(0.2)
    assert not waiting.done()
    assert finished == []
    tasks[1].cancel()  # the queued request leaves: busy, no longer saturated
    await asyncio.gather(tasks[1], return_exceptions=True)
    st = tight.destination("crm").state
    await _until(lambda: st.waiting == 0 and tight.saturation("crm").state != "saturated")
    await asyncio.sleep(0.2)  # the one connection is still in use: both still wait
    assert not waiting.done()
    assert finished == []
    freed = True
    tasks[0].cancel()  # the connection is free: both are admitted, one after the other
    await asyncio.wait_for(waiting, 30)
    await asyncio.to_thread(thread.join, 30)
    assert finished == [True]
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()
    thread.join(10)


async def test_held_admissions_count_against_capacity(tight: toolpool.Pool, ds: Downstream) -> None:
    """'crm' takes 1 connection + 1 queued request. A held tool call takes the connection's
    place; a second tool call waits at the gate, not in the pool's queue (whose places go
    to whoever asks first, the gate's tenant by tenant), and gets in when the first ends.
    The queue's place stays for a direct `pool.admit` caller."""
    admission = Admission(tight, max_wait=60)
    admission.declare("t", ["crm"])
    first_in = asyncio.Event()
    release_first = asyncio.Event()

    async def held_call(entered: asyncio.Event, release: asyncio.Event) -> None:
        async with admission.hold("t"):
            entered.set()
            await release.wait()

    release_second = asyncio.Event()
    second_in = asyncio.Event()
    first = asyncio.create_task(held_call(first_in, release_first))
    await asyncio.wait_for(first_in.wait(), 30)
    second = asyncio.create_task(held_call(second_in, release_second))
    await asyncio.sleep(0.2)  # a correct hold still waits here, however long this takes
    assert not second_in.is_set()
    busy = tight.saturation("crm")
    assert (busy.state, busy.reason, busy.in_use, busy.queued) == ("busy", "queued", 1, 1)
    # No request was sent: the calls are counted by admission alone.
    assert ds.stats("crm").requests_total == 0

    refused = Admission(tight, max_wait=0)
    refused.declare("t", ["crm"])
    with pytest.raises(toolpool.PoolSaturated):
        await refused.admit("t")  # a call waits already: nobody jumps the queue
    with pytest.raises(toolpool.PoolSaturated):
        await asyncio.to_thread(refused.admit_sync, "t")

    release_first.set()  # one call ends: the waiting one is admitted
    await asyncio.wait_for(second_in.wait(), 30)
    await first
    direct_in = asyncio.Event()
    release_direct = asyncio.Event()

    async def direct_call() -> None:
        async with tight.admit("crm", timeout=0):  # the queue's place, for a direct caller
            direct_in.set()
            await release_direct.wait()

    direct = asyncio.create_task(direct_call())
    await asyncio.wait_for(direct_in.wait(), 30)
    assert tight.saturation("crm").state == "saturated"
    third_in = asyncio.Event()
    third = asyncio.create_task(held_call(third_in, asyncio.Event()))
    await asyncio.sleep(0.2)
    assert not third_in.is_set()
    release_direct.set()
    await direct
    release_second.set()
    await second
    await asyncio.wait_for(third_in.wait(), 30)
    third.cancel()
    await asyncio.gather(third, return_exceptions=True)
    assert tight.saturation("crm").state != "saturated"


def test_busy_messages_are_readable_and_secret_free() -> None:
    saturated = toolpool.PoolSaturated(
        "crm", in_use=50, waiting=12, max_connections=50, queue_limit=100, retry_after=0.42
    )
    assert busy_message(saturated, "search_crm") == (
        "tool 'search_crm' could not run: destination 'crm' is busy (12 waiting); retry in 0.4 s"
    )
    timeout = toolpool.PoolTimeout("crm", 5.0, in_use=2, waiting=4)
    msg = busy_message(timeout, "t")
    assert "destination 'crm' is busy" in msg
    assert "within 5 s" in msg
    assert "retry in 1.0 s" in msg
    down = toolpool.DestinationUnavailable("crm", 12.5, "circuit open")
    assert busy_message(down, "t") == (
        "tool 't' could not run: destination 'crm' is unavailable (circuit open); retry in 12 s"
    )
    for exc in (saturated, timeout, down):
        assert "SECRET" not in busy_message(exc, "t")
        assert isinstance(exc, BUSY_ERRORS)


def test_find_busy_looks_behind_wrappers() -> None:
    saturated = toolpool.PoolSaturated(
        "crm", in_use=1, waiting=1, max_connections=1, queue_limit=1, retry_after=0.1
    )
    assert find_busy(saturated) is saturated
    wrapped = RuntimeError("lookup failed")  # raise RuntimeError(...) from busy
    wrapped.__cause__ = saturated
    assert find_busy(wrapped) is saturated
    while_handling = RuntimeError("lookup failed")  # raised inside `except busy:`
    while_handling.__context__ = saturated
    assert find_busy(while_handling) is saturated
    while_handling.__suppress_context__ = True  # `from None`: not busy
    assert find_busy(while_handling) is None
    inner = ExceptionGroup("inner", [saturated])
    group = ExceptionGroup("task group", [ValueError("x"), inner])
    assert find_busy(group) is saturated
    assert find_busy(ValueError("plain")) is None


def test_resolve_auth_sources() -> None:
    hint = "pass context=Ctx(tenant_id=...) to invoke()"
    assert resolve_auth(ACME, None, framework="x", hint=hint) is ACME
    assert resolve_auth(None, None, framework="x", hint=hint) is None
    with toolpool.auth_context(ACME):
        assert resolve_auth(None, None, framework="x", hint=hint) is ACME
    got = resolve_auth(
        lambda run: toolpool.AuthContext(tenant=run["tenant"]),
        {"tenant": "globex"},
        framework="x",
        hint=hint,
    )
    assert got == toolpool.AuthContext(tenant="globex")
    assert resolve_auth(lambda run: None, {}, framework="x", hint=hint) is None


@pytest.mark.parametrize(
    ("resolver", "expected"),
    [
        (lambda run: toolpool.AuthContext(tenant=run["tenant"]), "KeyError"),
        (lambda run: toolpool.AuthContext(tenant=run.tenant_id), "AttributeError"),
        (lambda run: "acme", "returned str"),
    ],
)
def test_resolve_auth_says_what_to_pass(
    resolver: Callable[[object], object], expected: str
) -> None:
    hint = "pass context=Ctx(tenant_id=...) to invoke()"
    with pytest.raises(toolpool.ConfigError) as info:
        resolve_auth(resolver, {}, framework="langchain", hint=hint)  # type: ignore[arg-type]
    message = str(info.value)
    assert expected in message
    assert message.endswith(hint)
    assert message.startswith("toolpool.langchain:")


def test_resolve_auth_rejects_other_types() -> None:
    with pytest.raises(toolpool.ConfigError, match="auth= must be"):
        resolve_auth("acme", None, framework="crewai", hint="h")  # type: ignore[arg-type]


def test_a_destination_is_learned_once_used_in_two_calls_in_a_row() -> None:
    """A tool whose destination changes per call does not hold places at destinations it
    will not use; one that keeps using a destination is admitted to it up front."""
    admission = Admission(toolpool.Pool(), max_wait=0)
    admission.settle("fetch", {"a"})
    assert admission.destinations("fetch") == {"a"}  # the first call: what it used
    admission.settle("fetch", {"b"})
    assert admission.destinations("fetch") == frozenset()  # changes per call: nothing
    admission.settle("fetch", {"b", "c"})
    assert admission.destinations("fetch") == {"b"}
    admission.declare("fetch", ["crm"])
    admission.settle("fetch", {"d"})
    assert admission.destinations("fetch") == {"crm"}  # declared ones stay


async def test_destinations_that_change_per_call_wait_at_their_gates(ds: Downstream) -> None:
    """Issue 20: a tool taking its URL from the call's arguments, 2 x 12 calls at once over
    two destinations capped at 1 (2 queue places each): every call waits at the gate of the
    destination it reaches and is answered; none is refused."""
    pool = toolpool.Pool(
        [
            toolpool.Destination("crm", ds.url("crm"), max_connections=1),
            toolpool.Destination("search", ds.url("search"), max_connections=1),
        ],
        warmup=0,
    )
    admission = Admission(pool, max_wait=30.0)

    async def fetch(i: int) -> int:
        url = ds.url("crm" if i % 2 else "search") + "/delay?s=0.02"
        ctx = toolpool.AuthContext(tenant=f"t{i % 3}")
        async with atool_call_scope(pool, ctx, tool_name="fetch", admission=admission):
            async with httpx.AsyncClient() as client:
                status = (await client.get(url)).status_code
        return status

    async with pool:
        statuses = await asyncio.gather(*(fetch(i) for i in range(24)))
        stats = pool.stats()
        waits = sum(
            pool.destination(n).policy.stats().admission_waits_total for n in ("crm", "search")
        )
    assert statuses == [200] * 24
    assert stats["crm"].saturated_total == stats["search"].saturated_total == 0
    assert waits > 0  # 12 calls per destination against 3 places: some had to wait
    assert ds.stats("crm").peak_connections <= 1 and ds.stats("search").peak_connections <= 1
    assert admission.destinations("fetch") == frozenset()


async def test_waiting_tool_calls_are_admitted_tenant_by_tenant(ds: Downstream) -> None:
    """'crm' with 2 connections: tenant a's first two calls take both places before anyone
    waits; then a, b and c queue 4 calls each, in that order. As places free up one by one,
    b and c catch up with a's head start first, then the three alternate: the order does not
    follow arrival, and a's early calls do not let it finish its burst first."""
    pool = toolpool.Pool(
        [toolpool.Destination("crm", ds.url("crm"), max_connections=2, queue_factor=2)],
        warmup=0,
    )
    async with pool:
        pool.destination("crm")  # the gate needs the destination's runtime
        admission = Admission(pool, max_wait=60)
        admission.declare("t", ["crm"])
        admitted: list[tuple[str, asyncio.Event]] = []

        async def call(tenant: str) -> None:
            done = asyncio.Event()
            async with admission.hold("t", toolpool.AuthContext(tenant=tenant)):
                admitted.append((tenant, done))
                await done.wait()

        tasks = [asyncio.create_task(call("a")) for _ in range(2)]
        await _until(lambda: len(admitted) == 2)
        waiting = 0
        for tenant in "abc":
            for _ in range(4):
                tasks.append(asyncio.create_task(call(tenant)))
                waiting += 1
                await _until(lambda w=waiting: pool.saturation("crm").queued == w)
        assert pool.stats()["crm"].saturated_total == 0
        order = []
        for n in range(12):
            admitted[n][1].set()  # the oldest call in ends: one place frees up
            await _until(lambda n=n: len(admitted) == n + 3)
            order.append(admitted[-1][0])
        assert "".join(order) == "bcbcabcabcaa"
        for _, done in admitted[12:]:
            done.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
