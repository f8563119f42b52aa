"""Requests of a call that is already counted never meet a full queue (issue 23).

An admitted call's token fetch (single-flight, on the destination's own origin), its 401
refresh and its retries are part of a call the destination has already counted; a token fetch
is part of the call it is fetched for. None of them may be refused with `PoolSaturated`
for a full queue, while the connections opening and closing during tenant hand-overs keep
the queue longer than the calls in flight alone would make it.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

import toolpool
from toolpool.testing import Downstream, ServiceSpec

TENANTS = [f"t{i}" for i in range(10)]


def _client(tenant: str) -> tuple[str, str]:
    return f"{tenant}-app", f"secret-{tenant}"


def _credentials(ctx: toolpool.AuthContext | None) -> tuple[str, str]:
    assert ctx is not None and ctx.tenant is not None
    return _client(ctx.tenant)


@pytest.fixture
def vectors() -> Iterator[Downstream]:
    """A TLS service whose token endpoint is on its own origin; tokens take a while."""
    spec = ServiceSpec(service_time=(0.01, 0.04), token_latency=(0.03, 0.08))
    with Downstream({"vectors": spec}, tls=True) as ds:
        for tenant in TENANTS:
            cid, secret = _client(tenant)
            ds.register_client("vectors", client_id=cid, client_secret=secret, tenant=tenant)
        yield ds


@pytest.fixture(params=["http1.1", "h2"])
def h2(request: pytest.FixtureRequest) -> bool:
    """Both protocols: on HTTP/1.1 tenants hand connections over (closing and opening them)
    at the cap; on HTTP/2 (the default on TLS) each tenant keeps one connection and the cap
    counts concurrent requests (streams)."""
    return bool(request.param == "h2")


def _check_cap(ds: Downstream, cap: int, h2: bool) -> None:
    """The server never saw more than `cap` at once: connections on HTTP/1.1; on HTTP/2
    streams (token requests included), on one connection per tenant."""
    server = ds.stats("vectors")
    if h2:
        assert server.http2_connections() == server.connections_accepted
        assert server.peak_streams_open <= cap
        assert server.peak_connections <= len(TENANTS)
    else:
        assert server.peak_connections <= cap


def _pool(ds: Downstream, cap: int, h2: bool, **kwargs: object) -> toolpool.Pool:
    auth = toolpool.auth.OAuth2ClientCredentials(ds.token_url("vectors"), credentials=_credentials)
    return toolpool.Pool(
        [
            toolpool.Destination(
                "vectors",
                ds.url("vectors"),
                max_connections=cap,
                warmup=0.0,  # cold
                verify=ds.ca_pem_path,
                auth=auth,
                http2=h2,
            )
        ],
        **kwargs,  # type: ignore[arg-type]
    )


def _ctx(i: int) -> toolpool.AuthContext:
    return toolpool.AuthContext(tenant=TENANTS[i % len(TENANTS)])


async def test_admitted_calls_never_meet_a_full_queue(vectors: Downstream, h2: bool) -> None:
    cap = 7
    calls = 3 * cap  # everything admission lets in at once: the cap plus the 2x queue
    failures: Counter[str] = Counter()
    async with _pool(vectors, cap, h2) as pool:
        client = pool.client()

        async def call(i: int) -> None:
            with toolpool.auth_context(_ctx(i)):
                try:
                    async with pool.admit("vectors", timeout=30):
                        for _ in range(2):  # two requests per call: the second reuses
                            r = await client.get(vectors.url("vectors") + "/anything")
                            r.raise_for_status()
                except Exception as exc:
                    failures[type(exc).__name__] += 1
                    raise

        for _round in range(3):
            results = await asyncio.gather(*(call(i) for i in range(calls)), return_exceptions=True)
            errors = [r for r in results if isinstance(r, BaseException)]
            assert not errors, (failures, errors[:3])
            # Cold again for the next round: every tenant fetches its token anew.
            pool.destination("vectors").auth.clear()
        stats = pool.stats()["vectors"]
    assert failures == Counter()
    assert stats.saturated_total == 0
    assert stats.protocol == ("h2" if h2 else "http/1.1")
    _check_cap(vectors, cap, h2)
    server = vectors.stats("vectors")
    assert server.requests_total - server.token_requests == 3 * calls * 2
    assert server.token_requests >= 3 * len(TENANTS)
    assert server.mixed_connections() == {}


# With the default policy (its layer counts the calls) and without any (the pool's own bound).
POLICIES = [pytest.param({}, id="policy"), pytest.param({"policy": None}, id="no-policy")]


async def _rounds_at_the_queue_bound(
    vectors: Downstream,
    policy: dict[str, object],
    h2: bool,
    *,
    cap: int,
    rounds: int,
    tenants: int,
) -> None:
    """2 x cap unadmitted callers of `tenants` tenants, `rounds` times, cold each round (the
    tokens cleared): every call answered 200, none refused, the downstream never above cap."""
    callers = 2 * cap
    async with _pool(vectors, cap, h2, **policy) as pool:
        client = pool.client()

        async def call(i: int) -> int:
            with toolpool.auth_context(_ctx(i % tenants)):
                r = await client.get(vectors.url("vectors") + "/anything")
                return r.status_code

        for _round in range(rounds):
            statuses = await asyncio.gather(*(call(i) for i in range(callers)))
            assert statuses == [200] * callers
            pool.destination("vectors").auth.clear()
        assert pool.stats()["vectors"].saturated_total == 0
        assert pool.stats()["vectors"].protocol == ("h2" if h2 else "http/1.1")
    _check_cap(vectors, cap, h2)
    assert vectors.stats("vectors").mixed_connections() == {}


@pytest.mark.parametrize("policy", POLICIES)
async def test_unadmitted_callers_up_to_the_queue_bound_never_fail(
    vectors: Downstream, policy: dict[str, object], h2: bool
) -> None:
    # Two tenants: token requests + hand-overs.
    await _rounds_at_the_queue_bound(vectors, policy, h2, cap=5, rounds=5, tenants=2)


@pytest.mark.parametrize("policy", POLICIES)
async def test_ten_tenants_at_the_queue_bound_without_admission(
    vectors: Downstream, policy: dict[str, object], h2: bool
) -> None:
    # One tenant per caller.
    await _rounds_at_the_queue_bound(vectors, policy, h2, cap=7, rounds=3, tenants=14)


@pytest.mark.parametrize("policy", POLICIES)
def test_sync_callers_at_the_queue_bound_never_fail(
    vectors: Downstream, policy: dict[str, object], h2: bool
) -> None:
    """Thread driver: 2 x cap callers of three tenants, cold; token requests and hand-overs
    take no places under the queue bound."""
    cap = 2
    with _pool(vectors, cap, h2, **policy) as pool:
        client = pool.sync_client()
        barrier = threading.Barrier(2 * cap)
        errors: list[BaseException] = []

        def call(i: int) -> None:
            barrier.wait(timeout=10)
            with toolpool.auth_context(_ctx(i % 3)):
                try:
                    client.get(vectors.url("vectors") + "/anything").raise_for_status()
                except BaseException as exc:  # collected, asserted below
                    errors.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(2 * cap)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert pool.stats()["vectors"].saturated_total == 0
        assert pool.stats()["vectors"].protocol == ("h2" if h2 else "http/1.1")
    _check_cap(vectors, cap, h2)


def test_saturated_message_shows_opening_and_closing() -> None:
    """A refusal says how many slots are opening and closing, so "in use" below the cap is
    not read as free capacity; stats() shows the same slots and the counted waiters."""
    pool = toolpool.Pool([toolpool.Destination("vectors", "http://127.0.0.1:9", max_connections=3)])
    dest = pool.destination("vectors")
    st = dest.state
    now = 0.0
    opening = st.acquire(("a", None), now)
    used = st.acquire(("a", None), now)
    assert isinstance(opening, toolpool._state.Slot) and isinstance(used, toolpool._state.Slot)
    st.opened(used, object(), now)
    st.acquire(("b", None), now)  # a third permit: opening
    # A waiter of a counted call, then the queue filled by calls: only calls take places.
    counted = st.acquire(("c", None), now, None, True)
    assert isinstance(counted, toolpool._state.Waiter)
    waiters = [st.acquire(("c", None), now) for _ in range(st.limits.queue_limit)]
    assert all(isinstance(w, toolpool._state.Waiter) for w in waiters)
    assert st.acquire(("c", None), now) is None  # the bound: queue_limit calls
    assert isinstance(st.acquire(("c", None), now, None, True), toolpool._state.Waiter)
    st.check()
    err = dest.saturated()
    assert (err.in_use, err.opening, err.closing) == (1, 2, 0)
    assert "1 in use, 2 opening of 3" in str(err)
    stats = pool.stats()["vectors"]
    assert (stats.in_use, stats.opening, stats.waiting) == (1, 2, st.limits.queue_limit + 2)
    assert stats.waiting_counted == 2
    assert len(st.fail_all_waiters()) == st.limits.queue_limit + 2  # nobody waits on them
    pool.close()
