"""One lost HTTP/2 connection is one failure of the destination, however many streams it
carried: the circuit breaker counts its incident once (both drivers).

Before, a reset of a connection carrying 8 streams read as "8 consecutive failures" and
opened the breaker for every tenant, where the same reset on HTTP/1.1 fails one call; that
is what made the randomized affinity storm on HTTP/2 fail under load.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Iterator

import httpx
import pytest

import toolpool
from tests._support.resilience_probes import policy_of
from toolpool._h2 import ConnectionFailed
from toolpool.resilience import CircuitBreaker, Policy
from toolpool.resilience._breaker import CLOSED, OPEN
from toolpool.testing import Downstream, ServiceSpec

pytestmark = pytest.mark.timeout(60)

STREAMS = 8
# No retries: every stream's failure reaches the caller and the breaker as it happened.
POLICY = Policy(retry=None, breaker=CircuitBreaker(consecutive_failures=3, min_calls=1000))


@pytest.fixture
def ds() -> Iterator[Downstream]:
    with Downstream({"api": ServiceSpec(require_auth=False)}, tls=True) as downstream:
        yield downstream


def _pool(ds: Downstream) -> toolpool.Pool:
    dest = toolpool.Destination(
        "api", ds.url("api"), max_connections=STREAMS, warmup=0.0, policy=POLICY
    )
    return toolpool.Pool([dest], verify=ds.client_ssl_context(), http2=True)


def _assert_one_incident(errors: list[BaseException]) -> None:
    assert len(errors) == STREAMS
    assert all(isinstance(e, ConnectionFailed) for e in errors), errors
    failed = [e for e in errors if isinstance(e, ConnectionFailed)]
    assert len({id(e) for e in failed}) == STREAMS  # each stream raised its own instance
    assert len({id(e.incident) for e in failed}) == 1  # ...of one incident


def _slow_url(ds: Downstream) -> str:
    return ds.url("api") + "/delay?s=30"


async def test_a_connection_reset_under_many_streams_counts_once_async(ds: Downstream) -> None:
    async with _pool(ds) as pool:
        client = pool.client()
        breaker = policy_of(pool, "api").breaker
        assert breaker is not None

        async def call(url: str) -> httpx.Response:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                return await client.get(url)

        slow = [asyncio.ensure_future(call(_slow_url(ds))) for _ in range(STREAMS - 1)]
        await ds.wait_stats_async("api", lambda s: s.requests_in_progress == STREAMS - 1)
        ds.set_fault("api", "reset", count=1)  # the next request resets the connection
        last = asyncio.ensure_future(call(ds.url("api") + "/anything"))
        outcomes = await asyncio.gather(*slow, last, return_exceptions=True)
        _assert_one_incident([o for o in outcomes if isinstance(o, BaseException)])
        assert (breaker.state, breaker.consecutive) == (CLOSED, 1)
        assert (await call(ds.url("api") + "/anything")).status_code == 200

        # Separate losses are separate failures: three in a row (the success above reset the
        # count) open it.
        for _ in range(3):
            ds.set_fault("api", "reset", count=1)
            with pytest.raises(ConnectionFailed):
                await call(ds.url("api") + "/anything")
        assert breaker.state == OPEN
        assert breaker.reason == "3 consecutive failures"
    served = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert served.faults_fired == {"reset": 4}


def test_a_connection_reset_under_many_streams_counts_once_threads(ds: Downstream) -> None:
    with _pool(ds) as pool:
        client = pool.sync_client()
        breaker = policy_of(pool, "api").breaker
        assert breaker is not None

        def call(url: str) -> httpx.Response:
            with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
                return client.get(url)

        with concurrent.futures.ThreadPoolExecutor(STREAMS) as executor:
            slow = [executor.submit(call, _slow_url(ds)) for _ in range(STREAMS - 1)]
            ds.wait_stats("api", lambda s: s.requests_in_progress == STREAMS - 1)
            ds.set_fault("api", "reset", count=1)
            last = executor.submit(call, ds.url("api") + "/anything")
            errors = [f.exception(timeout=30) for f in [*slow, last]]
        _assert_one_incident([e for e in errors if e is not None])
        assert (breaker.state, breaker.consecutive) == (CLOSED, 1)
        assert call(ds.url("api") + "/anything").status_code == 200
    served = ds.wait_stats("api", lambda s: s.connections_open == 0)
    assert served.faults_fired == {"reset": 1}
