"""The egress policy at connect time, in both drivers: a test-only name resolved by a local
resolver hook (`HostMap`) to a loopback address the policy forbids is refused; a name that
changes its answer between two connects is checked again at the second; every address of an
answer is checked; redirects are checked hop by hop; every metadata spelling is refused
before any packet leaves (the packet spy records no connect and no DNS lookup); the refusal
is counted in `toolpool_egress_denied_total` and logged once, without the query string."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import toolpool
import toolpool.metrics
from tests._support.metadata_forms import METADATA_FORMS
from tests._support.packet_spy import PacketSpy
from toolpool.testing import Downstream, HostMap

DRIVERS = ["asyncio", "threads"]

Get = Callable[..., httpx.Response]


def _getter(pool: toolpool.Pool, driver: str, runner: asyncio.Runner) -> Get:
    """GET through `pool.client()` (asyncio, always on the runner's one event loop: the
    pool keeps connections per loop) or `pool.sync_client()` (threads)."""
    if driver == "threads":

        def get_sync(url: str, **kw: Any) -> httpx.Response:
            with pool.sync_client(**kw) as client:
                return client.get(url)

        return get_sync

    def get_async(url: str, **kw: Any) -> httpx.Response:
        async def run() -> httpx.Response:
            async with pool.client(**kw) as client:
                return await client.get(url)

        # The caller's context (its auth context), not the one the runner was made in.
        return runner.run(asyncio.wait_for(run(), 30), context=contextvars.copy_context())

    return get_async


@pytest.fixture
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as loop_runner:
        yield loop_runner


def _port(ds: Downstream) -> int:
    return ds.address("api")[1]


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_name_resolving_to_a_denied_address_is_refused_before_connect(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    with toolpool.Pool(egress=egress, warmup=0) as pool:
        get = _getter(pool, driver, runner)
        assert get(f"http://ok.test:{port}/anything").status_code == 200
        mark = spy.snapshot()
        with pytest.raises(toolpool.EgressDenied) as info:
            get(f"http://evil.test:{port}/anything")
        assert spy.connects_since(mark) == []  # nothing was even attempted
        assert spy.lookups_since(mark) == []  # the hook answered: no system DNS
        err = info.value
        assert isinstance(err, httpx.TransportError)
        assert (err.host, err.address, err.rule) == ("evil.test", "127.0.0.2", "deny")
        assert "evil.test" in str(err) and "127.0.0.2" in str(err) and "deny" in str(err)
        assert names.lookups("evil.test") == 1
        stats = pool.destination_stats(f"http://evil.test:{port}")
        assert stats.in_use == 0 and stats.opening == 0  # the permit was given back


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_rebinding_name_is_checked_again_at_the_next_connect(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    names.set("rebind.test", "127.0.0.1")
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    url = f"http://rebind.test:{port}/anything"
    with toolpool.Pool(egress=egress, warmup=0) as pool:
        get = _getter(pool, driver, runner)
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            assert get(url).status_code == 200
        names.set("rebind.test", "127.0.0.2")  # the DNS answer changes (rebinding)
        mark = spy.snapshot()
        # Another tenant needs a connection of its own: a new connect, a new resolution.
        with (
            toolpool.auth_context(toolpool.AuthContext(tenant="globex")),
            pytest.raises(toolpool.EgressDenied) as info,
        ):
            get(url)
        assert info.value.address == "127.0.0.2"
        assert spy.connects_since(mark) == []
        assert names.lookups("rebind.test") == 2
        # The connection opened while the name pointed at an allowed address stays usable.
        with toolpool.auth_context(toolpool.AuthContext(tenant="acme")):
            assert get(url).status_code == 200
        assert names.lookups("rebind.test") == 2


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_address_of_an_answer_is_checked(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    # An allowed address first would have worked: one forbidden address refuses the connect.
    names.set("mixed.test", ["127.0.0.1", "169.254.169.254"])
    names.set("mixed6.test", ["127.0.0.1", "::ffff:169.254.169.254"])
    with toolpool.Pool(egress=toolpool.Egress(resolver=names), warmup=0) as pool:
        get = _getter(pool, driver, runner)
        mark = spy.snapshot()
        for host in ("mixed.test", "mixed6.test"):
            with pytest.raises(toolpool.EgressDenied) as info:
                get(f"http://{host}:{port}/anything")
            assert info.value.rule == "metadata"
        assert spy.connects_since(mark) == []


@pytest.mark.parametrize("driver", DRIVERS)
def test_checked_addresses_are_tried_in_order(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    # Nothing listens on 127.0.0.3: the connect falls through to the next checked address.
    names.set("two.test", ["127.0.0.3", "127.0.0.1"])
    with toolpool.Pool(egress=toolpool.Egress(resolver=names), warmup=0) as pool:
        get = _getter(pool, driver, runner)
        mark = spy.snapshot()
        assert get(f"http://two.test:{port}/anything").status_code == 200
        tried = [host for host, p in spy.connects_since(mark) if p == port]
        assert tried[0] == "127.0.0.3" and tried[-1] == "127.0.0.1"
        assert "two.test" not in tried  # only checked addresses are connected to


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize(("host", "rule"), METADATA_FORMS)
def test_every_metadata_form_is_refused_before_any_packet(
    driver: str, host: str, rule: str, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    """The default policy, the system resolver (no hook): no connect, no DNS lookup."""
    shown = f"[{host.strip('[]')}]" if ":" in host else host
    url = f"http://{shown}/latest/meta-data/iam/security-credentials/?token=s3cret"
    try:
        httpx.URL(url)
        refused_by: type[Exception] = toolpool.EgressDenied
    except httpx.InvalidURL:  # dotted octal: httpx refuses the URL itself (the policy too)
        refused_by = httpx.InvalidURL
    with toolpool.Pool(warmup=0) as pool:
        get = _getter(pool, driver, runner)
        mark = spy.snapshot()
        with pytest.raises(refused_by) as info:
            get(url)
        assert spy.connects_since(mark) == []
        assert spy.lookups_since(mark) == []
        if isinstance(info.value, toolpool.EgressDenied):
            assert info.value.rule == rule
            assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("driver", DRIVERS)
def test_each_redirect_hop_is_checked(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    with toolpool.Pool(egress=egress, warmup=0) as pool:
        get = _getter(pool, driver, runner)
        start = ds.url("api") + "/redirect"
        # An allowed hop is followed (httpx follows, each hop is a pooled request) ...
        hop = f"http://ok.test:{port}/anything/next"
        followed = get(f"{start}?to={hop}", follow_redirects=True)
        assert followed.status_code == 200 and followed.url == hop
        # ... a hop to a denied address, or to the metadata address, is refused at connect.
        mark = spy.snapshot()
        for target, rule in (
            (f"http://evil.test:{port}/x", "deny"),
            ("http://imds.test/latest/meta-data/", "metadata"),
            ("http://imds6.test/latest/meta-data/", "metadata"),
        ):
            with pytest.raises(toolpool.EgressDenied) as info:
                get(f"{start}?to={target}", follow_redirects=True)
            assert info.value.rule == rule
        assert all(p == port and h == "127.0.0.1" for h, p in spy.connects_since(mark))
        # Without follow_redirects (httpx's default, kept by pool.client()) nothing follows.
        assert get(f"{start}?to=http://imds.test/").status_code == 302
        assert names.lookups("imds.test") == 1  # the unfollowed Location was never resolved


def test_deny_unknown_spares_listed_destinations(
    ds: Downstream, names: HostMap, spy: PacketSpy
) -> None:
    port = _port(ds)
    egress = toolpool.Egress(deny_unknown=toolpool.Egress.LOOPBACK, resolver=names)
    listed = toolpool.Destination("api", ds.url("api"))
    with toolpool.Pool([listed], egress=egress, warmup=0) as pool, pool.sync_client() as client:
        assert client.get(ds.url("api") + "/anything").status_code == 200
        with pytest.raises(toolpool.EgressDenied) as info:
            client.get(f"http://ok.test:{port}/anything")  # built by a tool: not listed
        assert info.value.rule == "deny_unknown"
    allowed = toolpool.Egress(
        deny_unknown=toolpool.Egress.LOOPBACK, allow=["ok.test"], resolver=names
    )
    with toolpool.Pool(egress=allowed, warmup=0) as pool, pool.sync_client() as client:
        assert client.get(f"http://ok.test:{port}/anything").status_code == 200


@pytest.mark.parametrize("driver", DRIVERS)
def test_lean_requests_and_warmup_are_checked_too(
    driver: str, ds: Downstream, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    port = _port(ds)
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    dest = toolpool.Destination("evil", f"http://evil.test:{port}", max_connections=4)
    pool = toolpool.Pool([dest], egress=egress, warmup=0.5)
    mark = spy.snapshot()
    if driver == "threads":
        with pool:  # warm-up is refused (logged), the pool still starts
            with pytest.raises(toolpool.EgressDenied):
                pool.request_sync("GET", f"http://evil.test:{port}/anything")
    else:

        async def run() -> None:
            async with pool:
                with pytest.raises(toolpool.EgressDenied):
                    await pool.request("GET", f"http://evil.test:{port}/anything")

        asyncio.run(asyncio.wait_for(run(), 30))
    assert spy.connects_since(mark) == []
    # Two warm-up connects and the request: each refused and counted.
    assert pool.destination("evil").egress_denied == {"deny": 3}


def test_refusals_are_counted_and_logged_once_without_the_query(
    ds: Downstream, names: HostMap, spy: PacketSpy, caplog: pytest.LogCaptureFixture
) -> None:
    port = _port(ds)
    registry = CollectorRegistry()
    egress = toolpool.Egress(deny=["127.0.0.2"], resolver=names)
    with toolpool.Pool(egress=egress, warmup=0) as pool:
        toolpool.metrics.register(pool, registry)
        with caplog.at_level(logging.WARNING, logger="toolpool.egress"):
            with pool.sync_client() as client:
                for url in (
                    f"http://evil.test:{port}/a?api_key=s3cret",
                    "http://imds.test/latest/meta-data/?x=1",
                ):
                    with pytest.raises(toolpool.EgressDenied):
                        client.get(url)
        lines = [r.getMessage() for r in caplog.records if r.name == "toolpool.egress"]
        assert len(lines) == 2
        assert "evil.test" in lines[0] and "127.0.0.2" in lines[0] and "rule deny" in lines[0]
        assert "imds.test" in lines[1] and "169.254.169.254" in lines[1]
        assert not any("s3cret" in line or "?" in line for line in lines)

        def sample(destination: str, rule: str) -> float | None:
            return registry.get_sample_value(
                "toolpool_egress_denied_total", {"destination": destination, "rule": rule}
            )

        assert sample(f"http://evil.test:{port}", "deny") == 1
        assert sample("http://imds.test", "metadata") == 1
        assert sample("http://imds.test", "deny") is None


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_packet_spy_would_catch_a_connect_the_policy_let_through(
    driver: str, names: HostMap, spy: PacketSpy, runner: asyncio.Runner
) -> None:
    """The guard the tests above rely on is live in both drivers: with the metadata address
    explicitly allowed, the connect is attempted and the spy refuses it before it happens."""
    egress = toolpool.Egress(allow=["169.254.169.254/32"], resolver=names)
    with toolpool.Pool(egress=egress, warmup=0) as pool:
        get = _getter(pool, driver, runner)
        with pytest.raises(httpx.ConnectError, match="test guard"):
            get("http://imds.test/latest/meta-data/")
    # (The default resilience policy retries a connect that sent nothing: several attempts.)
    assert spy.refused and set(spy.refused) == {"connect 169.254.169.254:80"}
    spy.refused.clear()  # expected here; the fixture fails any test that leaves one
